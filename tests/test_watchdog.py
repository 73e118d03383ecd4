"""The stall watchdog's clock, without MPI: what counts as waiting."""

import time

from aau_mpi.decentralized import watchdog as watchdog_module
from aau_mpi.decentralized.watchdog import Watchdog


def poll_for(dog, seconds, every=0.01):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        dog.waiting(None, lambda: ("its neighbours: fresh", [], None), synchronous=False)
        time.sleep(every)


def test_a_pause_of_the_waiting_rank_itself_is_not_waiting(monkeypatch, capsys):
    """A rank stopped (SIGSTOP, a suspended job) in a wait for 6 s found its neighbours
    fresh when it resumed, yet its first poll counted the 6 s and ended the job."""
    monkeypatch.setattr(watchdog_module, "PAUSE_SECONDS", 0.05)
    dog = Watchdog(seconds=0.4, action="warn")
    dog.waiting(None)
    time.sleep(0.6)                      # no polls: this rank was not running
    poll_for(dog, 0.1)
    assert capsys.readouterr().err == "", "the pause counted as waiting"
    poll_for(dog, 0.5)                   # polled waiting counts
    report = capsys.readouterr().err
    assert "has waited 0.4 s for its neighbours; its neighbours: fresh" in report, report


def test_each_wait_is_timed_from_its_start(capsys):
    dog = Watchdog(seconds=0.3, action="warn")
    poll_for(dog, 0.2)
    dog.reset()                          # the wait ended
    poll_for(dog, 0.2)
    assert capsys.readouterr().err == ""
    poll_for(dog, 0.2)
    assert "has waited 0.3 s" in capsys.readouterr().err
