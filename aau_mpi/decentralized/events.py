"""Job-wide events for one rank: the global sample count, evaluations, the stop.

Evaluation needs every rank (an average is a collective), and the stop must
reach every rank, yet no rank may block in a collective while a neighbour
waits for its next deposit: that neighbour would never reach the
collective. So events are announced through the event word of the control
window on rank 0 (`aau_mpi.comm.control`, encoding in `aau_mpi.algorithms.schedule`) and
every rank serves them in the same order: after a step, and also while it
waits (for neighbours, or in the final average), so a rank blocked on a
neighbour that is already in an evaluation joins it from its wait loop. The
stop is only taken after a step. While `on_evaluation` runs, `evaluating` is
true: the one point where every rank is at the same event, so the only
place where the optimizer allows a blocking collective (`averaged()`).

The counter is batched: a rank adds its samples and reads the event word
when it holds more than its share (1/N) of BUDGET_SHARE of the sample
budget, or when FLUSH_SHARE of the training time so far has passed since
its last flush (at least FLUSH_SECONDS), not every step. So all ranks
together hold at most BUDGET_SHARE of the budget unreported, and a stop or
an evaluation is seen within FLUSH_SHARE of the elapsed time: the budget is
overshot by under 1 %, and rank 0's control words see a bounded rate of
round trips. With the budget growing with the ranks (the same work per
rank), a rank's round trips per step do not grow with N. A waiting rank
polls no more often than every N / WAITING_POLL_RATE seconds, so all
waiting ranks together cost rank 0 a bounded rate at any N too.

Lock-step ranks (the allreduce policy) must serve the same events after the
same step and take identical steps: they agree on the event word and on
the progress with a MAX-Allreduce after every step.

Training seconds exclude evaluation time: the clock that time budgets,
evaluation intervals, straggler models and learning-rate schedules read.
"""

import signal
import time

import numpy as np
from mpi4py import MPI

from aau_mpi.base.errors import UserError
from aau_mpi.comm.control import JobControl
from aau_mpi.comm.survivors import ulfm_available
from aau_mpi.comm.world import set_abort_notice
from aau_mpi.algorithms.schedule import RUNNING, Schedule, events_announced

FLUSH_SECONDS = 0.02          # the shortest interval between a rank's flushes
FLUSH_SHARE = 0.002           # ... and a fraction of the training time so far
BUDGET_SHARE = 0.004          # the most of the sample budget all ranks hold unreported
WAITING_POLL_RATE = 1000      # polls per second of rank 0's words by all waiting ranks, at most
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class JobFailed(UserError):
    """Another rank ended the job with an error: end this rank too."""

    def __init__(self, rank):
        super().__init__(f"rank {rank} ended the job with an error (its line above)")
        self.rank = rank


