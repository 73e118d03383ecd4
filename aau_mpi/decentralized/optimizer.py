"""DecentralizedOptimizer: decentralized training inside the user's own PyTorch loop.

    ctx = aau_mpi.init()
    model = Net().to(ctx.device)
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         model, policy="aau", topology="ring", batch_size=64)
    while not opt.should_stop():
        x, y = next(batches)
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.finish()                 # collective: the model now holds the average of all ranks

It wraps any torch optimizer (like torch.distributed's PostLocalSGDOptimizer
or Horovod's DistributedOptimizer) and runs spec section 3 around its step:

    deposit(x_k)  -- on a communication thread, while the user's loop
                     computes the gradient at x_k (aau_mpi.comm.depositor)
    step():  wait until the policy selects (serving job-wide events and the
             watchdog meanwhile); x <- mix(x, neighbours' deposits); the
             wrapped optimizer's step (lr times the policy's step scale);
             k += 1; deposit(x_{k+1}) starts. With a closure (LBFGS) the
             wrapped step evaluates it after the mix, at the mixed x;
             allreduce averages each evaluation's gradients and loss.

It is a torch.optim.Optimizer (torch's set-up ran: step, state-dict and
global hooks fire) whose param_groups, state and defaults are the wrapped
optimizer's. Settings that every rank must share are checked at
construction, with the model, in one allgather.

The model's parameters and floating buffers live in one flat tensor on the
model's device (aau_mpi.decentralized.parameters): the mix and the step happen there.
Only its communicated part (`params.shared`: the trainable parameters and
the persistent floating buffers) is deposited, mixed and averaged; frozen
parameters and non-persistent buffers (a causal mask) stay as they are. On
a GPU, one device-to-host copy per deposit (asynchronous, on its own stream,
into pinned memory) and one host-to-device copy per neighbour payload mixed;
gradients never leave the device except for the allreduce baseline.

Layers: the mailbox (transport) knows nothing of policies; the policy
(pure decisions) knows nothing of MPI or torch; this class joins them around
a torch model, and the trainer (aau_mpi.train) is one user of it.
"""

import atexit
import sys
import tempfile
import time
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from aau_mpi.base import checks
from aau_mpi.comm.depositor import Depositor, use_thread
from aau_mpi.base.errors import UserError
from aau_mpi.decentralized.events import JobEvents
from aau_mpi.comm.mailbox import Backoff, Mailbox
from aau_mpi.decentralized.metric_average import MetricAverages
from aau_mpi.decentralized.parameters import LAYOUT, DepositSource, FlatParameters
from aau_mpi.algorithms.policies import Policy, build_policy
from aau_mpi.algorithms.schedule import PREEMPTED, Schedule
from aau_mpi.base.settings import ON_RANK_LOSS
from aau_mpi.algorithms.stragglers import Straggler, build_straggler, slow_down
from aau_mpi.comm.survivors import (LossDetector, RankLost, errors_return, is_rank_loss, revoke,
                               shrink, ulfm_available, unsupported_reason)
from aau_mpi.algorithms.graphs import Graph, without
from aau_mpi.algorithms.topology import load_topology
from aau_mpi.decentralized.watchdog import Watchdog, neighbour_report
from aau_mpi.comm.world import install_abort_hook
from aau_mpi.decentralized.device import current_world

# Every microsecond between a deposit (or a collective's completion) and
# this rank noticing it adds to the iteration: poll at least every 0.1 ms
# (a 1 ms cap made LeNet iterations on digits 1.6x slower, for every policy,
# 4 ranks on 2 cores). Ranks oversubscribed beyond 2 per core poll less
# often, with the square of the excess: there, a waiting rank's polls take
# the core that the neighbour it waits for needs, and every one of its many
# neighbours polls too. 64 ranks on 2 cores (32 per core) spent 94 % of
# their time waiting with a 1.6 ms cap, most of the cores' time in polls
# (~40 us each); an iteration there takes over 100 ms anyway.
POLL_CAP = 1e-4
# A waiting rank re-runs its policy when a version word moved, or at least
# this often (a stalled neighbour skipped by the watchdog changes nothing
# in the window).
RESELECT_SECONDS = 0.01

# The optimizers of this process that finish() has not closed: one that took a
# step and is still here at exit left its model unaveraged (_report_unfinished).
_UNFINISHED = weakref.WeakSet()


@dataclass
class Iteration:
    """What one step did: the policy's visible behaviour and the time split, per rank."""
    iteration: int
    started: float                # training clock when the step was called
    compute_seconds: float        # since the previous step returned (the user's loop), + delay
    wait_seconds: float           # waiting for the policy to select, or in the Allreduce
    deposit_seconds: float        # the previous deposit, on the communication thread
    deposit_wait_seconds: float   # this thread blocked on that deposit before the next
    mix_seconds: float            # mixing, including its host-to-device copies
    step_seconds: float           # the wrapped optimizer's step
    delay: float = 0.0            # straggler sleep (part of compute_seconds)
    copy_seconds: float = 0.0     # the deposit's snapshot of x, its device-to-host copy (on
                                  # the communication thread) + the mix's host-to-device ones
    control_seconds: float = 0.0  # counting the step's samples, job-wide events included
    time: float = 0.0             # training clock at the end of the step
    averaged: list = field(default_factory=list)   # ranks whose deposits were mixed
    staleness: list = field(default_factory=list)  # k - their deposits' iterations
    step_scale: float = 1.0


