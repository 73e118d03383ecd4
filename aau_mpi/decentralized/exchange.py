"""What a step exchanges with the other ranks, chosen once: `Gossip` or `GradientAllreduce`.

Both have one face for `DecentralizedOptimizer.step()`:

    closure = exchange.before_step(k, record, closure)   # wait, then mix or average
    ... the wrapped optimizer's local step ...
    exchange.deposit(k + 1, record)                      # gossip: x_{k+1} starts out
    exchange.after_step()                                # gossip: watch silent neighbours

`Gossip` (spec section 3): poll the mailbox until the policy selects
neighbours' deposits, mix them into x, and deposit x for the out-neighbours
(on the communication thread while the user's loop computes). `GradientAllreduce`
(the synchronous baseline): average every rank's gradients before the local step.

`Iteration` is the record of one step that both fill in (the trainer's
per-iteration metrics). An exchange never reaches back into the optimizer: the clocks and what to do
while waiting (`serve`: watch for a lost rank, serve job-wide events;
`wait_all`: a collective's wait under the watchdog) are handed to it.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from aau_mpi.comm.mailbox import Backoff
from aau_mpi.decentralized.parameters import DepositSource
from aau_mpi.decentralized.watchdog import neighbour_report

# A waiting rank re-runs its policy when a version word moved, or at least
# this often (a stalled neighbour skipped by the watchdog changes nothing
# in the window).
RESELECT_SECONDS = 0.01


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
    delay: float = 0.0            # straggler (or emulated accelerator) sleep, in compute_seconds
    overran: bool = False         # the real work outlasted the emulated accelerator's step
    copy_seconds: float = 0.0     # the deposit's snapshot of x, its device-to-host copy (on
                                  # the communication thread) + the mix's host-to-device ones
    control_seconds: float = 0.0  # counting the step's samples, job-wide events included
    time: float = 0.0             # training clock at the end of the step
    averaged: list = field(default_factory=list)   # ranks whose deposits were mixed
    staleness: list = field(default_factory=list)  # k - their deposits' iterations
    step_scale: float = 1.0


class Gossip:
    """Wait for the policy's selection, mix the neighbours' deposits into x, deposit x.

    policy, graph, rank: this rank's decisions and edges (the membership's);
    mailbox, depositor:  the windows and the communication thread;
    params:              the flat parameters (x is `params.shared`);
    clock:               the job clock of the mailbox headers (World.clock);
    now:                 training seconds (the Iteration record's times);
    serve:               called between polls (lost ranks, job-wide events);
    watchdog, poll_cap:  the stall watchdog; the longest sleep between polls.
    """

    def __init__(self, policy, graph, rank, mailbox, depositor, params, *, clock, now, serve,
                 watchdog, poll_cap):
        self.policy, self.graph, self.rank = policy, graph, rank
        self.mailbox, self.depositor, self.params = mailbox, depositor, params
        self.clock, self.now, self.serve = clock, now, serve
        self.watchdog, self.poll_cap = watchdog, poll_cap
        self._mix = torch.empty_like(params.shared)
        self._incoming = torch.empty_like(params.shared)
        self._outgoing = DepositSource(params.shared, depositor.threaded)

    def describe(self):
        """How deposits run and what each carries, in words (for the start-up line)."""
        mode = ("deposits overlapped on a communication thread" if self.depositor.threaded
                else "deposits inline (no MPI_THREAD_MULTIPLE, or overlap off)")
        numel = self.params.shared_numel
        return mode, f"{numel:,} values ({4 * numel / 2**20:.1f} MiB) per deposit"

    # ---- before the step: select and mix -------------------------------------

    def before_step(self, k, record, closure):
        waiting = self.now()
        selection = self._select(k)
        record.wait_seconds = self.now() - waiting
        mixing = self.now()
        self._mix_selection(k, selection, record)
        record.mix_seconds = self.now() - mixing
        record.step_scale = self.policy.step_scale()
        return closure

    def _select(self, k):
        """Poll until the policy selects. Between polls the policy is asked again only
        when a deposit landed (a version word moved), when its rule depends on the
        clock, or every RESELECT_SECONDS: one version read per slot, not a header
        snapshot and a decision, is what a waiting rank costs its node."""
        backoff = Backoff(cap=self.poll_cap)
        seen, asked = None, -float("inf")
        while True:
            versions = self.mailbox.versions()
            now = self.clock()
            if (seen is None or self.policy.time_dependent or now - asked >= RESELECT_SECONDS
                    or (versions != seen).any()):
                seen, asked = versions, now
                selection = self.policy.select(self.mailbox.headers(), k, now)
                if selection is not None:
                    return selection
            backoff.wait()
            self.serve()
            self.watchdog.waiting(None, self._inspect_neighbours, self.policy.synchronous)

    def _inspect_neighbours(self):
        headers = self.mailbox.headers()
        report, stalled = neighbour_report(headers, self.policy.last_seq,
                                           self.mailbox.in_neighbours, self.clock())
        return report, stalled, lambda which: self.policy.skip(which, headers)

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
                if self.params.device.type == "cpu":
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
        if self.params.device.type == "cpu":
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

    # ---- after the step: deposit ----------------------------------------------

    def deposit(self, k, record=None, done=False, wait=False):
        """Start depositing x_k (on the communication thread, unless done or `wait`).

        The deposit in flight reads the previous snapshot: it finishes before
        the next snapshot is taken (at most one in flight), and `record` gets
        its times."""
        started = self.now()
        self.depositor.wait()
        if record is not None:
            record.deposit_wait_seconds = self.now() - started
            record.deposit_seconds = self.depositor.busy_seconds - self.depositor.before_seconds
            record.copy_seconds += self.depositor.before_seconds
        self.policy.deposited(self.clock())
        targets = self.mailbox.out_neighbours if done else self.graph.active_out(self.rank, k)
        snapshot = self.now()
        payload, before = self._outgoing.take()
        if record is not None:
            record.copy_seconds += self.now() - snapshot
        self.depositor.submit(before=before, payload=payload, iteration=k,
                              slot=self.policy.deposit_slot(k), done=done, targets=targets)
        if done or wait:
            self.depositor.wait()

    def after_step(self):
        """For policies that never wait, the watchdog's only chance to see a stall."""
        if self.watchdog.seconds is None or self.policy.waits:
            return
        headers = self.mailbox.headers()
        silent = self.watchdog.observe(headers["seq"].sum(axis=1), self.policy.done(headers))
        if silent:
            report, _ = neighbour_report(headers, self.policy.last_seq,
                                         self.mailbox.in_neighbours, self.clock())
            self.watchdog.act(f"rank {self.rank} heard nothing for {self.watchdog.seconds:g} s "
                              f"from some neighbours; {report}", silent,
                              lambda which: self.policy.skip(which, headers), must_end=False)


class GradientAllreduce:
    """The synchronous baseline: every rank's gradients averaged before each local step.

    comm, params: the membership's private communicator; the flat parameters.
    now:          training seconds; wait_all(request, what): a collective's wait.
    """

    def __init__(self, comm, params, *, now, wait_all):
        self.comm, self.params, self.now, self.wait_all = comm, params, now, wait_all
        self._grads = torch.empty(params.gradient_numel, dtype=torch.float32,
                                  device=params.device)
        self._host_grads = (self._grads.numpy() if params.device.type == "cpu" else
                            np.empty(params.gradient_numel, np.float32))

    def describe(self):
        return ("no deposits (gradient Allreduce)",
                f"{self.params.trainable_numel:,} gradient values per Allreduce")

    def before_step(self, k, record, closure):
        if closure is not None:
            return self._averaging(closure)
        waiting = self.now()
        self._average_gradients()
        record.wait_seconds = self.now() - waiting
        return None

    def deposit(self, k, record=None, done=False, wait=False):
        """Nothing to deposit: ranks meet in the Allreduce."""

    def after_step(self):
        """Nothing to watch: a missing rank shows in the Allreduce's wait."""

    def _average_gradients(self):
        self.params.gradients(self._grads)
        if self.params.device.type != "cpu":
            self._host_grads[:] = self._grads.cpu().numpy()
        self.wait_all(self.comm.Iallreduce(MPI.IN_PLACE, self._host_grads),
                      "the gradient Allreduce")
        self._host_grads /= self.comm.Get_size()
        if self.params.device.type != "cpu":
            self._grads.copy_(torch.from_numpy(self._host_grads))
        self.params.set_gradients(self._grads)

    def _averaging(self, closure):
        """Every evaluation of the closure averages all ranks' gradients and losses,
        so the wrapped optimizer (LBFGS's line search and stopping tests included)
        sees the same numbers, and evaluates as often, on every rank: each
        evaluation is a collective."""
        def averaged():
            loss = closure()
            self._average_gradients()
            total = np.array([loss.item() if torch.is_tensor(loss) else float(loss)])
            self.wait_all(self.comm.Iallreduce(MPI.IN_PLACE, total), "the loss Allreduce")
            mean = float(total[0]) / self.comm.Get_size()
            return loss.new_tensor(mean) if torch.is_tensor(loss) else mean
        return averaged
