"""Averages of a metric across ranks that never block the training loop.

`DecentralizedOptimizer.average_metric(value)` posts this rank's value and
returns a `MetricAverage` at once. Each rank's k-th post is its part of the
k-th average, whatever iteration it was at: ranks run at different paces, so
a blocking collective in the loop would wait for a rank that is itself
waiting for this rank's next deposit (a deadlock). Each average is a
non-blocking sum (MPI_Iallreduce, float64) of (value, 1) on a private
communicator; `progress()` tests the oldest pending ones after every step
and never waits, so an average is ready a few steps after the last rank
posted its part.

At the end (`complete()`, called by `finish()`) ranks may have posted
different numbers of values: under a global budget fast ranks take more
steps. They agree on the longest list; a rank that posted fewer contributes
(0, 0) to the rest, so every average divides by the ranks that really
posted a value, and every handle is ready after `finish()`.

After a lost rank (on_rank_loss=continue) the averages in flight never
complete: they are marked `dropped`. The survivors continue on a new
communicator from the largest number of posts any of them had made, so
that the k-th averages still pair every rank's k-th value; a survivor's
posts below that number are dropped at once.
"""

from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from aau_mpi.base.errors import UserError


class MetricAverage:
    """The average of one metric over the ranks that posted it; `ready()` once known.

    value:         a float (for a scalar), or a float64 array of the posted shape;
                   None until ready.
    contributions: how many ranks' values are in it.
    dropped:       a lost rank stopped it (on_rank_loss=continue): it never gets ready.
    """

    def __init__(self, shape):
        self.shape = shape
        self.value = None
        self.contributions = 0
        self.dropped = False

    def ready(self):
        return self.value is not None

    def __repr__(self):
        state = ("dropped" if self.dropped else f"{self.value} over {self.contributions} ranks"
                 if self.ready() else "pending")
        return f"MetricAverage({state})"


def as_float64(value):
    """A number, numpy array or tensor (any device) as a float64 array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"average_metric takes a number, a numpy array or a tensor, got "
                        f"{type(value).__name__}: pass e.g. loss.item()") from None


class MetricAverages:
    """This rank's posts, started in order on `comm` (collective to build, on a
    private communicator) and delivered in order.

    posted: this rank's posts so far (before a lost rank too); posts numbered
    below the largest count of any rank at the start are dropped at once.
    """

    def __init__(self, comm, posted=0):
        self.comm = comm
        self.posted = posted
        self.first = comm.allreduce(posted, op=MPI.MAX)
        self.sizes = []           # the size of each value started on this communicator
        self.pending = deque()    # (request, buffer, handle), oldest first

    def post(self, value):
        array = as_float64(value)
        handle = MetricAverage(array.shape)
        self.posted += 1
        if self.posted <= self.first:
            handle.dropped = True
            return handle
        self._start(np.append(array.ravel(), 1.0), handle)
        return handle

    def _start(self, buffer, handle):
        self.sizes.append(buffer.size - 1)
        self.pending.append((self.comm.Iallreduce(MPI.IN_PLACE, buffer), buffer, handle))

    def progress(self):
        """Deliver the oldest averages that every rank has contributed to (Test, never Wait)."""
        while self.pending and self.pending[0][0].Test():
            _, buffer, handle = self.pending.popleft()
            _deliver(buffer, handle)

    def complete(self):
        """Collective, once no rank posts any more: the ranks that posted fewer values
        contribute nothing to the others' remaining averages; all are delivered."""
        everyone = self.comm.allgather(self.sizes)
        longest = max(everyone, key=len)
        if any(sizes != longest[:len(sizes)] for sizes in everyone):
            raise UserError("average_metric: ranks posted values of different sizes as their "
                            "k-th metric: post the same shape, in the same order, on every rank")
        for size in longest[len(self.sizes):]:
            self._start(np.zeros(size + 1), None)
        MPI.Request.Waitall([request for request, _, _ in self.pending])
        for _, buffer, handle in self.pending:
            _deliver(buffer, handle)
        self.pending.clear()

    def drop(self):
        """A rank was lost: the averages in flight will never complete. Returns them
        (their buffers must outlive the abandoned requests)."""
        dropped = list(self.pending)
        for _, _, handle in dropped:
            if handle is not None:
                handle.dropped = True
        self.pending.clear()
        return dropped


def _deliver(buffer, handle):
    if handle is None:  # another rank's average, to which this rank had nothing to add
        return
    total, count = buffer[:-1], buffer[-1]
    handle.contributions = int(count)
    average = total / count
    handle.value = float(average[0]) if handle.shape == () else average.reshape(handle.shape)
