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
wait for the policy and mix the neighbours' deposits into x (or average the
gradients, for allreduce), the wrapped optimizer's step, k += 1, deposit x.
It is a torch.optim.Optimizer (torch's set-up ran: step, state-dict and
global hooks fire) whose param_groups, state and defaults are the wrapped
optimizer's.

It composes (docs/architecture.md walks one step through them): the flat
parameters (parameters.py: only `params.shared`, the trainable parameters
and persistent floating buffers, is communicated), an exchange chosen once
(exchange.py: `Gossip` through the mailbox, or `GradientAllreduce`), a
membership (membership.py: graph, policy, communicators, mailbox, thread,
events, loss detector; rebuilt on the survivors after a lost rank) and
collectives that never block a rank (collectives.py). This class keeps the
torch face, the iteration, the state and `finish`; the trainer
(aau_mpi.train) is one user of it.
"""

import atexit
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from mpi4py import MPI

from aau_mpi.algorithms.schedule import PREEMPTED
from aau_mpi.algorithms.stragglers import slow_down
from aau_mpi.base.errors import UserError
from aau_mpi.comm.survivors import errors_return
from aau_mpi.decentralized import arguments, collectives
from aau_mpi.decentralized.device import current_world
from aau_mpi.decentralized.exchange import Gossip, GradientAllreduce, Iteration
from aau_mpi.decentralized.membership import Membership, Survival
from aau_mpi.decentralized.parameters import LAYOUT, FlatParameters
from aau_mpi.decentralized.watchdog import Watchdog

# The optimizers of this process that finish() has not closed: one that took a
# step and is still here at exit left its model unaveraged (_report_unfinished).
_UNFINISHED = weakref.WeakSet()


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


def scaled_step(optimizer, scale, closure):
    """The wrapped optimizer's step at its lr times `scale` (the policy's step scale);
    returns what it returns (the closure's loss). Steps that take no closure are
    called without one."""
    step = optimizer.step if closure is None else lambda: optimizer.step(closure)
    if scale == 1.0:
        return step()
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
    try:
        return step()
    finally:
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate


@contextmanager
def lbfgs_history_follows_the_mix(optimizer):
    """Around the mix: LBFGS's next curvature pair is (s, y) = (d * t, g - prev_flat_grad),
    its own last move against the gradient change since prev_flat_grad. The mix also
    moves x, a move LBFGS did not take: unless s carries it, y (which does) is paired
    with the wrong displacement and the next step can blow up (at 4 ranks under aau a
    rank's loss reached 188x its starting value). So the mix's move is added to d as mix / t, which
    makes d * t the whole move since prev_flat_grad (d and t are LBFGS's state-dict
    entries). Other optimizers keep no such pair: nothing is done for them."""
    state = (optimizer.state[optimizer.param_groups[0]["params"][0]]
             if isinstance(optimizer, torch.optim.LBFGS) else {})
    if not torch.is_tensor(state.get("d")) or not state.get("t"):
        yield
        return
    params = optimizer.param_groups[0]["params"]
    before = torch.cat([p.detach().reshape(-1) for p in params])
    yield
    moved = torch.cat([p.detach().reshape(-1) for p in params]).sub_(before)
    state["d"] = state["d"].add(moved, alpha=1.0 / float(state["t"]))


def _wrapped(name):
    """A property that reads and sets the wrapped optimizer's attribute `name`."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value))


class DecentralizedOptimizer(torch.optim.Optimizer):
    """A torch optimizer that trains decentralized, wrapping `optimizer` over `model` (the
    rank's module, already on its device). Every argument, its default and what it
    accepts: docs/api.md, `DecentralizedOptimizer(optimizer, model, **options)`, the
    one list of them.

    Collective to build (every rank, same arguments), in `load_state_dict`
    (before the first step only), `averaged()` (inside on_evaluation only)
    and `finish()`; `step()` and `average_metric()` are not collective.
    """

    def __init__(self, optimizer, model, *, policy="aau", topology="ring", world=None,
                 batch_size=1, schedule=None, on_evaluation=None, stragglers=None,
                 watchdog=300.0, checkpoints=None, checksum=False, overlap="auto",
                 on_iteration=None, handle_signals=True, on_rank_loss="abort", emulate=None):
        world = world or current_world()
        arguments.check_wrapped(world, optimizer)
        self.world, self.optimizer, self.model = world, optimizer, model
        self._init_torch_optimizer()
        self.original_rank = world.rank
        self.on_rank_loss = arguments.rank_loss_mode(on_rank_loss, world)
        # The job's communicator (the survivors' after a lost rank), whose
        # errors return instead of aborting when lost ranks are survived.
        base = world.comm.Dup()
        if self.on_rank_loss == "continue":
            errors_return(base)
        rank, size = base.Get_rank(), base.Get_size()
        self._schedule = schedule
        graph = arguments.resolve_topology(topology, size)
        policy = arguments.resolve_policy(policy, graph, rank, self.on_rank_loss)
        self.straggler = arguments.resolve_straggler(stragglers, rank, size)
        self.emulator = arguments.resolve_emulation(emulate, rank)
        self.watchdog = watchdog if isinstance(watchdog, Watchdog) else Watchdog(watchdog)
        self.batch_size = int(batch_size)
        self.on_iteration = on_iteration
        self.checkpoints = checkpoints
        self.lost_ranks = []  # {"ranks": original ranks, "time": training seconds, ...} per loss
        self._survival = Survival(self.on_rank_loss, self._recover,
                                  lambda error: self.membership.explains(error),
                                  lambda: self.membership.events.control.read_failed())
        self._abandoned = []  # (membership, exchange) that lost a rank, kept unfreed

        self.params = FlatParameters(model)
        arguments.check_covers_model(optimizer, self.params)
        collectives.check_agreement(base, self.params, policy, graph, self.batch_size, checksum)
        collectives.broadcast_initial_model(base, self.params)
        self.device = self.params.device
        self.poll_cap = collectives.poll_cap(world)
        self.k = 0
        self.closed = False
        self.last = None      # the last step's Iteration; None before the first step
        self._warned = set()  # the silent traps already reported (_warn_once)
        self._join(Membership(base, list(range(size)), world, policy, graph, self.params,
                              overlap=overlap, checksum=checksum, schedule=schedule,
                              on_evaluation=on_evaluation, watchdog=self.watchdog,
                              poll_cap=self.poll_cap))
        if handle_signals:
            self.events.handle_signals()
        if checkpoints is not None:
            checkpoints.attach(self)
        self.exchange.deposit(self.k)
        self._returned_at = self._now()
        _UNFINISHED.add(self)

    def _join(self, membership):
        """Train with these ranks: the watchdog on their communicator, the exchange over them."""
        self.membership = membership
        if self.policy.uses_mailbox:
            self.exchange = Gossip(self.policy, self.graph, self.rank, self.mailbox,
                                   self.depositor, self.params, clock=self.world.clock,
                                   now=self._now, serve=membership.serve, watchdog=self.watchdog,
                                   poll_cap=self.poll_cap)
        else:
            self.exchange = GradientAllreduce(self.comm, self.params, now=self._now,
                                              wait_all=membership.wait_all)

    # Who takes part and how to reach them: the membership's, under the names
    # users and the trainer read.
    rank = property(lambda self: self.membership.rank)
    size = property(lambda self: self.membership.size)
    graph = property(lambda self: self.membership.graph)
    policy = property(lambda self: self.membership.policy)
    comm = property(lambda self: self.membership.comm)
    job_comm = property(lambda self: self.membership.job_comm)
    events = property(lambda self: self.membership.events)
    mailbox = property(lambda self: self.membership.mailbox)
    depositor = property(lambda self: self.membership.depositor)

    def _warn_once(self, trap, message):
        """One line on stderr, the first time this optimizer meets `trap`."""
        if trap not in self._warned:
            self._warned.add(trap)
            print(f"warning: {message}", file=sys.stderr, flush=True)

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
    param_groups = _wrapped("param_groups")
    state = _wrapped("state")
    defaults = _wrapped("defaults")

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def deposit_mode(self):
        """How deposits run here, in words (for the start-up line)."""
        return self.exchange.describe()[0]

    def communicated(self):
        """What each deposit (or gradient Allreduce) carries, in words (for the start-up line)."""
        local = self.params.numel - self.params.shared_numel
        return self.exchange.describe()[1] + (
            f", {local:,} frozen or non-persistent values kept local" if local else "")

    def __repr__(self):
        return (f"DecentralizedOptimizer({type(self.optimizer).__name__}, policy "
                f"{type(self.policy).__name__}, {self.graph.name}, rank {self.rank}/{self.size})")

    # ---- progress --------------------------------------------------------------

    def _now(self):
        return self.events.training_seconds()

    iteration = property(lambda self: self.k)
    samples = property(lambda self: self.events.samples,
                       doc="Samples used by all ranks together, as this rank last saw them.")
    schedule = property(lambda self: self._schedule,
                        doc="The Schedule it was built with (None without one).")
    preempted = property(lambda self: self.events.reason == PREEMPTED)

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

    # ---- one step -----------------------------------------------------------

    def _check_open(self):
        if self.closed:
            raise UserError("the DecentralizedOptimizer is closed (finish() was called): "
                            "build a new one to train again")
        arguments.check_model_unchanged(self.params)

    def step(self, closure=None):
        """One iteration (spec section 3), after the user's backward pass.

        With a closure (LBFGS), the wrapped optimizer evaluates it after the mix,
        at the mixed model, as often as it needs; step() returns its loss.
        """
        self._check_open()
        if (closure is None and "no gradients" not in self._warned
                and all(p.grad is None for group in self.param_groups for p in group["params"])):
            self._warn_once("no gradients", f"rank {self.rank}: step() found no gradients "
                            f"(every .grad is None) and mixes and counts its samples all the "
                            f"same: call loss.backward() before opt.step()")
        started = self._now()
        compute = started - self._returned_at
        overran = False
        if self.emulator is not None:
            paced = [0.0, False]  # what is left of it if a lost rank cut the step short
            self._survival.run(self._pace, compute, started, paced)
            delay, overran = paced
        else:
            delay = slow_down(self.straggler, compute, started)
        self.policy.computed(compute + delay)
        record = Iteration(self.k, started, compute + delay, 0.0, 0.0, 0.0, 0.0, 0.0,
                           delay=delay, overran=overran)
        # A lost rank found while waiting: the survivors rebuild, and this step
        # starts over on their graph (nothing of it was applied yet).
        result = {}
        while not self._survival.run(self._update, record, closure, result):
            record.averaged, record.staleness = [], []
        self._survival.run(self._after_update, record)
        self._returned_at = self._now()
        return result["loss"]

    def _pace(self, compute, started, paced):
        """The emulated device's rest of the step. Meanwhile the host serves the job's
        events: an evaluation joins at once, x is this step's (it changes only
        in _update), and no rank waits at its barrier for another's step."""
        paced[:] = self.emulator.pace(compute, self.straggler, started, clock=self._now,
                                      idle=self.membership.serve)

    def _update(self, record, closure, result):
        """Exchange before the step, the local step, k += 1, deposit x_k."""
        record.iteration = self.k
        with lbfgs_history_follows_the_mix(self.optimizer):
            closure = self.exchange.before_step(self.k, record, closure)
        stepping = self._now()
        result["loss"] = scaled_step(self.optimizer, record.step_scale, closure)
        record.step_seconds = self._now() - stepping
        self.k += 1
        self.exchange.deposit(self.k, record)

    def _after_update(self, record):
        """Count the samples (job-wide events), watch the neighbours, report, checkpoint."""
        counting = self._now()
        self.events.count(self.batch_size)
        record.control_seconds = self._now() - counting
        self.watchdog.reset()
        self.membership.check_for_loss()
        self.membership.metrics.progress()
        self.exchange.after_step()
        record.time = self._now()
        self.last = record
        if self.on_iteration is not None:
            self.on_iteration(record)
        if self.checkpoints is not None and not self.events.stopped and self.checkpoints.due():
            self.checkpoints.write()

    # ---- collectives inside the loop ---------------------------------------------

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
        # Every rank passed the evaluation's barrier: a rank missing here stopped inside it.
        report = ("every rank is in this evaluation: one stopped inside it", [], None)
        return collectives.Averaged(self._survival.run, self.params, lambda: (
            collectives.global_average(self.membership.events_comm, self.params,
                                       lambda: self.membership.waiting_in("an average",
                                                                          lambda: report),
                                       self.poll_cap)))

    def average_metric(self, value):
        """Average `value` (a number, array or tensor) over the ranks without blocking.

        Returns a MetricAverage at once; its `value` is the average of every
        rank's value posted as its same-numbered metric (each rank's k-th call
        pairs with the others' k-th), ready some steps after the last rank
        posted its own (`ready()`), and always after `finish()`. Not
        collective in time: call it anywhere in the loop (decentralized/metric_average.py).
        """
        self._check_open()
        return self.membership.metrics.post(value)

    # ---- state ----------------------------------------------------------------

    def state_dict(self):
        """This rank's state: the wrapped optimizer's, the policy's, the straggler's
        (and the emulated accelerator's),
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
                 "emulator": self.emulator.state_dict() if self.emulator else None,
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
        made from another job size's); another rank's state is refused. torch's load-state-dict hooks run around it."""
        self._check_open()
        if self.last is not None:
            raise UserError("load_state_dict() after step(): it is collective and ranks are "
                            "at different iterations: load the state on every rank before "
                            "the first step() (to resume, or use a Checkpointer)")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = hook(self, state)
            state = state if changed is None else changed
        collectives.check_own_state(self.comm, state)
        # A state saved before the layout was recorded is of layout 1.
        self.params.load_(state["parameters"], state.get("parameters_layout", 1))
        self.optimizer.load_state_dict(state["optimizer"])
        self.policy.load_state_dict(state["policy"])
        self.straggler.load_state_dict(state["straggler"])
        if self.emulator is not None and state.get("emulator") is not None:
            self.emulator.load_state_dict(state["emulator"])
        self.k = int(state["iteration"])
        if self.policy.synchronous:
            # Ranks checkpoint a step or so apart; a synchronous policy
            # matches iteration numbers, so all continue from the largest.
            self.k = self.comm.allreduce(self.k, op=MPI.MAX)
        self.events.restore(int(state["own_samples"]), float(state["training_seconds"]),
                            int(state["evaluations"]))
        self.exchange.deposit(self.k, wait=True)  # x_k: neighbours mix the restored model
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
        (collectives.save_diverged) and raises a UserError that says where.
        """
        self._check_open()
        result = {}

        def serve():
            self.membership.serve()
            self.watchdog.waiting("the final average")

        def final():
            self.exchange.deposit(self.k, done=True)
            result["own"], result["average"] = collectives.global_average(
                self.comm, self.params, serve, self.poll_cap)
            self.membership.metrics.complete()  # every rank is here: none posts any more
            # The average is finite only where every rank's model is.
            if not torch.isfinite(result["average"]).all():
                if self.checkpoints is not None:
                    self.checkpoints.settle()  # nothing may still be deleting there
                result["diverged"] = collectives.save_diverged(
                    self.comm, self.model, self.params, self.original_rank,
                    self.checkpoints.root if self.checkpoints is not None else Path.cwd())
                return
            collectives.equal_counters(self.comm, self.params, serve, self.poll_cap)
            if self.checkpoints is not None:
                self.checkpoints.write(final=True)
        while not self._survival.run(final):
            pass
        if "diverged" not in result:
            self.params.shared.copy_(result["average"])
        self.membership.close()
        self.closed = True
        _UNFINISHED.discard(self)
        if "diverged" in result:
            raise UserError(result["diverged"])
        return self.model

    # ---- a lost rank ---------------------------------------------------------

    def _recover(self):
        """Collective among the survivors: agree on who is left, rebuild, go on
        (membership.py says how); synchronous policies go on from the largest
        iteration, and every survivor deposits its current model."""
        # Both kept: a revoked request may still reference their buffers.
        self._abandoned.append((self.membership, self.exchange))
        self._join(self.membership.survivors())
        if self.policy.synchronous:
            self.k = self.comm.allreduce(self.k, op=MPI.MAX)
        self.lost_ranks.append(self.membership.lost)
        if self.checkpoints is not None:
            self.checkpoints.reconnect()
        self.watchdog.reset()
        self.exchange.deposit(self.k)
