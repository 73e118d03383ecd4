"""Job-wide control words that any rank reads and updates one-sidedly.

A small window on rank 0 holds int64 words:

    0          samples used by all ranks together (the global sample budget)
    1          the event word: job-wide events, announced in order
               (its encoding is `aau_mpi.algorithms.schedule`'s)
    2          the failure word: 1 + the world rank that first ended the job
               with an error, 0 while none has (under ULFM MPI_Abort ends
               only its caller: the others learn of it here)
    3 + r      the newest checkpoint generation that rank r has written
    3 + N + r  the newest evaluation that rank r has reached (N ranks), so that
               a rank kept waiting in an evaluation can name who is missing

Every operation is an atomic accumulate-family call (`Fetch_and_op`,
`Compare_and_swap`, and `Get_accumulate` to read many words at a checkpoint)
followed by a `Flush`; origin and target always name INT64_T (MPICH rejects
numpy's inferred LONG against an INT64_T target). MPI makes accumulates to
one location atomic with respect to each other, whichever rank issues them,
and an accumulate completes at a passive target without the target making
MPI calls (the same passive progress the mailbox relies on). The window is
opened with one collective `Lock_all` for its life. Under ULFM each call is
watched by a `StallGuard` (aau_mpi.comm.survivors: a dead rank can leave rank
0's accumulate lock held).

Each call is a round trip to rank 0, so callers batch: `aau_mpi.decentralized.events`
adds a rank's samples every few milliseconds, not every step.
"""

from contextlib import nullcontext

import numpy as np
from mpi4py import MPI

SAMPLES, EVENTS, FAILED, GENERATIONS = 0, 1, 2, 3


class JobControl:
    """Collective to build and close; every other call is one-sided."""

    def __init__(self, comm, initial_samples=0, guard=None, failure_word=False):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        # Read with every flush only where it can be written (under ULFM).
        self.failure_word = failure_word
        self._atomic = guard.atomic(0) if guard is not None else nullcontext()
        self.reached_word = GENERATIONS + self.size
        words = self.reached_word + self.size
        self.win = MPI.Win.Allocate(8 * words if self.rank == 0 else 0, disp_unit=8, comm=comm)
        if self.rank == 0:
            table = np.frombuffer(self.win.tomemory(), np.int64)
            table[:] = 0
            table[SAMPLES] = initial_samples
            table[GENERATIONS:self.reached_word] = -1
        self._origin = np.zeros(max(3, self.size), np.int64)
        self._result = np.zeros(max(3, self.size), np.int64)
        self._compare = np.zeros(1, np.int64)
        self.round_trips = 0
        self.failed = None  # the world rank that ended the job with an error, as last read
        comm.Barrier()  # initialised before anyone reads
        self.win.Lock_all()
        comm.Barrier()

    def _read(self, first, count):
        """`count` words from `first`, each read atomically (Get_accumulate NO_OP)."""
        result = self._result[:count]
        with self._atomic:
            self.win.Get_accumulate([self._origin[:count], count, MPI.INT64_T],
                                    [result, count, MPI.INT64_T], 0,
                                    target=(first, count, MPI.INT64_T), op=MPI.NO_OP)
            self.win.Flush(0)
        self.round_trips += 1
        return result.copy()

    def _replace(self, word, value):
        """Write `value` into `word` atomically (Fetch_and_op REPLACE), completed."""
        self._origin[0] = value
        with self._atomic:
            self.win.Fetch_and_op([self._origin[:1], 1, MPI.INT64_T],
                                  [self._result[:1], 1, MPI.INT64_T], 0, word, op=MPI.REPLACE)
            self.win.Flush(0)
        self.round_trips += 1

    def add_samples(self, samples):
        """Add this rank's samples; return (total after the addition, event word), and
        with `failure_word` read that word into `failed`.

        Two or three Fetch_and_op calls completed by one Flush: one round trip.
        Each word is read atomically, which is all that is needed (the words
        are independent). Get_accumulate over them would be one call, but
        leaked 128 bytes per call in MPICH's wheel.
        """
        self._origin[0] = samples
        with self._atomic:
            self.win.Fetch_and_op([self._origin[:1], 1, MPI.INT64_T],
                                  [self._result[:1], 1, MPI.INT64_T], 0, SAMPLES, op=MPI.SUM)
            self.win.Fetch_and_op([self._origin[:1], 1, MPI.INT64_T],
                                  [self._result[1:2], 1, MPI.INT64_T], 0, EVENTS, op=MPI.NO_OP)
            if self.failure_word:
                self.win.Fetch_and_op([self._origin[:1], 1, MPI.INT64_T],
                                      [self._result[2:3], 1, MPI.INT64_T], 0, FAILED,
                                      op=MPI.NO_OP)
            self.win.Flush(0)
        self.round_trips += 1
        if self.failure_word:
            self._saw_failure(self._result[2])
        return int(self._result[0]) + samples, int(self._result[1])

    def fail(self, world_rank):
        """Record that `world_rank` ends the job with an error, unless a rank did first;
        True when it is the first."""
        self._origin[0], self._compare[0] = world_rank + 1, 0
        with self._atomic:
            self.win.Compare_and_swap(self._origin[:1], self._compare, self._result[:1], 0,
                                      FAILED)
            self.win.Flush(0)
        self.round_trips += 1
        self._saw_failure(self._result[0] or world_rank + 1)
        return self.failed == world_rank

    def read_failed(self):
        """Read the failure word into `failed` (None: no rank ended the job); return it."""
        self._saw_failure(self._read(FAILED, 1)[0])
        return self.failed

    def _saw_failure(self, word):
        if word:
            self.failed = int(word) - 1

    def announce(self, seen, new):
        """Swap the event word from `seen` to `new`; return the word found there.

        The swap happened iff the returned word is `seen`; otherwise another
        rank announced first and the caller re-decides from the returned word.
        """
        self._origin[0], self._compare[0] = new, seen
        with self._atomic:
            self.win.Compare_and_swap(self._origin[:1], self._compare, self._result[:1], 0,
                                      EVENTS)
            self.win.Flush(0)
        self.round_trips += 1
        return int(self._result[0])

    def checkpointed(self, generation):
        """Record that this rank wrote `generation`; return the oldest that every rank has.

        The REPLACE completes (Flush) before the read is issued, so the
        rank that writes last always sees every rank's generation.
        """
        self._replace(GENERATIONS + self.rank, generation)
        return int(self._read(GENERATIONS, self.size).min())

    def reached(self, evaluation):
        """Record that this rank reached evaluation number `evaluation`."""
        self._replace(self.reached_word + self.rank, evaluation)

    def not_reached(self, evaluation):
        """The ranks that have not yet reached evaluation number `evaluation`."""
        return [int(r) for r in np.flatnonzero(self._read(self.reached_word, self.size)
                                                < evaluation)]

    def close(self):
        """Collective."""
        self.win.Unlock_all()
        self.win.Free()
