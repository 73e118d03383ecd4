"""Losing a rank without losing the job: detect the loss, agree on the survivors, shrink.

Only Open MPI with ULFM can do it (`mpirun --with-ft ulfm`; measured in
docs/reliability.md, "Losing a rank: what the MPI does"): MPICH's launcher
kills a SIGKILLed rank's whole node, and without ULFM Open MPI's ends the
job. What the probes showed, and what this module is built on:

- RMA never reports a death: deposits into a dead neighbour, and atomics on a
  dead rank 0's control words, succeed silently on one node. So the mailbox
  is not the detector. A pending receive from ANY_SOURCE on a communicator of
  its own is: ULFM fails it (MPI_ERR_PROC_FAILED_PENDING) once any process
  of the communicator has failed (seen here 0.3-0.4 s after a SIGKILL, 4 ranks
  on 2 loaded cores). Nobody ever sends to it; `LossDetector.check()` tests it
  wherever a rank polls anyway. The first rank to notice revokes the
  detector's communicator, so the others' detectors fail at once
  (MPI_ERR_REVOKED), and revokes the communicators collectives run on, so a
  rank blocked in one returns.
- The survivors then `Shrink` the job's communicator: a new one of the
  living ranks, in the same order. The windows of the old communicator are
  left as they are (freeing is collective over a communicator with a dead
  member; leaking two windows per loss is the safe side).
- Open MPI's nonblocking collectives do not always say so: a revocation that
  lands between two rounds of a schedule (an Ibarrier's, an Iallreduce's)
  comes back as MPI_ERR_OTHER ("Error in NBC_Start_round()"; an 8-rank
  Ibarrier on a communicator revoked mid-way got it in 12 of 140 tries here).
  `explained_by_loss` reads such an error as the loss when one of the
  communicators is revoked, or the detector fails within a grace period.
- A rank must die by a signal (or its node) to be seen: one that exits
  without MPI_Finalize, or calls MPI_Abort (which under ULFM ends only the
  caller), is not detected and makes Shrink wait.
- Open MPI's shared-memory one-sided component (osc sm) serialises every
  accumulate-family call on a window's target with a spinlock in the
  target's shared memory. A rank killed while it holds one leaves it held,
  and every later atomic on that target spins for ever, never returning to
  the loop that polls the detector. `StallGuard` bounds that.
"""

import os
import signal
import sys
import threading
import time

from mpi4py import MPI


DETECTOR_TAG = 31_337
# The error classes of a lost rank under ULFM (MPI 4.1 / ULFM's MPIX_ names).
LOSS_CLASSES = (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED)
# How long an MPI error outside those classes waits for the detector to see a
# loss before it counts as an error of its own (a death is seen within
# 0.3-0.4 s on loaded cores, a revocation at once).
LOSS_GRACE_SECONDS = 5.0
# An atomic RMA call to one node's shared memory takes microseconds; one that
# has not returned in this long of the process's running time waits for a
# lock that a dead rank holds.
STALL_SECONDS = 10.0


class RankLost(Exception):
    """A rank of the job died; the survivors must shrink and go on."""


def is_rank_loss(error):
    return isinstance(error, MPI.Exception) and error.Get_error_class() in LOSS_CLASSES


def explained_by_loss(error, comms, detector, grace=LOSS_GRACE_SECONDS):
    """Whether a lost rank explains `error`: one of its classes, or any other MPI error
    while one of `comms` is revoked or `detector` (None: no ULFM) sees a loss within
    `grace` seconds (see the module docstring: Open MPI's NBC_Start_round)."""
    if isinstance(error, RankLost) or is_rank_loss(error):
        return True
    if detector is None or not isinstance(error, MPI.Exception):
        return False
    if any(comm.Is_revoked() for comm in comms):
        return True
    deadline = time.monotonic() + grace
    while True:
        try:
            detector.check()
        except RankLost:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def ulfm_available():
    """True under Open MPI started with `mpirun --with-ft ulfm` (which sets
    OMPI_MCA_mpi_ft_enable=1 for the ranks)."""
    return ("Open MPI" in MPI.Get_library_version()
            and os.environ.get("OMPI_MCA_mpi_ft_enable", "0").lower() in ("1", "true", "yes"))


