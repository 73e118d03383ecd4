"""The optimizer and what it composes: DecentralizedOptimizer (optimizer) wraps a
torch optimizer and joins an exchange (gossip through the mailbox, or the
allreduce baseline; exchange), a membership (the communicators, mailbox, thread,
events and loss detector built together; membership) and collectives over the
flat vector (collectives), with the flat parameters, job-wide events, the stall
watchdog, the torch device (device: aau_mpi.init), metric averaging, ProgressLR,
and the HDF5 checkpoints with their Checkpointer."""
