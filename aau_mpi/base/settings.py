"""Allowed values of the settings whose components need MPI.

Kept apart from those components (world, depositor, watchdog) so that
reading a config (aau_mpi.training.config_loading, the simulator) never imports mpi4py,
which would start MPI.
"""

DEVICES = ("auto", "cpu", "cuda")                 # aau_mpi.init(device=)
OVERLAP_MODES = ("auto", "thread", "inline")      # aau_mpi.comm.depositor.use_thread
WATCHDOG_ACTIONS = ("auto", "warn", "abort")      # aau_mpi.decentralized.watchdog.Watchdog
ON_RANK_LOSS = ("abort", "continue")              # aau_mpi.comm.survivors, faults.on_rank_loss
