"""Who takes part in the job, and the means to reach them, built and closed together.

A `Membership` is collective over `base` (the job's communicator, or the
survivors' after a lost rank) and holds everything that depends on who takes
part: private communicators (the user's own collectives, on `job_comm` or the
world's, can never be started in a different order from ours), the mailbox
on the graph and its communication thread (gossip policies only), the
job-wide events, the metric averages and the loss detector.

After a lost rank, `survivors()` revokes it (ranks blocked in a collective
return), agrees on who is left and on what the job had counted, and builds
the survivors' Membership: the graph without the lost ranks, the policy for
it (its state reset: it described the old neighbours), new windows, the
job-wide events restored from what the survivors saw (the largest sample
count, training time and number of finished evaluations; an evaluation the
loss interrupted is skipped). The old one is abandoned, not closed: freeing
its windows and communicators would be collective with a dead member.
"""

import sys

from mpi4py import MPI

from aau_mpi.algorithms.graphs import without
from aau_mpi.algorithms.policies import build_policy
from aau_mpi.algorithms.schedule import Schedule
from aau_mpi.comm.depositor import Depositor, use_thread
from aau_mpi.comm.mailbox import Mailbox
from aau_mpi.comm.survivors import (LossDetector, StallGuard, explained_by_loss, revoke,
                                    shrink, ulfm_available)
from aau_mpi.base.errors import UserError
from aau_mpi.decentralized.collectives import wait_for
from aau_mpi.decentralized.device import select_device
from aau_mpi.decentralized.events import JobEvents, JobFailed
from aau_mpi.decentralized.metric_average import MetricAverages


class Membership:
    """Collective over `base`: the graph and this rank's policy on it, communicators,
    mailbox, thread, events, metrics and loss detector.

    originals: the original rank of each rank of `base`.
    watchdog, poll_cap: what watches this rank's waits; the longest sleep between polls.
    metrics_posted: the metric averages already posted (numbered on after a loss).
    lost: the loss that made this membership ({"ranks": original ranks, ...}), or None.
    """

    def __init__(self, base, originals, world, policy, graph, params, *, overlap, checksum,
                 schedule, on_evaluation, watchdog, poll_cap,
                 metrics_posted=0, lost=None):
        self._settings = dict(world=world, params=params, overlap=overlap, checksum=checksum,
                              schedule=schedule, on_evaluation=on_evaluation,
                              watchdog=watchdog, poll_cap=poll_cap)
        self.watchdog, self.poll_cap = watchdog, poll_cap
        self.base, self.originals, self.policy, self.graph = base, originals, policy, graph
        self.lost = lost
        self.rank, self.size = base.Get_rank(), base.Get_size()
        self.comm, self.events_comm, self.job_comm = base.Dup(), base.Dup(), base.Dup()
        self.metrics = MetricAverages(base.Dup(), metrics_posted)
        # Under ULFM a dead rank no longer ends the job by itself, and RMA never
        # reports one: the detector sees it, for either on_rank_loss mode, and
        # the guard ends an atomic call that waits for a lock the dead rank held.
        ulfm = ulfm_available()
        guard = StallGuard.for_process() if ulfm else None
        self.mailbox = self.depositor = None
        if policy.uses_mailbox:
            self.mailbox = Mailbox(self.comm, graph.in_neighbours(self.rank),
                                   graph.out_neighbours(self.rank), params.shared_numel,
                                   policy.slots_per_neighbour, world.clock, checksum, guard)
            self.depositor = Depositor(self.mailbox, use_thread(overlap, world, params.device),
                                       on_start=lambda: select_device(params.device))
        self.events = JobEvents(self.comm, schedule or Schedule(), world.clock,
                                lockstep=not policy.uses_mailbox, on_evaluation=on_evaluation,
                                barrier=self._evaluation_barrier, guard=guard)
        self.detector = LossDetector(base) if ulfm else None
        watchdog.bind(self.job_comm, self.rank)

    def check_for_loss(self):
        """Raise RankLost when the detector saw a rank of the job die."""
        if self.detector is not None:
            self.detector.check()

    def serve(self):
        """Between polls for neighbours: a lost rank, then the job-wide events."""
        self.check_for_loss()
        self.events.poll()

    def waiting_in(self, what, inspect=None):
        """Between polls in a collective: a lost rank, a rank that ended the job, then
        the watchdog."""
        self.check_for_loss()
        self.events.check_failed()
        self.watchdog.waiting(what, inspect)

    def explains(self, error):
        """Whether a lost rank explains `error` (an MPI error in disguise included)."""
        return explained_by_loss(error, (self.comm, self.events_comm, self.job_comm,
                                         self.metrics.comm, self.base), self.detector)

    def wait_all(self, request, what, inspect=None):
        """Complete a collective's request; the watchdog ends the job if a rank
        never arrives (nobody can go on without it), with `inspect()`'s report."""
        self.watchdog.reset()
        wait_for(request, lambda: self.waiting_in(what, inspect), self.poll_cap)
        self.watchdog.reset()

    def _evaluation_barrier(self, number):
        def inspect():
            missing = [self.originals[r] for r in self.events.control.not_reached(number)]
            report = (f"not in it yet: ranks {missing}" if missing else
                      "every rank reached it: one stopped inside it")
            return report, [], None
        self.wait_all(self.events_comm.Ibarrier(), f"evaluation {number}", inspect)

    def close(self):
        """Collective at the end of a job: the last deposit is done, every rank is here."""
        if self.depositor is not None:
            self.depositor.close()
            self.mailbox.close()
        self.events.close()
        if self.detector is not None:
            self.detector.close()
        for comm in (self.comm, self.events_comm, self.metrics.comm):
            comm.Free()

    # ---- a lost rank ---------------------------------------------------------

    def survivors(self):
        """Collective among the survivors of a lost rank: their Membership (see the
        module docstring); this one is revoked and left unfreed."""
        revoke(self.detector.comm, self.comm, self.events_comm, self.job_comm,
               self.metrics.comm, self.base)
        if self.depositor is not None:
            self.depositor.close()
        # Kept with this membership, which the optimizer keeps: the dropped averages'
        # buffers must outlive their abandoned requests.
        self.dropped = dropped = self.metrics.drop()
        if dropped:
            print(f"[rank {self.originals[self.rank]}] {len(dropped)} metric averages in "
                  f"flight dropped (a rank was lost): their MetricAverage.dropped is True",
                  file=sys.stderr, flush=True)
        events = self.events
        seen = (events.samples, events.training_seconds(), events.evaluations)
        base, lost = shrink(self.base)
        samples, seconds, evaluations = (base.allreduce(value, op=MPI.MAX) for value in seen)
        # What the lost ranks had counted: the job's count less the survivors' own.
        theirs = max(0, samples - base.allreduce(events.own_samples))
        graph = without(self.graph, lost)
        name, params = self.policy.spec
        policy = build_policy(name, graph, base.Get_rank(), params)
        lost_originals = [self.originals[r] for r in lost]
        survivors = Membership(
            base, [r for i, r in enumerate(self.originals) if i not in lost], policy=policy,
            graph=graph, metrics_posted=self.metrics.posted,
            lost={"ranks": lost_originals, "time": round(seconds, 6), "samples": samples,
                  "their_samples": theirs, "ranks_left": base.Get_size()},
            **self._settings)
        survivors.events.preempted = events.preempted
        survivors.events.restore(events.own_samples, seconds, evaluations, samples)
        if survivors.rank == 0:
            print(f"[rank {survivors.originals[0]}] ranks {lost_originals} lost at "
                  f"{seconds:.1f} s of training: going on with {survivors.size} ranks on "
                  f"{graph.name}", file=sys.stderr, flush=True)
        return survivors


