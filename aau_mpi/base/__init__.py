"""What every layer shares: the error type users see (UserError), the one set of
value checks, registries of named components with their closest-name advice, and
the allowed values of settings. Imports nothing of aau_mpi above it, and neither
MPI nor torch."""
