"""The job control words: shared counter, ordered events, checkpoint generations."""

import time

import numpy as np
import pytest
from mpi4py import MPI

from aau_mpi.comm.control import JobControl
from aau_mpi.algorithms.schedule import FINISHED, events_announced, pack_events

comm = MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
def test_concurrent_additions_are_never_lost():
    control = JobControl(comm, initial_samples=7)
    totals = [control.add_samples(3)[0] for _ in range(500)]
    comm.Barrier()
    used, _ = control.add_samples(0)
    control.close()
    assert used == 7 + 3 * 500 * comm.size
    everyone = sorted(t for mine in comm.allgather(totals) for t in mine)
    # Every addition saw a distinct running total: the adds are atomic.
    assert everyone == list(range(7 + 3, used + 1, 3))


@pytest.mark.mpi(min_size=2)
def test_racing_announcers_produce_one_sequence_of_events():
    """Every rank tries to announce the next event as fast as it can: each
    event is announced exactly once and every rank sees the same sequence."""
    control = JobControl(comm)
    won, word = 0, 0
    while events_announced(word)[0] < 200:
        count, _ = events_announced(word)
        new = pack_events(count + 1, FINISHED if count + 1 == 200 else 0)
        found = control.announce(word, new)
        won += found == word
        word = new if found == word else found
    comm.Barrier()
    _, final = control.add_samples(0)
    control.close()
    assert final == pack_events(200, FINISHED)
    assert comm.allreduce(won) == 200, "each event announced by exactly one rank"


@pytest.mark.mpi(min_size=2)
def test_the_last_rank_to_write_a_generation_sees_it_complete():
    """Ranks report generations in a random order: whoever reports last must
    see every rank at that generation (so somebody commits it)."""
    control = JobControl(comm)
    rng = np.random.default_rng(comm.rank)
    assert control.checkpointed(0) in (-1, 0), "no rank has reported before"
    comm.Barrier()
    for generation in range(1, 16):
        time.sleep(rng.uniform(0, 0.005))
        seen = control.checkpointed(generation)
        assert generation - 1 <= seen <= generation
        assert comm.allreduce(seen == generation, op=MPI.LOR), \
            f"nobody saw generation {generation} complete"
    control.close()


@pytest.mark.mpi(min_size=2)
def test_the_first_rank_to_fail_is_the_one_every_rank_reads():
    """Every rank records a failure at once: exactly one wins the compare-and-swap,
    and every rank, the losers included, then reads that one rank."""
    control = JobControl(comm, failure_word=True)
    control.add_samples(0)
    assert control.failed is None and control.read_failed() is None
    comm.Barrier()
    won = control.fail(comm.rank)
    comm.Barrier()
    control.add_samples(0)
    winners = comm.allgather(comm.rank if won else None)
    firsts = [rank for rank in winners if rank is not None]
    assert len(firsts) == 1, winners
    assert control.failed == firsts[0] == control.read_failed()
    control.close()
