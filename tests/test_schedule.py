"""The job schedule: progress, evaluation points and the stop, as event words."""

from aau_mpi.algorithms.schedule import FINISHED, PREEMPTED, events_announced, pack_events
from aau_mpi.algorithms.schedule import Schedule


def test_progress_is_the_larger_fraction_of_the_budgets_clipped_to_one():
    schedule = Schedule(sample_budget=1000, time_budget=100.0)
    assert schedule.progress(0, 0.0) == 0.0
    assert schedule.progress(250, 50.0) == 0.5
    assert schedule.progress(900, 10.0) == 0.9
    assert schedule.progress(5000, 0.0) == 1.0
    assert Schedule(time_budget=10.0).progress(10**9, 2.5) == 0.25


def test_evaluations_fall_due_by_samples_or_seconds_but_never_past_the_budget():
    schedule = Schedule(sample_budget=1000, eval_samples=300, eval_seconds=10.0)
    assert not schedule.eval_due(1, 299, 9.9)
    assert schedule.eval_due(1, 300, 0.0)
    assert schedule.eval_due(1, 0, 10.0)
    assert schedule.eval_due(3, 900, 0.0) and not schedule.eval_due(4, 1200, 0.0)


def test_next_word_announces_evaluations_in_order_then_the_stop():
    schedule = Schedule(sample_budget=1000, eval_samples=300)
    word = 0
    assert schedule.next_word(word, 0, 100, 0.0) is None
    word = schedule.next_word(word, 0, 650, 0.0)
    assert events_announced(word) == (1, 0)
    word = schedule.next_word(word, 0, 650, 0.0)
    assert events_announced(word) == (2, 0), "a second due evaluation follows the first"
    assert schedule.next_word(word, 0, 650, 0.0) is None
    word = schedule.next_word(word, 0, 1000, 0.0)
    assert events_announced(word) == (3, FINISHED)
    assert schedule.next_word(word, 0, 5000, 0.0) is None, "nothing follows the stop"


def test_a_resumed_job_continues_the_evaluation_numbering():
    schedule = Schedule(sample_budget=1000, eval_samples=300)
    # Two evaluations were done before the resume: the next is number 3, at 900.
    assert schedule.next_word(0, 2, 650, 0.0) is None
    assert events_announced(schedule.next_word(0, 2, 900, 0.0)) == (1, 0)


def test_preemption_stops_at_once_and_words_only_grow():
    schedule = Schedule(sample_budget=1000, eval_samples=300)
    word = schedule.next_word(pack_events(1), 0, 950, 0.0, preempted=True)
    assert events_announced(word) == (2, PREEMPTED)
    assert pack_events(1) < pack_events(1, FINISHED) < pack_events(2)
