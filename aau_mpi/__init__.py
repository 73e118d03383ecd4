"""aau_mpi: decentralized, asynchronous deep-learning training on MPI (DSGD-AAU).

    import aau_mpi
    ctx = aau_mpi.init()
    model = Net().to(ctx.device)
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         model, policy="aau", topology="ring")

Layers, bottom to top, one folder each (docs/architecture.md; a module imports
only its own folder or those below it, and comm and algorithms never each other):
  base           errors, checks, registries, allowed setting values
  comm           transport: world, header, mailbox (RMA windows), control, depositor, survivors
  algorithms     pure decisions: policies, stragglers, emulation, schedule, graphs, topology,
                 learning_rate
  decentralized  DecentralizedOptimizer and what it composes (exchange, membership,
                 collectives, parameters, events, watchdog, device, checkpoints)
  training       the trainer's components: config, datasets, models, evaluation, runlog,
                 and the simulator's engine (simulation)
  commands       train, simulate, plot, doctor, topology (python -m aau_mpi.X), and
                 checkpoint (aau_mpi.checkpoint.load_model)
"""

__version__ = "0.2.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so
# that `python -m aau_mpi.topology`, `aau_mpi.plot` or reading a checkpoint
# never starts MPI or imports torch.
_EXPORTS = {
    "init": "decentralized.device", "World": "comm.world",
    "DecentralizedOptimizer": "decentralized.optimizer", "Iteration": "decentralized.exchange",
    "MetricAverage": "decentralized.metric_average",
    "ProgressLR": "decentralized.lr_scheduler",
    "Schedule": "algorithms.schedule", "Watchdog": "decentralized.watchdog",
    "Checkpointer": "decentralized.checkpointer",
    "UserError": "base.errors",
    "Policy": "algorithms.policies", "Selection": "algorithms.policies",
    "POLICIES": "algorithms.policies", "build_policy": "algorithms.policies",
    "Graph": "algorithms.graphs", "generate": "algorithms.graphs",
    "load_topology": "algorithms.topology",
    "build_straggler": "algorithms.stragglers",
    "EmulatedAccelerator": "algorithms.emulation",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aau_mpi' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"aau_mpi.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
