"""aau_mpi: decentralized, asynchronous deep-learning training on MPI (DSGD-AAU).

    import aau_mpi
    ctx = aau_mpi.init()
    model = Net().to(ctx.device)
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         model, policy="aau", topology="ring")

Layers, bottom to top (each concept in one module; docs/api.md):
  transport      world (MPI start-up, device, job clock), header, mailbox (RMA windows),
                 depositor (the communication thread), control (job-wide words on rank 0)
  algorithms     policies, topology, stragglers, schedule, optim (lr schedules), checks:
                 pure decisions, no MPI, no torch
  optimizer      parameters (a model as one flat vector), events, watchdog, optimizer
                 (DecentralizedOptimizer), checkpointer
  application    train (the CLI trainer), config, datasets, models, evaluation, runlog,
                 checkpoint (HDF5 files)
  tools          plot, doctor, topology's CLI
"""

__version__ = "0.2.0"

from aau_mpi.checkpointer import Checkpointer
from aau_mpi.errors import UserError
from aau_mpi.optimizer import DecentralizedOptimizer, Iteration
from aau_mpi.policies import POLICIES, Policy, Selection, build_policy
from aau_mpi.schedule import Schedule
from aau_mpi.stragglers import build_straggler
from aau_mpi.topology import Graph, generate, load_topology
from aau_mpi.watchdog import Watchdog
from aau_mpi.world import World, init

__all__ = ["init", "World", "DecentralizedOptimizer", "Iteration", "Schedule", "Watchdog",
           "Checkpointer", "UserError", "Policy", "Selection", "POLICIES", "build_policy",
           "Graph", "generate", "load_topology", "build_straggler"]
