"""World set-up under real MPI: node-local ranks, threads, device, clock, abort."""

import os
import subprocess
import sys

import pytest
from mpi4py import MPI

from aau_mpi.comm.world import _clock_offsets, init_world
from aau_mpi.decentralized.device import init, node_device, set_torch_threads


@pytest.mark.mpi(min_size=2)
def test_node_local_ranks_threads_and_device():
    world = init_world()
    comm = MPI.COMM_WORLD
    assert (world.rank, world.size) == (comm.rank, comm.size)
    # All test ranks run on this one machine.
    assert world.local_size == comm.size and world.local_rank == comm.rank
    node_cores = set().union(*comm.allgather(os.sched_getaffinity(0)))
    assert world.cores_per_node == len(node_cores)
    assert world.threads_per_rank() == max(1, world.cores_per_node // world.local_size)
    assert set_torch_threads(world) == world.threads_per_rank()
    import torch
    assert torch.get_num_threads() == world.threads_per_rank()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert node_device(world).type == expected
    assert init(device="auto").device.type == expected
    ticks = comm.allgather(world.clock())
    assert all(0 <= t < 60 for t in ticks), "the clock counts from the common start"
    assert world.clock_offset == 0.0, "one node: every rank is on rank 0's clock"


@pytest.mark.mpi(min_size=2)
def test_every_rank_reads_the_job_clock_on_one_time_line():
    """Causal bracketing, no tolerance: rank 0 reads its clock, asks rank r for
    r's, reads its own again; r's reading must fall between the two. (Per-process
    clocks such as Open MPI's MPI_Wtime, which counts from each MPI_Init, fail.)"""
    comm = MPI.COMM_WORLD
    world = init_world()
    for other in range(1, comm.size):
        if comm.rank == 0:
            before = world.clock()
            comm.send(None, dest=other)
            theirs = comm.recv(source=other)
            after = world.clock()
            assert before <= theirs <= after, f"rank {other}: {theirs} not in [{before}, {after}]"
        elif comm.rank == other:
            comm.recv(source=0)
            comm.send(world.clock(), dest=0)
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_clock_offsets_are_measured_per_node_leader():
    """Pretend odd and even ranks sit on two nodes: the odd node's leader measures
    its offset from rank 0 by ping-pong. Both run on this machine's one clock, so
    the estimate is within half a round trip of zero, on every rank of the node."""
    comm = MPI.COMM_WORLD
    fake_node = comm.Split(comm.rank % 2, comm.rank)
    offset = _clock_offsets(comm, fake_node)
    offsets = comm.allgather(offset)
    assert offsets[0] == 0.0
    assert len({offsets[r] for r in range(1, comm.size, 2)}) == 1, "one offset per node"
    assert abs(offsets[1]) < 0.05
    fake_node.Free()


@pytest.mark.mpi(min_size=2)
def test_an_error_on_one_rank_ends_the_whole_job():
    """Run on rank 0 only: a child job whose rank 1 raises must end, not hang."""
    if MPI.COMM_WORLD.rank != 0:
        return
    script = ("from aau_mpi.comm.world import init_world, install_abort_hook\n"
              "from aau_mpi.base.errors import UserError\n"
              "w = init_world(); install_abort_hook()\n"
              "if w.rank == 1: raise UserError('lr must be positive: set optim.lr > 0')\n"
              "w.comm.Barrier()\n")
    launcher = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    done = subprocess.run([launcher, "-n", "2", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert done.returncode != 0
    assert "[rank 1] error: lr must be positive: set optim.lr > 0" in done.stderr
    assert "Traceback" not in done.stderr
