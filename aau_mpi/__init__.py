"""aau_mpi: decentralized, asynchronous deep-learning training on MPI (DSGD-AAU).

    import aau_mpi
    ctx = aau_mpi.init()
    model = Net().to(ctx.device)
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         model, policy="aau", topology="ring")

Layers, bottom to top (each concept in one module; docs/api.md):
  transport      world (MPI start-up, device, job clock), header, mailbox (RMA windows),
                 depositor (the communication thread), control (job-wide words on rank 0),
                 settings (their allowed values, importable without MPI)
  algorithms     policies, topology, stragglers, schedule, optim (lr schedules), checks:
                 pure decisions, no MPI, no torch
  optimizer      parameters (a model as one flat vector), events, watchdog, optimizer
                 (DecentralizedOptimizer), metric_average (its average_metric), lr_scheduler
                 (ProgressLR), checkpointer
  application    train (the CLI trainer), config, datasets, models, evaluation, runlog,
                 checkpoint (HDF5 files)
  tools          plot, doctor, simulate (virtual-time, no MPI), topology's CLI
"""

__version__ = "0.2.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so
# that `python -m aau_mpi.topology`, `aau_mpi.plot` or reading a checkpoint
# never starts MPI or imports torch.
_EXPORTS = {
    "init": "world", "World": "world",
    "DecentralizedOptimizer": "optimizer", "Iteration": "optimizer",
    "MetricAverage": "metric_average",
    "ProgressLR": "lr_scheduler",
    "Schedule": "schedule", "Watchdog": "watchdog", "Checkpointer": "checkpointer",
    "UserError": "errors",
    "Policy": "policies", "Selection": "policies", "POLICIES": "policies",
    "build_policy": "policies",
    "Graph": "topology", "generate": "topology", "load_topology": "topology",
    "build_straggler": "stragglers",
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
