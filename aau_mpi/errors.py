"""The one exception type for bad input.

A UserError carries a one-line message that names the problem and the fix.
Entry points print it (on every rank) without a traceback and exit non-zero;
under MPI they then abort the whole job so that no rank is left waiting.
"""


class UserError(Exception):
    """Bad input from the user: config, topology, data path, checkpoint."""
