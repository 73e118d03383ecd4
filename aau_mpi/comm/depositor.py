"""Deposits in the background: a communication thread that owns the mailbox's writes.

The deposit of iteration k must not add to iteration k's computation (spec
section 3: "the deposit precedes the compute phase so that communication
overlaps computation"). `Depositor.submit` hands one deposit to a thread and
returns at once; the caller computes its next gradient meanwhile and calls
`wait()` before it changes the deposited buffer again. The caller deposits a
snapshot of x taken before its step returned (aau_mpi.decentralized.parameters.DepositSource),
never the live model, which the user's loop rewrites meanwhile; so a deposit
always carries one whole x (the no-torn-read contract needs nothing more: the
seqlock is per slot, whichever thread writes it).

Why a thread and not non-blocking puts: over shared memory (Open MPI's `sm`,
MPICH's shm) a `Put` is the memcpy itself, done inside the call, so issuing
puts before the compute and flushing after it overlaps nothing. mpi4py
releases the GIL inside MPI calls, so the thread's copies run while torch
computes. It needs `MPI_THREAD_MULTIPLE` (the owner's thread reads its own
window meanwhile); where the MPI gives less, deposits run inline in the
caller (`threaded` is then False) and the code is otherwise the same.
"""

import threading
import time

from mpi4py import MPI

from aau_mpi.base import checks
from aau_mpi.base.settings import OVERLAP_MODES


def thread_multiple():
    """True when this MPI lets two threads make MPI calls at once."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def use_thread(mode, world, device):
    """Whether deposits run on a communication thread, for `mode`.

    auto: on a GPU rank (its CPU is idle while the GPU computes), or where the
    node has at least two cores per rank. With fewer, every rank's cores are
    busy computing and the thread must wait for one: measured here (4 ranks
    on 2 cores) each deposit then waited for the scheduler and iterations
    took several times longer than depositing inline (docs/benchmarks.md).
    """
    checks.choice("mailbox.overlap", mode, OVERLAP_MODES)
    if mode == "auto":
        return device.type == "cuda" or world.cores_per_node >= 2 * world.local_size
    return mode == "thread"


class Depositor:
    """At most one deposit in flight; `submit` waits for the previous one first."""

    def __init__(self, mailbox, threaded=True, on_start=None):
        """`on_start()` runs first on the thread (e.g. selecting the rank's GPU:
        a thread's current CUDA device is its own)."""
        self.mailbox = mailbox
        self.threaded = bool(threaded) and thread_multiple()
        self.busy_seconds = 0.0      # time the last deposit took, wherever it ran
        self.before_seconds = 0.0    # ... of which its `before()` (a device-to-host copy)
        self.waited_seconds = 0.0    # time the caller's last wait() blocked
        self._job = None
        self._error = None
        self._in_flight = False
        self._closing = False
        self._lock = threading.Condition()
        if self.threaded:
            self._thread = threading.Thread(target=self._run, args=(on_start,),
                                            name="aau_mpi-depositor", daemon=True)
            self._thread.start()

    def submit(self, before=None, **deposit):
        """Start `mailbox.deposit(**deposit)`; `before()` runs first on the same thread
        (e.g. waiting for a device-to-host copy to finish)."""
        self.wait()
        if not self.threaded:
            self._deposit(before, deposit)
            self.waited_seconds = self.busy_seconds  # the caller did the deposit itself
            self._raise_error()
            return
        with self._lock:
            self._job, self._in_flight = (before, deposit), True
            self._lock.notify_all()

    def wait(self):
        """Block until no deposit is in flight; re-raise a deposit's error here."""
        started = time.perf_counter()
        if self.threaded:
            with self._lock:
                while self._in_flight:
                    self._lock.wait()
        self.waited_seconds = time.perf_counter() - started
        self._raise_error()

    def _raise_error(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self):
        """Wait for the deposit in flight and stop the thread (the mailbox stays open)."""
        self.wait()
        if self.threaded:
            with self._lock:
                self._closing = True
                self._lock.notify_all()
            self._thread.join()
            self.threaded = False

    def _deposit(self, before, deposit):
        started = time.perf_counter()
        try:
            if before is not None:
                before()
            self.before_seconds = time.perf_counter() - started
            self.mailbox.deposit(**deposit)
        except BaseException as error:  # handed to the caller's thread by wait()
            self._error = error
        self.busy_seconds = time.perf_counter() - started

    def _run(self, on_start):
        failed = None
        try:
            if on_start is not None:
                on_start()
        except BaseException as error:  # every deposit then fails with it, in wait()
            failed = error
        while True:
            with self._lock:
                while self._job is None and not self._closing:
                    self._lock.wait()
                if self._job is None:
                    return
                job, self._job = self._job, None
            if failed is None:
                self._deposit(*job)
            else:
                self._error = failed
            with self._lock:
                self._in_flight = False
                self._lock.notify_all()
