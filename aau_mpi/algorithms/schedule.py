"""When a job evaluates and stops: pure decisions over global progress.

Progress is measured in samples used by all ranks together (the shared
counter of `aau_mpi.comm.control`) and in training seconds (the clock that
excludes evaluation). Every rank asks the same questions of the same
numbers, and announces what is due through the event word, so all ranks
evaluate and stop on the same events (`aau_mpi.decentralized.events` does the announcing).

The event word packs (count << 2) | stop: `count` events have been announced
so far; when `stop` is non-zero the last of them is the stop event, with
`stop` its reason, and no event can follow it. Announcing is a
compare-and-swap from the word the announcer last saw, so concurrent
announcers never lose or duplicate an event: every rank sees the same
sequence and can act on it in the same order.
"""

import math
from dataclasses import dataclass

RUNNING, FINISHED, PREEMPTED = 0, 1, 2


def events_announced(word):
    """(number of events announced, stop reason) packed in an event word."""
    return int(word) >> 2, int(word) & 3


def pack_events(count, stop=RUNNING):
    return (int(count) << 2) | int(stop)


@dataclass(frozen=True)
class Schedule:
    sample_budget: int = None      # stop when all ranks together used this many samples
    time_budget: float = None      # ... or after this many training seconds
    eval_samples: int = None       # evaluate every this many samples
    eval_seconds: float = None     # ... or every this many training seconds

    @property
    def budgeted(self):
        """Whether the job ever stops by itself (else only a preemption signal stops it)."""
        return self.sample_budget is not None or self.time_budget is not None

    def progress(self, samples, seconds):
        """Fraction of the budget used, in [0, 1] (the learning-rate schedule's x axis)."""
        fractions = []
        if self.sample_budget:
            fractions.append(samples / self.sample_budget)
        if self.time_budget:
            fractions.append(seconds / self.time_budget)
        return min(1.0, max(fractions, default=0.0))

    def finished(self, samples, seconds):
        return ((self.sample_budget is not None and samples >= self.sample_budget)
                or (self.time_budget is not None and seconds >= self.time_budget))

    def eval_due(self, number, samples, seconds):
        """Is evaluation `number` (1, 2, ...) due? Evaluations past the budget never are."""
        samples = min(samples, self.sample_budget or math.inf)
        seconds = min(seconds, self.time_budget or math.inf)
        return ((self.eval_samples is not None and samples >= number * self.eval_samples)
                or (self.eval_seconds is not None and seconds >= number * self.eval_seconds))

    def next_word(self, word, evals_before, samples, seconds, preempted=False):
        """The event word to announce after `word`, or None when nothing is due.

        `evals_before`: evaluations done before this job started (a resumed
        run keeps its evaluation numbering). A stop, once announced, is final.
        """
        count, stop = events_announced(word)
        if stop != RUNNING:
            return None
        if preempted:
            return pack_events(count + 1, PREEMPTED)
        if self.finished(samples, seconds):
            return pack_events(count + 1, FINISHED)
        if self.eval_due(evals_before + count + 1, samples, seconds):
            return pack_events(count + 1)
        return None