def wait_for(request, idle=None, cap=POLL_CAP):
    """Complete a non-blocking MPI request, calling `idle` while it is pending.

    Waiting in Test rather than in a blocking call lets the caller serve
    events and watch for a rank that never arrives.
    """
    backoff = Backoff(cap=cap)
    while not request.Test():
        backoff.wait()
        if idle:
            idle()


def _resolve_topology(topology, size):
    if isinstance(topology, Graph):
        if topology.n != size:
            raise UserError(f"topology {topology.name} has {topology.n} nodes but the job has "
                            f"{size} ranks: build it for {size} ranks")
        return topology
    return load_topology(topology, size)


def _resolve_policy(policy, graph, rank):
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        params = {key: value for key, value in policy.items() if key != "name"}
        return build_policy(policy.get("name", "aau"), graph, rank, params)
    return build_policy(policy, graph, rank)


def _describe_policy(policy):
    """A policy as the user named it: "aau", "aau(tau=8)", or a Policy's class name."""
    if not hasattr(policy, "spec"):
        return type(policy).__name__
    name, params = policy.spec
    if not params:
        return name
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in sorted(params.items()))})"


def _rank_list(ranks):
    """[0, 2, 3, 4, 5] -> "0,2-5": runs of three or more ranks as a range."""
    runs = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}"
                    for a, b in runs)


def _who_passes(values):
    """"rank 0,2,3 aau, rank 1 dpsgd": which ranks pass which value (rank i passed
    values[i]). A (name, digest) value reads as its name, with the digest where
    two values share a name."""
    ranks = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    names = [value[0] if isinstance(value, tuple) else value for value in ranks]
    if len(set(names)) < len(names):
        names = [" #".join(map(str, value)) if isinstance(value, tuple) else value
                 for value in ranks]
    return ", ".join(f"rank {_rank_list(who)} {name}" for who, name in zip(ranks.values(), names))


@atexit.register
def _report_unfinished():
    """At exit: a rank that stepped and never called finish() leaves with its own model,
    not the average of all ranks, and exits 0: say so (not after an uncaught
    exception, which is the news then)."""
    if hasattr(sys, "last_value"):
        return
    for opt in list(_UNFINISHED):
        if opt.last is not None:
            print(f"warning: rank {opt.original_rank} exited without opt.finish() after "
                  f"{opt.iteration} steps: its model is its own, never averaged with the "
                  f"other ranks': call model = opt.finish() after the loop, on every rank",
                  file=sys.stderr, flush=True)


def _resolve_straggler(stragglers, rank, size):
    if isinstance(stragglers, Straggler):
        return stragglers
    if stragglers is None:
        return build_straggler("none", rank, size)
    if isinstance(stragglers, dict):
        params = {key: value for key, value in stragglers.items() if key != "name"}
        return build_straggler(stragglers.get("name", "none"), rank, size, params)
    return build_straggler(stragglers, rank, size)


