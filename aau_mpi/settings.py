"""Allowed values of the settings whose components need MPI.

Kept apart from those components (world, depositor, watchdog) so that
reading a config (aau_mpi.config, the simulator) never imports mpi4py,
which would start MPI.
"""

DEVICES = ("auto", "cpu", "cuda")                 # aau_mpi.world.init(device=)
OVERLAP_MODES = ("auto", "thread", "inline")      # aau_mpi.depositor.use_thread
WATCHDOG_ACTIONS = ("auto", "warn", "abort")      # aau_mpi.watchdog.Watchdog
ON_RANK_LOSS = ("abort", "continue")              # aau_mpi.survivors, faults.on_rank_loss