class JobEvents:
    """Collective to build and close; `count` after each step, `poll` while waiting."""

    def __init__(self, comm, schedule, clock, *, lockstep=False, on_evaluation=None,
                 barrier=None, flush_seconds=FLUSH_SECONDS, guard=None):
        self.comm, self.schedule, self.clock = comm, schedule or Schedule(), clock
        self.lockstep = lockstep
        self.on_evaluation = on_evaluation
        self.barrier = barrier or (lambda number: comm.Barrier())
        self.flush_seconds = flush_seconds
        # Under ULFM a rank's MPI_Abort ends only itself: a rank that ends the job
        # with an error says so in the failure word first, so that the others end
        # too (elsewhere the abort ends them, each with its own line).
        ulfm = ulfm_available()
        self.control = JobControl(comm, guard=guard, failure_word=ulfm)
        if ulfm:
            set_abort_notice(lambda: self.control.fail(MPI.COMM_WORLD.Get_rank()))
        size = comm.Get_size()
        # While waiting (for a straggler, say) every rank polls; spaced so that
        # rank 0 answers at most WAITING_POLL_RATE of them a second at any N.
        self.poll_seconds = max(flush_seconds, size / WAITING_POLL_RATE)
        budget = self.schedule.sample_budget
        self.max_pending = max(1, int(BUDGET_SHARE * budget / size)) if budget else None
        self.samples = 0                  # global samples, as last seen (+ own unreported)
        self.own_samples = 0              # this rank's samples (its share of the count)
        self.evaluations_before = 0       # evaluations done before this job (a resume)
        self.seconds_before = 0.0         # training seconds before this job
        self.preempted = False
        self.word = 0                     # the newest event word this rank has seen
        self.served = 0                   # events of this job served by this rank
        self.completed = 0                # ... of which evaluations that ran to their end
        self.waiting_round_trips = 0      # control round trips made while waiting (poll)
        self.stopped = False
        self.evaluating = False           # inside on_evaluation: every rank is at this event
        self.excluded = 0.0               # evaluation seconds in this job
        self.started = clock()
        self._evaluation_started = None  # the clock when the evaluation in progress began
        self._pending = 0
        self._flushed = self._failure_read = time.monotonic()
        self._agreed_progress = 0.0

    # ---- clocks and progress ----------------------------------------------

    def restore(self, own_samples, seconds_before, evaluations_before, samples=None):
        """Collective (a resume, or survivors going on): continue from these counters.

        The global count restarts from every rank's samples together (or from
        `samples`, what the survivors of a lost rank last saw of it), the
        training clock from the latest rank's, and the evaluation numbering
        from the largest, or from the evaluation points already passed when
        the interval changed (not a burst of evaluations at once).
        """
        if samples is None:
            samples = self.comm.allreduce(own_samples)
        seconds = self.comm.allreduce(seconds_before, op=MPI.MAX)
        passed = [seconds // self.schedule.eval_seconds if self.schedule.eval_seconds else 0,
                  samples // self.schedule.eval_samples if self.schedule.eval_samples else 0]
        evaluations = max(self.comm.allreduce(evaluations_before, op=MPI.MAX),
                          *(int(p) for p in passed))
        if self.comm.Get_rank() == 0:
            self.control.add_samples(samples - self.samples)
        self.comm.Barrier()  # the counter holds the total before anyone reads it
        self.samples, self.own_samples = samples, own_samples
        self.seconds_before, self.evaluations_before = seconds, evaluations
        self.started, self.excluded = self.clock(), 0.0
        self._agreed_progress = self.schedule.progress(samples, seconds)

    def training_seconds(self):
        """Seconds of training: since the run's start, evaluation time excluded (during
        an evaluation, the seconds at its start: its barrier wait is not training)."""
        now = self._evaluation_started if self._evaluation_started is not None else self.clock()
        return self.seconds_before + now - self.started - self.excluded

    def progress(self):
        """Fraction of the budget used, in [0, 1] (learning-rate schedules' x axis).
        Lock-step ranks use the value agreed after the last step, so that their
        identical models take identical steps."""
        if self.lockstep:
            return self._agreed_progress
        return self.schedule.progress(self.samples, self.training_seconds())

    @property
    def evaluations(self):
        """Evaluations done so far, this job's and those before it."""
        return self.evaluations_before + self.completed

    @property
    def reason(self):
        return events_announced(self.word)[1]

    # ---- the service points -------------------------------------------------

    def count(self, samples):
        """After a step: count its samples, serve what is due; True once stopped."""
        self.own_samples += samples
        self._pending += samples
        self.samples += samples
        if self._flush_due():
            self._flush()
        if self.lockstep:
            agreed = np.array([self.word, self.schedule.progress(
                self.samples, self.training_seconds())], np.float64)
            self.comm.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MAX)
            self.word, self._agreed_progress = max(self.word, int(agreed[0])), float(agreed[1])
        self._serve(stop_allowed=True)
        return self.stopped

    def poll(self):
        """While waiting: announce and serve what is due (evaluations; never the stop)."""
        if self._interval_passed(self.poll_seconds):
            before = self.control.round_trips
            self._flush()
            self.waiting_round_trips += self.control.round_trips - before
            if not self.lockstep:
                self._serve(stop_allowed=False)

    def _interval_passed(self, floor=None):
        interval = max(floor or self.flush_seconds, FLUSH_SHARE * self.training_seconds())
        return time.monotonic() - self._flushed >= interval

    def _flush_due(self):
        return (self._interval_passed() or self.preempted
                or (self.max_pending is not None and self._pending >= self.max_pending))

    def _flush(self):
        self.samples, word = self.control.add_samples(self._pending)
        self._pending = 0
        self._flushed = time.monotonic()
        self._end_if_failed()
        self.word = max(self.word, self._announce(word))

    def check_failed(self):
        """While waiting in a collective: end this rank if another ended the job."""
        if (self.control.failure_word
                and time.monotonic() - self._failure_read >= self.poll_seconds):
            self._failure_read = time.monotonic()
            self.control.read_failed()
            self._end_if_failed()

    def _end_if_failed(self):
        if self.control.failed is not None:
            raise JobFailed(self.control.failed)

    def _announce(self, word):
        """Announce whatever is due after `word`; return the newest event word."""
        while (new := self.schedule.next_word(word, self.evaluations_before, self.samples,
                                              self.training_seconds(),
                                              self.preempted)) is not None:
            found = self.control.announce(word, new)
            word = new if found == word else found
        return word

    def _serve(self, stop_allowed):
        """Run the events announced up to self.word in order; the stop last."""
        count, stop = events_announced(self.word)
        while self.served < count and not self.stopped:
            if self.served + 1 == count and stop != RUNNING:
                if stop_allowed:
                    self.served += 1
                    self.stopped = True
                return
            self.served += 1
            self._evaluate(self.evaluations_before + self.served)

    def _evaluate(self, number):
        """Collective; its time is excluded from training, the wait for the other
        ranks at its barrier included (a rank that waits there for a straggler's
        step is evaluating, not training)."""
        started = self._evaluation_started = self.clock()
        self.control.reached(number)
        self.barrier(number)
        if self.on_evaluation is not None:
            self.evaluating = True
            try:
                self.on_evaluation(number)
            finally:
                self.evaluating = False
        self.completed += 1
        self.excluded += self.clock() - started
        self._evaluation_started = None

    # ---- preemption ----------------------------------------------------------

    def handle_signals(self):
        """SIGTERM / SIGUSR1 (Slurm's warning before preemption) announce the stop."""
        def flag(signum, frame):
            self.preempted = True  # the next service point announces the stop
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, flag)

    def close(self):
        """Collective."""
        set_abort_notice(None)
        self.control.close()