def unsupported_reason():
    """One line saying why a lost rank must end the job here, or None."""
    if ulfm_available():
        return None
    if "Open MPI" in MPI.Get_library_version():
        return ("on_rank_loss=continue needs Open MPI's fault tolerance: launch with "
                "`mpirun --with-ft ulfm`; until then a lost rank ends the job")
    return ("on_rank_loss=continue needs Open MPI with ULFM (`mpirun --with-ft ulfm`); this "
            "MPI's launcher ends the job when a rank dies (MPICH kills the rank's whole node)")


def errors_return(comm):
    """Make MPI calls on `comm` raise instead of aborting the job."""
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    return comm


class LossDetector:
    """A receive nobody sends to, on a communicator of its own: it fails when a rank dies."""

    def __init__(self, comm):
        self.comm = errors_return(comm.Dup())
        self._buffer = bytearray(1)
        self._request = self.comm.Irecv(self._buffer, source=MPI.ANY_SOURCE, tag=DETECTOR_TAG)

    def check(self):
        """Raise RankLost when a rank of the communicator died (cheap: one Test)."""
        try:
            self._request.Test()
        except MPI.Exception as error:
            if is_rank_loss(error):
                raise RankLost(str(error)) from None
            raise

    def close(self):
        """Collective, in a healthy job: complete the receive, free the communicator."""
        self.comm.Send(self._buffer, dest=self.comm.Get_rank(), tag=DETECTOR_TAG)
        self._request.Wait()
        self.comm.Free()


def revoke(*comms):
    """Revoke communicators so that every rank's pending and future calls on them
    fail (a rank blocked in a collective returns); errors on dead ones are moot."""
    for comm in comms:
        try:
            comm.Revoke()
        except MPI.Exception:
            pass


def shrink(comm):
    """Collective among the survivors of `comm`: (their communicator, the lost ranks of `comm`)."""
    survivors = errors_return(comm.Shrink())
    kept = MPI.Group.Translate_ranks(survivors.Get_group(), list(range(survivors.Get_size())),
                                     comm.Get_group())
    lost = sorted(set(range(comm.Get_size())) - set(kept))
    return survivors, lost


class StallGuard:
    """Ends this rank when an atomic RMA call has not returned for `seconds`.

    Wrap each accumulate-family call (and the Flush that completes it) in
    `with watch:`, where `watch = guard.atomic(target)` (reusable). A thread
    that makes no MPI call (mpi4py releases the GIL inside MPI) counts how
    long each call has been inside, in its own running time: a job that
    Slurm suspends does not count. A call
    past `seconds` waits for a lock held by a rank that died inside its own
    call (osc sm, module docstring), which nothing will release: the rank
    prints one line and SIGKILLs itself, a death that ULFM reports, so the
    others see a lost rank (the survivors that can, go on; a lost rank 0 of
    the control window takes every rank with it) instead of a job hung for
    ever. One per process (`for_process`): calls from several threads
    (the depositor's included) are each watched.
    """

    _process = None

    def __init__(self, seconds=STALL_SECONDS, tick=0.5):
        self.seconds, self.tick = seconds, tick
        self._inside = {}          # thread ident -> [target, seconds inside so far]
        threading.Thread(target=self._watch, name="aau-stall-guard", daemon=True).start()

    @classmethod
    def for_process(cls):
        if cls._process is None:
            cls._process = cls()
        return cls._process

    def atomic(self, target):
        return _Watch(self._inside, target)

    def _watch(self):
        last = time.monotonic()
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            # A pause of the whole process (SIGSTOP, a suspended job) is not a stall.
            ran, last = min(now - last, 2 * self.tick), now
            for entry in list(self._inside.values()):
                entry[1] += ran
                if entry[1] > self.seconds:
                    self._leave(entry[0])

    def _leave(self, target):
        rank = MPI.COMM_WORLD.Get_rank()  # local: no communication
        print(f"[rank {rank}] error: an atomic one-sided call to rank {target} has not returned "
              f"in {self.seconds:.0f} s: a lost rank died holding that window's lock (Open MPI's "
              f"shared-memory osc under ULFM); this rank leaves the job so that the others "
              f"do not wait for it", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class _Watch:
    """A reusable `with` block that StallGuard watches."""

    __slots__ = ("inside", "target")

    def __init__(self, inside, target):
        self.inside, self.target = inside, target

    def __enter__(self):
        self.inside[threading.get_ident()] = [self.target, 0.0]

    def __exit__(self, *exc):
        del self.inside[threading.get_ident()]
