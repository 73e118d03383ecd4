"""MPI start-up: who am I, who shares my node, which device and how many threads.

One `World` per process, created once by the entry point. It also fixes the
job clock: seconds since a common start taken right after a barrier, so that
timestamps in mailbox headers are comparable between ranks of one node (and
within a few microseconds of barrier skew across nodes; spec section 2.5 only
ever compares a sender's times with its own earlier times).
"""

import os
import sys
import time
import traceback
from dataclasses import dataclass

from mpi4py import MPI

from aau_mpi.errors import UserError

ABORT_GRACE_SECONDS = 0.5


@dataclass(frozen=True)
class World:
    comm: MPI.Comm
    rank: int
    size: int
    node_comm: MPI.Comm   # the ranks that share this node's memory
    local_rank: int
    local_size: int
    cores_per_node: int
    start_time: float     # MPI.Wtime() at the common start

    def clock(self):
        """Seconds since the job's common start."""
        return MPI.Wtime() - self.start_time

    def device(self):
        """`cuda:<local rank mod GPUs>` when CUDA is available, else `cpu`."""
        import torch
        if torch.cuda.is_available():
            return torch.device(f"cuda:{self.local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")

    def threads_per_rank(self):
        """Cores of this node shared out among its ranks, at least one each.

        Oversubscribed ranks with more threads than their share thrash: 4 ranks
        with 2 threads each on 2 cores ran 15x slower than with 1 thread each.
        """
        return max(1, self.cores_per_node // self.local_size)

    def set_torch_threads(self):
        import torch
        threads = self.threads_per_rank()
        torch.set_num_threads(threads)
        return threads


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


def init_world(comm=None):
    """Collective over `comm` (default COMM_WORLD): build the World."""
    comm = comm or MPI.COMM_WORLD
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    cores = _node_cores(node_comm)
    comm.Barrier()
    start = MPI.Wtime()
    return World(comm=comm, rank=comm.Get_rank(), size=comm.Get_size(),
                 node_comm=node_comm, local_rank=node_comm.Get_rank(),
                 local_size=node_comm.Get_size(), cores_per_node=cores,
                 start_time=start)


def report_and_abort(message, exit_code=2, comm=None):
    """Print one error line and end the whole job.

    Every rank that hits the problem prints it; Abort then ends the ranks that
    did not (they may be blocked in a collective or waiting for a deposit), so
    one rank's error never leaves the job hanging.
    """
    comm = comm or MPI.COMM_WORLD
    prefix = f"[rank {comm.Get_rank()}] " if comm.Get_size() > 1 else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    if comm.Get_size() > 1:
        # The launcher forwards our stderr asynchronously; aborting at once
        # let MPICH's mpiexec kill the job before the line reached the user.
        time.sleep(ABORT_GRACE_SECONDS)
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
