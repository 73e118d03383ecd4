"""MPI start-up: who am I, who shares my node, how many cores, what time it is.

`init_world` builds the process's `World` (no torch: `aau_mpi.init()` in
decentralized/device.py adds the device and torch's threads). It also fixes
the **job clock** that every mailbox header carries (spec section 2, contract 5): seconds since a common start, on rank
0's time line. Its source is CLOCK_MONOTONIC (`time.monotonic`), which all
processes of one node share; `MPI.Wtime` would not do: Open MPI counts it
from each process's own MPI_Init (measured: two ranks of one node 0.13 s
apart). Each node's leader measures its node's offset from rank 0's clock
at start-up (the ping-pong with the smallest round trip of a few) and shares
it with its node, so timestamps from different nodes are on one time line
within about half that round trip. On rank 0's node the offset is 0.
"""

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

from mpi4py import MPI

from aau_mpi.base.errors import UserError
from aau_mpi.comm.survivors import ulfm_available

ABORT_GRACE_SECONDS = 0.5
# Under ULFM MPI_Abort ends only the calling rank, and prterun (PRRTE 3.0.14)
# deadlocked in 4 of 15 8-rank jobs whose 7 survivors aborted at once, 0 of 15
# with the aborts 0.05 s apart by rank (docs/reliability.md).
ULFM_ABORT_SPACING_SECONDS = 0.05
# What tells the job's other ranks before this one aborts (set_abort_notice).
_abort_notice = [None]
OFFSET_ROUNDS = 8          # ping-pongs per node leader; the fastest one is kept


@dataclass(frozen=True)
class World:
    comm: MPI.Comm
    rank: int
    size: int
    node_comm: MPI.Comm   # the ranks that share this node's memory
    local_rank: int
    local_size: int
    cores_per_node: int
    start_time: float     # rank 0's time.monotonic() at the common start
    clock_offset: float   # rank 0's monotonic clock minus this node's
    device: object = None  # the torch.device that aau_mpi.init() chose; None before

    def clock(self):
        """The job clock: seconds since the common start, on rank 0's time line."""
        return time.monotonic() + self.clock_offset - self.start_time

    def threads_per_rank(self):
        """Cores of this node shared out among its ranks, at least one each.

        Oversubscribed ranks with more threads than their share thrash: 4 ranks
        with 2 threads each on 2 cores ran 15x slower than with 1 thread each.
        """
        return max(1, self.cores_per_node // self.local_size)


def _node_cores(node_comm):
    """Distinct cores that this node's ranks may run on.

    The union of the ranks' CPU affinities: under a launcher that binds each
    rank to its own core, one rank alone sees a single core, but the node's
    ranks together see all that the job was given on this node.
    """
    own = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    union = set()
    for cores in node_comm.allgather(own):
        union.update(cores)
    return len(union)


def _clock_offsets(comm, node_comm):
    """rank 0's monotonic clock minus this node's (Cristian's method, node leaders only).

    Collective. Each node leader other than rank 0's asks rank 0 for its time
    OFFSET_ROUNDS times and keeps the answer with the shortest round trip,
    assuming the reply was read half-way through it.
    """
    leaders = comm.Split(0 if node_comm.Get_rank() == 0 else MPI.UNDEFINED, comm.Get_rank())
    offset = 0.0
    if leaders != MPI.COMM_NULL:
        ping = bytearray(1)
        if leaders.Get_rank() == 0:
            for other in range(1, leaders.Get_size()):
                for _ in range(OFFSET_ROUNDS):
                    leaders.Recv(ping, source=other, tag=1)
                    leaders.send(time.monotonic(), dest=other, tag=2)
        else:
            best = None
            for _ in range(OFFSET_ROUNDS):
                sent = time.monotonic()
                leaders.Send(ping, dest=0, tag=1)
                remote = leaders.recv(source=0, tag=2)
                received = time.monotonic()
                if best is None or received - sent < best[0]:
                    best = (received - sent, remote - (sent + received) / 2)
            offset = best[1]
        leaders.Free()
    return node_comm.bcast(offset, root=0)


def init_world(comm=None, device=None):
    """Collective over `comm` (default COMM_WORLD): build the World (no torch settings)."""
    comm = comm or MPI.COMM_WORLD
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    cores = _node_cores(node_comm)
    offset = _clock_offsets(comm, node_comm)
    comm.Barrier()
    start = comm.bcast(time.monotonic() if comm.Get_rank() == 0 else None, root=0)
    return World(comm=comm, rank=comm.Get_rank(), size=comm.Get_size(),
                 node_comm=node_comm, local_rank=node_comm.Get_rank(),
                 local_size=node_comm.Get_size(), cores_per_node=cores,
                 start_time=start, clock_offset=offset, device=device)


def set_abort_notice(notice):
    """`notice()` runs before an abort: the job's control window records the
    failure, True when this rank's is the job's first; None clears it."""
    _abort_notice[0] = notice


def _notify_abort():
    if _abort_notice[0] is None:
        return False
    try:
        return _abort_notice[0]()
    except Exception:  # noqa: BLE001 (the abort must happen whatever this does)
        return False


def report_and_abort(message, exit_code=2, comm=None):
    """Print one error line and end the whole job.

    Every rank that hits the problem prints it; Abort then ends the ranks that
    did not (they may be blocked in a collective or waiting for a deposit), so
    one rank's error never leaves the job hanging.

    Under ULFM Abort ends only this rank, unseen by the others. So the job's
    first failure is recorded in the control window (set_abort_notice), and
    that rank dies by SIGKILL, which ULFM reports: the others see a lost rank,
    read the record and end with an error of their own (a failure is not a
    loss to survive), spaced out (see ULFM_ABORT_SPACING_SECONDS).
    """
    comm = comm or MPI.COMM_WORLD
    prefix = f"[rank {comm.Get_rank()}] " if comm.Get_size() > 1 else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    first = _notify_abort()
    if comm.Get_size() > 1:
        # The launcher forwards our stderr asynchronously; aborting at once
        # let MPICH's mpiexec kill the job before the line reached the user.
        time.sleep(ABORT_GRACE_SECONDS)
        if ulfm_available():
            if first:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(ULFM_ABORT_SPACING_SECONDS * MPI.COMM_WORLD.Get_rank())
        comm.Abort(exit_code)
    sys.exit(exit_code)


def install_abort_hook(comm=None):
    """Make an uncaught exception on any rank end the whole job.

    Without it the failing rank exits while the others wait for it for ever.
    A UserError prints as one line; anything else keeps its traceback.
    """
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, UserError):
            report_and_abort(str(exc), exit_code=2, comm=comm)
        traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
        sys.stderr.flush()
        report_and_abort(f"{exc_type.__name__}: {exc} (traceback above)", exit_code=1, comm=comm)

    sys.excepthook = hook