class Survival:
    """Runs the optimizer's actions so that a lost rank is data the step handles.

    `run(action, *args)` is True when the action completed. When a rank of the
    job was lost (`is_loss(error)`, Membership.explains, says so) and the mode
    is continue, `recover()` rebuilds on the survivors and False comes back:
    the caller decides whether to run its action again; in mode abort the
    loss ends the job with one line. A rank that ended the job with an error
    (`failed()` names it: under ULFM it dies so that the others see it) is
    not survived.

    Only the outermost run recovers: a loss inside an evaluation that a step
    serves unwinds the whole step, on every rank alike, so that no rank
    retries the evaluation while the others train on (the restored events
    skip it: its evaluation point has passed).
    """

    def __init__(self, mode, recover, is_loss, failed):
        self.mode, self.recover, self.is_loss, self.failed = mode, recover, is_loss, failed
        self._depth = 0

    def run(self, action, *args):
        if self._depth:
            action(*args)
            return True
        self._depth += 1
        try:
            action(*args)
            return True
        except Exception as error:  # noqa: BLE001 (only a lost rank is survived)
            if not self.is_loss(error):
                raise
            try:
                failed = self.failed()
            except MPI.Exception:  # the record is on a lost rank 0 another node held
                failed = None
            if failed is not None:  # that rank ended the job with an error, and died
                raise JobFailed(failed) from None
            if self.mode != "continue":
                raise UserError("a rank of the job was lost: ending the job (faults."
                                "on_rank_loss: continue keeps the survivors training, under "
                                "mpirun --with-ft ulfm)") from None
        finally:
            self._depth -= 1
        self.recover()
        return False
