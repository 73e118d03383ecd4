"""The job configuration's typed sections: what a job config holds, with defaults.

    mpirun -n 4 python -m aau_mpi.train --config jobs/demo.yaml policy.name=dpsgd optim.lr=0.05

Every section is optional (defaults below). Component sections name a
registered component and write its parameters flat beside the name:

    policy: {name: aau, tau: 4, gamma: 0.5}
    topology: {name: torus, rows: 4}          # or {file: topologies/ring.yaml}
    data: {name: digits, batch_size: 32, partition: {name: dirichlet, alpha: 0.3}}
    optim: {lr: 0.05, schedule: {name: step, milestones: [0.5, 0.75]}}
    budget: {epochs: 10}                      # epochs, samples and/or seconds
    emulate: {step_seconds: 0.05, jitter: 0.1}  # an emulated accelerator's step

aau_mpi.training.config_loading reads a YAML file and command-line overrides
into these sections and validates them. Config.to_dict() / to_yaml() give the
resolved configuration back in the same form; config_from_dict(cfg.to_dict()) == cfg.
"""

import copy
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from aau_mpi.algorithms.learning_rate import SCHEDULES, LearningRate
from aau_mpi.algorithms.policies import POLICIES
from aau_mpi.algorithms.schedule import Schedule
from aau_mpi.algorithms.stragglers import STRAGGLERS
from aau_mpi.algorithms.graphs import GENERATORS
from aau_mpi.base.registry import Registry
from aau_mpi.training.datasets import DATASETS
from aau_mpi.training.models import MODELS
from aau_mpi.training.partitions import PARTITIONS


# ------------------------------------------------------------------ schema

@dataclass(frozen=True)
class _Kind:
    """A registry of components, as a config section sees it."""
    registry: Registry
    skip: int      # leading positional arguments the caller supplies (graph, rank, ...)
    default: str


POLICY = _Kind(POLICIES, 2, "aau")
TOPOLOGY = _Kind(GENERATORS, 1, "ring")
DATASET = _Kind(DATASETS, 0, "digits")
PARTITION = _Kind(PARTITIONS, 3, "iid")
MODEL = _Kind(MODELS, 2, "mlp")
SCHEDULE = _Kind(SCHEDULES, 0, "constant")
STRAGGLER = _Kind(STRAGGLERS, 2, "none")


@dataclass
class Component:
    """A registered component: its name and the parameters the config sets (others default)."""
    name: str
    params: dict = field(default_factory=dict)


@dataclass
class TopologyConfig:
    """A generator (name + params) or a topology YAML file; file set means name is None."""
    name: str = TOPOLOGY.default
    file: str = None
    params: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = DATASET.default
    params: dict = field(default_factory=dict)
    batch_size: int = 32
    partition: Component = field(default_factory=lambda: Component(PARTITION.default))
    eval_batch_size: int = 1000


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: Component = field(default_factory=lambda: Component(SCHEDULE.default))
    warmup: float = 0.0
    scale_lr: str = "none"           # none | linear | sqrt: lr times (global batch / reference)
    reference_batch: int = None      # the batch lr is tuned for (default: data.batch_size)
    clip_grad_norm: float = None     # clip each step's local gradient to this norm (None: off)

    def learning_rate(self, global_batch=None, batch_size=None):
        """The lr schedule; with scale_lr, lr scaled for `global_batch` samples per round
        of all ranks against reference_batch (default `batch_size`)."""
        return LearningRate(self.lr, self.schedule.name, self.schedule.params, self.warmup,
                            scaling=self.scale_lr, global_batch=global_batch,
                            reference_batch=self.reference_batch or batch_size)


@dataclass
class BudgetConfig:
    """Training stops at the first limit reached; epochs and samples count all ranks together."""
    epochs: float = None
    samples: int = None
    seconds: float = None


@dataclass
class EvalConfig:
    every_seconds: float = None
    every_epochs: float = None
    max_samples: int = None          # evaluate on at most this many test samples
    target_accuracy: float = None
    # Each rank's own model on the whole test set (rank_accuracy in eval.jsonl):
    # N times the work of the averaged model's evaluation, whose test set the
    # ranks split. False at many ranks per core or frequent evaluations.
    rank_models: bool = True


@dataclass
class EmulateConfig:
    """An emulated accelerator (aau_mpi/algorithms/emulation.py): each step's compute
    phase lasts step_seconds (x 1 +- jitter, x the straggler's slowdown), sleeping
    out what the real work leaves. step_seconds None: real compute only."""
    step_seconds: float = None
    jitter: float = 0.0


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_seconds: float = 300.0
    every_iterations: int = None
    keep: int = 2


@dataclass
class WatchdogConfig:
    """Report a rank that waits longer than `seconds` for its neighbours (None: off).

    action: auto (asynchronous policies go on without the stalled neighbours,
    synchronous ones abort the job), warn (report only), abort (always).
    """
    seconds: float = 300.0
    action: str = "auto"


@dataclass
class FaultsConfig:
    on_rank_loss: str = "abort"      # continue: the survivors go on (Open MPI --with-ft ulfm)


@dataclass
class MailboxConfig:
    checksum: bool = False           # crc32 every deposit, verify every read
    overlap: str = "auto"            # thread | inline | auto (aau_mpi.comm.depositor)


@dataclass
class OutputConfig:
    dir: str = "runs"
    trace: bool = False
    progress: bool = True


@dataclass
class Config:
    name: str = None
    seed: int = 0
    device: str = "auto"
    policy: Component = field(default_factory=lambda: Component(POLICY.default))
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Component = field(default_factory=lambda: Component(MODEL.default))
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    stragglers: Component = field(default_factory=lambda: Component(STRAGGLER.default))
    emulate: EmulateConfig = field(default_factory=EmulateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Notes about the input (ignored parameters): not part of the config itself.
    warnings: list = field(default_factory=list, compare=False, repr=False)

    def to_dict(self):
        """Plain mapping in schema order, components flat: loads back to an equal Config."""
        return _to_plain(self)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def dataset_params(self, folder):
        """The dataset's parameters for a run in `folder`: a generated dataset (one that
        takes a `cache` folder, as mnist1d does) is made from the job's seed into
        folder/data unless the config sets them."""
        params = dict(self.data.params)
        if "cache" in DATASETS.params(self.data.name):
            params.setdefault("seed", self.seed)
            params.setdefault("cache", str(Path(folder) / "data"))
        return params

    def schedule(self, train_size):
        """The stop and evaluation points for a training set of `train_size` samples."""
        budget, every = self.budget, self.eval
        return Schedule(
            sample_budget=budget.samples or (round(budget.epochs * train_size)
                                             if budget.epochs else None),
            time_budget=budget.seconds,
            eval_samples=round(every.every_epochs * train_size) if every.every_epochs
            else None,
            eval_seconds=every.every_seconds)


def _to_plain(section):
    plain = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if not f.compare:
            continue  # Config.warnings
        if f.name == "params":
            plain.update(copy.deepcopy(value))  # component parameters are written flat
        elif is_dataclass(value):
            plain[f.name] = _to_plain(value)
        else:
            plain[f.name] = value
    return plain