class DecentralizedOptimizer(torch.optim.Optimizer):
    """A torch optimizer that trains decentralized: see the module docstring and docs/api.md.

    Collective to build (every rank, same arguments), in `load_state_dict`
    (before the first step only), `averaged()` (inside on_evaluation only)
    and `finish()`; `step()` and `average_metric()` are not collective.

    optimizer:   any torch.optim optimizer over `model`'s parameters.
    model:       the rank's torch module, already on its device.
    policy:      "aau" | "dpsgd" | "async" | "async_one" | "fixed_k" | "allreduce",
                 a dict {"name": ..., **params}, or a Policy.
    topology:    a generator name ("ring", "exponential_one_peer", ...), a dict,
                 a topology YAML path, or a Graph for the job's size.
    world:       from aau_mpi.init() (default: the one it made).
    batch_size:  samples per step, counted against the schedule's sample budget.
    schedule:    aau_mpi.Schedule(sample_budget=, time_budget=, eval_samples=,
                 eval_seconds=): the global stop and evaluation points.
    on_evaluation: called as on_evaluation(number) on every rank at each
                 evaluation point, possibly from inside step() while waiting
                 (the model in train mode); collectives inside must use
                 `averaged()` or communicators other than the optimizer's own.
    stragglers:  a straggler model (name, dict or Straggler): experiments only.
    watchdog:    seconds of waiting before a stall is reported (None: off), or
                 a Watchdog.
    checkpoints: an aau_mpi.Checkpointer: HDF5 checkpoints of every rank.
    checksum:    crc32 every deposit and verify every read (soak tests).
    overlap:     "thread": deposit on a communication thread while the loop computes
                 (needs MPI_THREAD_MULTIPLE, else inline); "inline"; "auto": a
                 thread on GPU ranks and where the node has 2+ cores per rank.
    on_iteration: called with each step's Iteration record (metrics).
    handle_signals: SIGTERM / SIGUSR1 make should_stop() true on every rank.
    """

    def __init__(self, optimizer, model, *, policy="aau", topology="ring", world=None,
                 batch_size=1, schedule=None, on_evaluation=None, stragglers=None,
                 watchdog=300.0, checkpoints=None, checksum=False, overlap="auto",
                 on_iteration=None, handle_signals=True, on_rank_loss="abort"):
        world = world or current_world()
        if world is None:
            install_abort_hook()  # so that this error is one line and ends the job
            raise UserError("aau_mpi.init() was not called: call ctx = aau_mpi.init() first, "
                            "then build the model on ctx.device and the optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"DecentralizedOptimizer wraps a torch.optim optimizer, got "
                            f"{type(optimizer).__name__}: pass e.g. torch.optim.SGD(model."
                            f"parameters(), lr=0.1)")
        self.world, self.optimizer, self.model = world, optimizer, model
        self._init_torch_optimizer()
        self.original_rank = world.rank
        self.on_rank_loss = self._rank_loss_mode(on_rank_loss, world)
        # The job's communicator (the survivors' after a lost rank), whose
        # errors return instead of aborting when lost ranks are survived.
        self._base = world.comm.Dup()
        if self.on_rank_loss == "continue":
            errors_return(self._base)
        self.rank, self.size = self._base.Get_rank(), self._base.Get_size()
        self._overlap = overlap
        self._checksum, self._schedule, self._on_evaluation = checksum, schedule, on_evaluation
        self.graph = _resolve_topology(topology, self.size)
        self.policy = _resolve_policy(policy, self.graph, self.rank)
        if self.on_rank_loss == "continue" and not hasattr(self.policy, "spec"):
            raise UserError("on_rank_loss=continue rebuilds the policy for the survivors' graph: "
                            "pass policy= as a name or a dict, or build it with "
                            "aau_mpi.build_policy")
        self.straggler = _resolve_straggler(stragglers, self.rank, self.size)
        self.watchdog = watchdog if isinstance(watchdog, Watchdog) else Watchdog(watchdog)
        self.batch_size = int(batch_size)
        self.on_iteration = on_iteration
        self.checkpoints = checkpoints
        self.lost_ranks = []  # {"ranks": original ranks, "time": training seconds, ...} per loss
        self._surviving_depth = 0
        self._originals = list(range(self.size))  # original rank of each current rank
        self._abandoned = []  # a lost rank's windows and communicators, kept unfreed

        self.params = FlatParameters(model)
        self._check_optimizer_covers_model()
        self._check_agreement(self._base)
        self._broadcast_initial_model()
        self.device = self.params.device
        self.poll_cap = POLL_CAP * max(1.0, world.local_size / (2 * world.cores_per_node)) ** 2
        self.k = 0
        self._stepped = False  # load_state_dict is refused after the first step
        self.closed = False
        self.last = None
        self._warned = set()  # the silent traps already reported (_warn_once)
        if self.policy.uses_mailbox:
            self._mix = torch.empty_like(self.params.shared)
            self._incoming = torch.empty_like(self.params.shared)
        else:
            self._grads = torch.empty(self.params.gradient_numel, dtype=torch.float32,
                                      device=self.device)
            self._host_grads = (self._grads.numpy() if self.device.type == "cpu" else
                                np.empty(self.params.gradient_numel, np.float32))
        self._connect()
        if handle_signals:
            self.events.handle_signals()
        if checkpoints is not None:
            checkpoints.attach(self)
        self._deposit()
        self._returned_at = self._now()
        _UNFINISHED.add(self)

    def _warn_once(self, trap, message):
        """One line on stderr, the first time this optimizer meets `trap`."""
        if trap not in self._warned:
            self._warned.add(trap)
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _select_device(self):
        """The communication thread's first call: CUDA's current device is per thread,
        and a thread that never sets it opens a context on GPU 0 (every rank's)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _rank_loss_mode(self, on_rank_loss, world):
        checks.choice("on_rank_loss", on_rank_loss, ON_RANK_LOSS)
        reason = unsupported_reason() if on_rank_loss == "continue" else None
        if reason:
            if world.rank == 0:
                print(f"warning: {reason}", file=sys.stderr, flush=True)
            return "abort"
        return on_rank_loss

    def _connect(self, events_state=None):
        """Collective over self._base: everything that depends on who takes part.

        Private communicators (the user's own collectives, on `job_comm` or
        the world's, can never be started in a different order from ours), the
        mailbox on the graph, the communication thread, the job-wide events
        (restarted from `events_state` after a lost rank), the metric
        averages (numbered on from the posts before) and the loss detector.
        """
        base = self._base
        self.comm, self._events_comm, self.job_comm = base.Dup(), base.Dup(), base.Dup()
        previous_metrics = getattr(self, "_metrics", None)
        self._metrics = MetricAverages(base.Dup(),
                                       previous_metrics.posted if previous_metrics else 0)
        self.watchdog.bind(self.job_comm, self.rank)
        self.mailbox = self.depositor = None
        if self.policy.uses_mailbox:
            self.mailbox = Mailbox(self.comm, self.graph.in_neighbours(self.rank),
                                   self.graph.out_neighbours(self.rank), self.params.shared_numel,
                                   self.policy.slots_per_neighbour, self.world.clock,
                                   self._checksum)
            self.depositor = Depositor(self.mailbox,
                                       use_thread(self._overlap, self.world, self.device),
                                       on_start=self._select_device)
            self._outgoing = DepositSource(self.params.shared, self.depositor.threaded)
        previous = getattr(self, "events", None)
        self.events = JobEvents(self.comm, self._schedule or Schedule(), self.world.clock,
                                lockstep=not self.policy.uses_mailbox,
                                on_evaluation=self._on_evaluation,
                                barrier=lambda: self._wait_all(self._events_comm.Ibarrier(),
                                                               "an evaluation"))
        if previous is not None:
            self.events.preempted = previous.preempted
            self.events.restore(*events_state)
        # Under ULFM a dead rank no longer ends the job by itself, and RMA never
        # reports one: the detector sees it, for either mode.
        self.detector = LossDetector(base) if ulfm_available() else None

    # ---- set-up checks -------------------------------------------------------

    def _check_optimizer_covers_model(self):
        wrapped = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if not wrapped <= {id(p) for p in self.params.params}:
            raise UserError("the torch optimizer updates tensors that are not the model's "
                            "parameters: build it from model.parameters() of the model you pass")

    def _check_agreement(self, comm):
        """Collective, one allgather: every rank must train the same architecture, with
        the same parameters frozen (the mailbox holds what each rank trains), and
        the same settings. A rank with another policy reads misaligned slots, one
        with another topology deposits where nobody reads, and neither ends before
        the watchdog does: refuse at once, naming the first setting that differs."""
        shapes = tuple((tuple(p.shape), p.requires_grad) for p in self.params.params)
        graph = self.graph
        mine = {"model": (self.params.numel, self.params.shared_numel, hash(shapes)),
                "policy": _describe_policy(self.policy),
                "mailbox slots per neighbour": self.policy.slots_per_neighbour,
                # (name, digest of the edges): O(1) per rank, where the mailbox's own
                # check gathers neighbour lists
                "topology": (graph.name, zlib.crc32(repr((graph.directed, graph.edges)).encode())),
                "batch size": self.batch_size,
                "checksum": bool(self._checksum)}
        everyone = comm.allgather(mine)
        models = {theirs["model"] for theirs in everyone}
        if len(models) > 1:
            numels = sorted({(n, shared) for n, shared, _ in models})
            raise UserError(f"ranks built different models ({len(models)} kinds; "
                            f"(values, communicated values) {numels}): build the same model, "
                            f"with the same parameters frozen, on every rank")
        for setting in mine:
            values = [theirs[setting] for theirs in everyone]
            if len(set(values)) > 1:
                raise UserError(f"ranks disagree on {setting}: {_who_passes(values)}: "
                                f"pass the same settings on every rank")

    def _broadcast_initial_model(self):
        """Spec section 3: x_0 identical on every rank (rank 0's)."""
        host = self.params.host_copy()
        self._base.Bcast(host, root=0)
        if self.params.device.type != "cpu":
            self.params.load_(host)

    # ---- the torch.optim.Optimizer face ------------------------------------

    def _init_torch_optimizer(self):
        """torch.optim.Optimizer's own set-up: the step, state-dict and load hooks
        (this optimizer's and torch's global ones) and the profiler's step wrapper.
        It assigns a fresh `state` and `param_groups` and adds the groups given;
        here those are the wrapped optimizer's (the properties below), which then
        gets its own list of groups and its state back."""
        groups, state = self.optimizer.param_groups, self.optimizer.state
        super().__init__(groups, self.optimizer.defaults)
        self.optimizer.param_groups, self.optimizer.state = groups, state

    # One param_groups, state and defaults: the wrapped optimizer's, so that a
    # scheduler or GradScaler on either optimizer sets what the wrapped step uses.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def deposit_mode(self):
        """How deposits run here, in words (for the start-up line)."""
        if self.depositor is None:
            return "no deposits (gradient Allreduce)"
        return ("deposits overlapped on a communication thread" if self.depositor.threaded
                else "deposits inline (no MPI_THREAD_MULTIPLE, or overlap off)")

    def communicated(self):
        """What each deposit (or gradient Allreduce) carries, in words (for the start-up line)."""
        params = self.params
        if self.depositor is None:
            sent = f"{params.trainable_numel:,} gradient values per Allreduce"
        else:
            sent = (f"{params.shared_numel:,} values ({4 * params.shared_numel / 2**20:.1f} MiB) "
                    f"per deposit")
        local = params.numel - params.shared_numel
        return sent + (f", {local:,} frozen or non-persistent values kept local" if local else "")

    def __repr__(self):
        return (f"DecentralizedOptimizer({type(self.optimizer).__name__}, policy "
                f"{type(self.policy).__name__}, {self.graph.name}, rank {self.rank}/{self.size})")

    # ---- progress --------------------------------------------------------------

    def _now(self):
        return self.events.training_seconds()

    @property
    def iteration(self):
        return self.k

    @property
    def samples(self):
        """Samples used by all ranks together, as this rank last saw them."""
        return self.events.samples

    @property
    def schedule(self):
        """The Schedule it was built with (None without one)."""
        return self._schedule

    def progress(self):
        """Fraction of the schedule's budget used (a learning-rate schedule's x axis)."""
        return self.events.progress()

    def training_seconds(self):
        return self.events.training_seconds()

    def should_stop(self):
        """True once the job-wide stop was reached: the budget is used, the time is
        up, or a preemption signal arrived (then `preempted` is True too)."""
        if self.rank == 0 and not (self._schedule and self._schedule.budgeted):
            self._warn_once("no budget", "should_stop() never becomes true without a budget "
                            "(only a preemption signal ends the loop): pass schedule=aau_mpi."
                            "Schedule(sample_budget=...) or time_budget=..., or end the loop "
                            "yourself")
        return self.events.stopped

    @property
    def preempted(self):
        return self.events.reason == PREEMPTED

    # ---- one step -----------------------------------------------------------

    def _check_open(self):
        if self.closed:
            raise UserError("the DecentralizedOptimizer is closed (finish() was called): "
                            "build a new one to train again")
        if not self.params.views_intact():
            raise UserError("the model's parameters were moved or replaced after the "
                            "DecentralizedOptimizer was built (e.g. model.to() or "
                            "load_state_dict(assign=True)): move the model to its device "
                            "before wrapping it, and load weights with copy semantics")
        if not self.params.frozen_unchanged():
            raise UserError("a parameter that was frozen (requires_grad=False) when the "
                            "DecentralizedOptimizer was built requires grad now: it would "
                            "train on each rank without being averaged; call finish() and "
                            "build a new DecentralizedOptimizer to change what is trained")

    def step(self, closure=None):
        """One iteration (spec section 3), after the user's backward pass.

        With a closure (LBFGS), the wrapped optimizer evaluates it after the mix,
        at the mixed model, as often as it needs; step() returns its loss.
        """
        self._check_open()
        self._stepped = True
        if (closure is None and "no gradients" not in self._warned
                and all(p.grad is None for group in self.param_groups for p in group["params"])):
            self._warn_once("no gradients", f"rank {self.rank}: step() found no gradients "
                            f"(every .grad is None) and mixes and counts its samples all the "
                            f"same: call loss.backward() before opt.step()")
        started = self._now()
        compute = started - self._returned_at
        delay = slow_down(self.straggler, compute, started)
        self.policy.computed(compute + delay)
        record = Iteration(self.k, started, compute + delay, 0.0, 0.0, 0.0, 0.0, 0.0,
                           delay=delay)
        # A lost rank found while waiting: the survivors rebuild, and this step
        # starts over on their graph (nothing of it was applied yet).
        result = {}
        while not self._surviving(self._update, record, closure, result):
            record.averaged, record.staleness = [], []
        self._surviving(self._after_update, record)
        self._returned_at = self._now()
        return result["loss"]

    def _update(self, record, closure, result):
        """Wait for the policy, mix, take the local step, start the next deposit."""
        k = self.k
        record.iteration = k
        waiting = self._now()
        if self.mailbox:
            selection = self._select(k)
            record.wait_seconds = self._now() - waiting
            mixing = self._now()
            self._mix_selection(k, selection, record)
            record.mix_seconds = self._now() - mixing
            record.step_scale = self.policy.step_scale()
        elif closure is None:
            self._average_gradients()
            record.wait_seconds = self._now() - waiting
        else:
            closure = self._averaging(closure)
        stepping = self._now()
        result["loss"] = self._local_step(record.step_scale, closure)
        record.step_seconds = self._now() - stepping
        self.k += 1
        self._deposit(record=record)

    def _after_update(self, record):
        """Count the samples (job-wide events), watch the neighbours, report, checkpoint."""
        counting = self._now()
        self.events.count(self.batch_size)
        record.control_seconds = self._now() - counting
        self.watchdog.reset()
        self._check_for_loss()
        self._metrics.progress()
        if self.mailbox:
            self._watch_silent_neighbours()
        record.time = self._now()
        self.last = record
        if self.on_iteration is not None:
            self.on_iteration(record)
        if self.checkpoints is not None and not self.events.stopped and self.checkpoints.due():
            self.checkpoints.write()

    def _select(self, k):
        """Poll until the policy selects. Between polls the policy is asked again only
        when a deposit landed (a version word moved), when its rule depends on the
        clock, or every RESELECT_SECONDS: one version read per slot, not a header
        snapshot and a decision, is what a waiting rank costs its node."""
        backoff = Backoff(cap=self.poll_cap)
        seen, asked = None, -float("inf")
        while True:
            versions = self.mailbox.versions()
            now = self.world.clock()
            if (seen is None or self.policy.time_dependent or now - asked >= RESELECT_SECONDS
                    or (versions != seen).any()):
                seen, asked = versions, now
                selection = self.policy.select(self.mailbox.headers(), k, now)
                if selection is not None:
                    return selection
            backoff.wait()
            self._check_for_loss()
            self.events.poll()
            self.watchdog.waiting(None, self._inspect_neighbours, self.policy.synchronous)

    def _inspect_neighbours(self):
        headers = self.mailbox.headers()
        report, stalled = neighbour_report(headers, self.policy.last_seq,
                                           self.mailbox.in_neighbours, self.world.clock())
        return report, stalled, lambda which: self.policy.skip(which, headers)

    def _watch_silent_neighbours(self):
        """For policies that never wait, the watchdog's only chance to see a stall."""
        if self.watchdog.seconds is None or self.policy.waits:
            return
        headers = self.mailbox.headers()
        silent = self.watchdog.observe(headers["seq"].sum(axis=1), self.policy.done(headers))
        if silent:
            report, _ = neighbour_report(headers, self.policy.last_seq,
                                         self.mailbox.in_neighbours, self.world.clock())
            self.watchdog.act(f"rank {self.rank} heard nothing for {self.watchdog.seconds:g} s "
                              f"from some neighbours; {report}", silent,
                              lambda which: self.policy.skip(which, headers), must_end=False)

    def _mix_selection(self, k, selection, record):
        flat, mix, incoming = self.params.shared, self._mix, self._incoming
        with torch.no_grad():
            torch.mul(flat, selection.self_weight, out=mix)
            used = []
            for (j, slot), weight in zip(selection.slots, selection.weights):
                got = self.mailbox.read(j, slot, out=self._copier(weight, record))
                if got is None:  # every copy overlapped a write: its weight stays with x
                    mix.add_(flat, alpha=weight)
                    continue
                if self.device.type == "cpu":
                    mix.add_(incoming)
                else:
                    mix.add_(incoming, alpha=weight)
                used.append((j, slot, got[0]))
                record.averaged.append(self.mailbox.in_neighbours[j])
                record.staleness.append(int(k - got[0]["iteration"]))
            flat.copy_(mix)
        self.policy.mixed(used, k)

    def _copier(self, weight, record):
        """How a neighbour's payload leaves the window: scaled into the host buffer on
        the CPU (one pass), copied to the device on a GPU (one host-to-device copy,
        which returns once the source is read: the seqlock's second check follows)."""
        incoming = self._incoming
        if self.device.type == "cpu":
            def copy(source):
                torch.mul(torch.from_numpy(source), weight, out=incoming)
                return incoming
        else:
            def copy(source):
                started = time.perf_counter()
                incoming.copy_(torch.from_numpy(source))
                record.copy_seconds += time.perf_counter() - started
                return incoming
        return copy

    def _average_gradients(self):
        """The allreduce baseline: average the gradients of all ranks (watched)."""
        self.params.gradients(self._grads)
        if self.device.type != "cpu":
            self._host_grads[:] = self._grads.cpu().numpy()
        self._wait_all(self.comm.Iallreduce(MPI.IN_PLACE, self._host_grads),
                       "the gradient Allreduce")
        self._host_grads /= self.size
        if self.device.type != "cpu":
            self._grads.copy_(torch.from_numpy(self._host_grads))
        self.params.set_gradients(self._grads)

    def _averaging(self, closure):
        """The allreduce baseline's closure: every evaluation averages all ranks'
        gradients and losses, so the wrapped optimizer (LBFGS's line search and
        stopping tests included) sees the same numbers, and evaluates as often,
        on every rank: each evaluation is a collective."""
        def averaged():
            loss = closure()
            self._average_gradients()
            total = np.array([loss.item() if torch.is_tensor(loss) else float(loss)])
            self._wait_all(self.comm.Iallreduce(MPI.IN_PLACE, total), "the loss Allreduce")
            mean = float(total[0]) / self.size
            return loss.new_tensor(mean) if torch.is_tensor(loss) else mean
        return averaged

    def _local_step(self, scale, closure):
        """The wrapped optimizer's step at its lr times `scale`; returns what it returns
        (the closure's loss). Steps that take no closure are called without one."""
        step = (self.optimizer.step if closure is None
                else lambda: self.optimizer.step(closure))
        if scale == 1.0:
            return step()
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        try:
            return step()
        finally:
            for group, rate in zip(self.optimizer.param_groups, rates):
                group["lr"] = rate

    def _deposit(self, done=False, record=None):
        """Start depositing x_k (on the communication thread, unless done).

        The deposit in flight reads the previous snapshot: it finishes before
        the next snapshot is taken (at most one in flight), and `record` gets
        its times."""
        if self.mailbox is None:
            return
        started = self._now()
        self.depositor.wait()
        if record is not None:
            record.deposit_wait_seconds = self._now() - started
            record.deposit_seconds = self.depositor.busy_seconds - self.depositor.before_seconds
            record.copy_seconds += self.depositor.before_seconds
        self.policy.deposited(self.world.clock())
        deposit = dict(iteration=self.k, slot=self.policy.deposit_slot(self.k), done=done,
                       targets=self.mailbox.out_neighbours if done
                       else self.graph.active_out(self.rank, self.k))
        snapshot = self._now()
        payload, before = self._outgoing.take()
        if record is not None:
            record.copy_seconds += self._now() - snapshot
        self.depositor.submit(before=before, payload=payload, **deposit)
        if done:
            self.depositor.wait()

    # ---- waiting for every rank --------------------------------------------

    def _wait_all(self, request, what):
        """Complete a collective's request; the watchdog ends the job if a rank
        never arrives (nobody can go on without it)."""
        self.watchdog.reset()
        wait_for(request, lambda: self._waiting_in(what), self.poll_cap)
        self.watchdog.reset()

    def _waiting_in(self, what):
        self._check_for_loss()
        self.watchdog.waiting(what)

    def averaged(self):
        """Collective context manager, inside on_evaluation only: the model holds the
        average of all ranks' models inside the `with` block (`.own` is this rank's
        own communicated vector, `params.shared`), and its own again after it.

            def on_evaluation(number):
                with opt.averaged():
                    accuracy = evaluate(model)

        Anywhere else ranks are at different iterations, and a rank blocked
        here stops depositing while its neighbours wait for its next deposit:
        a deadlock. So it is refused there, on the rank that calls it.
        """
        if self.closed:
            raise UserError("averaged() after finish(): the model already holds the average "
                            "of all ranks: use it directly")
        if not self.events.evaluating:
            raise UserError("averaged() outside on_evaluation blocks until every rank calls "
                            "it while ranks are at different iterations (a deadlock): call it "
                            "inside the on_evaluation callback, or average a metric with "
                            "opt.average_metric(value), which never blocks")
        return _Averaged(self)

    def average_metric(self, value):
        """Average `value` (a number, array or tensor) over the ranks without blocking.

        Returns a MetricAverage at once; its `value` is the average of every
        rank's value posted as its same-numbered metric (each rank's k-th call
        pairs with the others' k-th), ready some steps after the last rank
        posted its own (`ready()`), and always after `finish()`. Not
        collective in time: call it anywhere in the loop (aau_mpi.decentralized.metric_average).
        """
        self._check_open()
        return self._metrics.post(value)

    def _average(self, comm, idle):
        own = self.params.shared.detach().clone()
        mine = own.cpu().numpy().astype(np.float64)
        total = np.empty_like(mine)
        wait_for(comm.Iallreduce(mine, total), idle, self.poll_cap)
        return own, torch.from_numpy((total / self.size).astype(np.float32))

    # ---- state ----------------------------------------------------------------

    def state_dict(self):
        """This rank's state: the wrapped optimizer's, the policy's, the straggler's,
        the rank's model (flat parameters and buffers, all of them, and their
        layout: decentralized ranks hold different models), the progress
        counters, and which rank of how many saved it. torch's state-dict hooks
        run around it."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {"rank": self.rank, "world_size": self.size,
                 "optimizer": self.optimizer.state_dict(),
                 "policy": self.policy.state_dict(),
                 "straggler": self.straggler.state_dict(),
                 "parameters": self.params.flat.detach().clone(),
                 "parameters_layout": LAYOUT,
                 "iteration": self.k,
                 "own_samples": self.events.own_samples,
                 "training_seconds": self.events.training_seconds(),
                 "evaluations": self.events.evaluations}
        for hook in self._optimizer_state_dict_post_hooks.values():
            changed = hook(self, state)
            state = state if changed is None else changed
        return state

    def load_state_dict(self, state):
        """Collective, before the first step: continue from `state_dict()` (this
        rank's, of the same job size, or one that `Checkpointer.restore_resized`
        made from another job size's). Another rank's state is refused, on every
        rank: it holds that rank's policy state (its neighbours) and sample count.
        torch's load-state-dict hooks run around it."""
        self._check_open()
        if self._stepped:
            raise UserError("load_state_dict() after step(): it is collective and ranks are "
                            "at different iterations: load the state on every rank before "
                            "the first step() (to resume, or use a Checkpointer)")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = hook(self, state)
            state = state if changed is None else changed
        origin = (state.get("rank", self.rank), state.get("world_size", self.size))
        foreign = self.comm.allreduce(int(origin != (self.rank, self.size)))
        if foreign:
            raise UserError(f"load_state_dict: {foreign} of {self.size} ranks got another "
                            f"rank's state_dict() (one rank's state loaded on every rank?): "
                            f"each rank loads its own, or a Checkpointer restores them; to "
                            f"start every rank from one saved model, load it into the model "
                            f"before wrapping it")
        # A state saved before the layout was recorded is of layout 1.
        self.params.load_(state["parameters"], state.get("parameters_layout", 1))
        self.optimizer.load_state_dict(state["optimizer"])
        self.policy.load_state_dict(state["policy"])
        self.straggler.load_state_dict(state["straggler"])
        self.k = int(state["iteration"])
        if self.policy.synchronous:
            # Ranks checkpoint a step or so apart; a synchronous policy
            # matches iteration numbers, so all continue from the largest.
            self.k = self.comm.allreduce(self.k, op=MPI.MAX)
        self.events.restore(int(state["own_samples"]), float(state["training_seconds"]),
                            int(state["evaluations"]))
        self._deposit()       # x_k, so that neighbours mix the restored model
        if self.depositor is not None:
            self.depositor.wait()
        self.comm.Barrier()   # every restored deposit is in place before anyone steps
        self._returned_at = self._now()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ---- the end ----------------------------------------------------------------

    def finish(self):
        """Collective: stop, average all ranks' models, checkpoint (if configured).

        A final deposit marked done comes first, so no neighbour waits for this
        rank while it waits here; until every rank is here it keeps serving
        evaluations. Returns the model, which then holds the average x_bar (of
        the survivors, after a lost rank) and every rank's largest count in its
        integer buffers (BatchNorm's num_batches_tracked): the same model on
        every rank. When the average holds NaN or inf (some rank's model
        does), no checkpoint is written; every rank saves its own last model
        (`_save_diverged`) and raises a UserError that says where.
        """
        self._check_open()
        result = {}

        def final():
            if self.mailbox:
                self._deposit(done=True)
            result["own"], result["average"] = self._average(self.comm,
                                                             self._serve_while_finishing)
            self._metrics.complete()  # every rank is here: none posts any more
            # The average is finite only where every rank's model is.
            if not torch.isfinite(result["average"]).all():
                result["diverged"] = self._save_diverged()
                return
            self._equal_counters(self.comm, self._serve_while_finishing)
            if self.checkpoints is not None:
                self.checkpoints.write(final=True)
        while not self._surviving(final):
            pass
        if "diverged" not in result:
            self.params.shared.copy_(result["average"])
        if self.mailbox:
            self.depositor.close()
            self.mailbox.close()
        self.events.close()
        if self.detector is not None:
            self.detector.close()
        for comm in (self.comm, self._events_comm, self._metrics.comm):
            comm.Free()
        self.closed = True
        _UNFINISHED.discard(self)
        if "diverged" in result:
            raise UserError(result["diverged"])
        return self.model

    def _equal_counters(self, comm, idle):
        """Collective: every integer buffer (BatchNorm's num_batches_tracked) takes the
        largest count of any rank. They count steps, so they are not averaged,
        but ranks take different numbers of steps and the final models must be
        one model."""
        counters = [owner._buffers[name] for owner, name in self.params.counters]
        if not counters:
            return
        mine = np.concatenate([c.detach().cpu().numpy().astype(np.int64).ravel()
                               for c in counters])
        largest = np.empty_like(mine)
        wait_for(comm.Iallreduce(mine, largest, op=MPI.MAX), idle, self.poll_cap)
        offset = 0
        for counter in counters:
            counter.copy_(torch.from_numpy(largest[offset:offset + counter.numel()])
                          .view_as(counter))
            offset += counter.numel()

    def _save_diverged(self):
        """Collective, when the average holds NaN or inf: every rank saves its own last
        model (its state_dict, torch.save) as rank-NNNNN.pt (its original rank) in
        a new folder diverged-<time>-<random> of the checkpointer's folder, or of
        the current one without a checkpointer; nothing there is overwritten.
        Returns the error's line."""
        base = self.checkpoints.root if self.checkpoints is not None else Path.cwd()
        folder = None
        if self.rank == 0:
            try:
                base.mkdir(parents=True, exist_ok=True)
                folder = Path(tempfile.mkdtemp(
                    prefix=f"diverged-{time.strftime('%Y%m%d-%H%M%S')}-", dir=base))
            except OSError as error:
                folder = " ".join(str(error).split())
        folder = self.comm.bcast(folder, root=0)
        problem = None
        if isinstance(folder, Path):
            try:
                torch.save({name: value.detach().cpu()
                            for name, value in self.model.state_dict().items()},
                           folder / f"rank-{self.original_rank:05d}.pt")
            except OSError as error:
                problem = " ".join(str(error).split())
        else:
            problem = folder
        finite = bool(torch.isfinite(self.params.shared).all())
        reports = self.comm.allgather((self.original_rank, finite, problem))
        bad = [rank for rank, finite, _ in reports if not finite]
        problems = [f"rank {rank}: {problem}" for rank, _, problem in reports if problem]
        saved = (f"each rank's last model is saved as {folder}/rank-NNNNN.pt "
                 f"(model.load_state_dict(torch.load(path)))" if not problems else
                 f"the ranks' last models could not be saved under {base} "
                 f"({'; '.join(problems)})")
        return (f"training diverged: rank(s) {bad} hold NaN or inf in their parameters, and so "
                f"does their average: {saved}; lower the learning rate")

    def _serve_while_finishing(self):
        self._check_for_loss()
        self.events.poll()
        self.watchdog.waiting("the final average")

    # ---- a lost rank ---------------------------------------------------------

    def _check_for_loss(self):
        if self.detector is not None:
            self.detector.check()

    def _surviving(self, action, *args):
        """Run `action`; True when it completed. When a rank of the job was lost
        (and on_rank_loss is continue), the survivors rebuild and False comes back:
        the caller decides whether to run its action again.

        Only the outermost call rebuilds: a loss inside an evaluation that a
        step serves unwinds the whole step, on every rank alike, so that no
        rank retries the evaluation while the others train on (the restored
        events skip it: its evaluation point has passed)."""
        if self._surviving_depth:
            action(*args)
            return True
        self._surviving_depth += 1
        try:
            action(*args)
            return True
        except Exception as error:  # noqa: BLE001 (only a lost rank is survived)
            if not (isinstance(error, RankLost) or is_rank_loss(error)):
                raise
            if self.on_rank_loss != "continue":
                raise UserError("a rank of the job was lost: ending the job (faults."
                                "on_rank_loss: continue keeps the survivors training, under "
                                "mpirun --with-ft ulfm)") from None
        finally:
            self._surviving_depth -= 1
        self._recover()
        return False

    def _recover(self):
        """Collective among the survivors: agree on who is left, rebuild, go on.

        Revoke what we communicate on (ranks blocked in a collective return),
        shrink the job's communicator, and rebuild on it: the graph without the
        lost ranks (aau_mpi.algorithms.graphs.without), the policy for it (its state
        reset: it described the old neighbours), new windows (the old ones are
        left, not freed: that would be collective with a dead member), the
        job-wide events from what the survivors saw (the largest sample count,
        training time and number of finished evaluations; an evaluation the
        loss interrupted is skipped), and a deposit of every survivor's
        current model. Synchronous policies go on from the largest iteration.
        """
        revoke(self.detector.comm, self.comm, self._events_comm, self.job_comm,
               self._metrics.comm, self._base)
        if self.depositor is not None:
            self.depositor.close()
        dropped = self._metrics.drop()
        self._abandoned.append((self.mailbox, self.events, self.detector, self.comm,
                                self._events_comm, self.job_comm, self._metrics.comm,
                                dropped, self._base))
        if dropped:
            print(f"[rank {self.original_rank}] {len(dropped)} metric averages in flight "
                  f"dropped (a rank was lost): their MetricAverage.dropped is True",
                  file=sys.stderr, flush=True)
        seen = (self.events.samples, self.events.training_seconds(), self.events.evaluations)
        originals = self._originals
        self._base, lost = shrink(self._base)
        self._originals = [r for i, r in enumerate(originals) if i not in lost]
        self.rank, self.size = self._base.Get_rank(), self._base.Get_size()
        samples, seconds, evaluations = (self._base.allreduce(value, op=MPI.MAX)
                                         for value in seen)
        # What the lost ranks had counted: the job's count less the survivors' own.
        theirs = max(0, samples - self._base.allreduce(self.events.own_samples))
        self.graph = without(self.graph, lost)
        self.policy = build_policy(*self.policy.spec[:1], self.graph, self.rank,
                                   self.policy.spec[1])
        if self.policy.synchronous:
            self.k = self._base.allreduce(self.k, op=MPI.MAX)
        self._connect(events_state=(self.events.own_samples, seconds, evaluations, samples))
        lost = [originals[r] for r in lost]
        self.lost_ranks.append({"ranks": lost, "time": round(seconds, 6), "samples": samples,
                                "their_samples": theirs, "ranks_left": self.size})
        if self.checkpoints is not None:
            self.checkpoints.reconnect()
        if self.rank == 0:
            print(f"[rank {self.original_rank}] ranks {lost} lost at {seconds:.1f} s of "
                  f"training: going on with {self.size} ranks on {self.graph.name}",
                  file=sys.stderr, flush=True)
        self.watchdog.reset()
        self._deposit()


class _Averaged:
    """`with opt.averaged() as averaged:` the model holds x_bar; `averaged.own` is x_i."""

    def __init__(self, opt):
        self.opt = opt
        self.own = None

    def __enter__(self):
        opt = self.opt
        result = {}

        def average():
            result["own"], result["average"] = opt._average(
                opt._events_comm, lambda: opt._waiting_in("an average"))
        while not opt._surviving(average):
            pass
        self.own = result["own"]
        opt.params.shared.copy_(result["average"])
        return self

    def __exit__(self, *exc):
        self.opt.params.shared.copy_(self.own)
        return False
