"""Straggler models: delays, reproducibility, agreement, validation."""

import numpy as np
import pytest

from aau_mpi.algorithms import stragglers
from aau_mpi.base.errors import UserError
from aau_mpi.algorithms.stragglers import STRAGGLERS, build_straggler, slow_down


def delays(model, n, step=0.1):
    return np.array([model.delay(step, 0.01 * i) for i in range(n)])


def test_registry_names():
    assert STRAGGLERS.names() == ["fixed", "none", "random", "shifting"]


def test_none_never_delays():
    model = build_straggler("none", 0, 4)
    assert (delays(model, 100) == 0).all()
    assert model.describe().startswith("none")


def test_fixed_delays_listed_ranks_only():
    for rank in range(4):
        model = build_straggler("fixed", rank, 4, {"ranks": [1, 3], "slowdown": 3.0})
        expected = 2.0 * 0.25 if rank in (1, 3) else 0.0
        assert model.delay(0.25, 5.0) == pytest.approx(expected)
    assert build_straggler("fixed", 1, 4).delay(0.5, 0) == pytest.approx(1.5)  # defaults
    assert build_straggler("fixed", 0, 4).describe() == "fixed: ranks [1] 4x slower"


def test_fixed_takes_one_slowdown_per_listed_rank():
    params = {"ranks": [3, 1], "slowdown": [8, 2.5]}
    assert [build_straggler("fixed", rank, 4, params).delay(0.1, 0) for rank in range(4)] \
        == pytest.approx([0.0, 0.15, 0.0, 0.7])
    assert build_straggler("fixed", 0, 4, params).describe() == \
        "fixed: rank 1 2.5x, rank 3 8x slower"


def test_random_reproducible_per_seed_and_rank():
    params = {"probability": 0.5, "seed": 7}
    a = delays(build_straggler("random", 2, 4, params), 200)
    b = delays(build_straggler("random", 2, 4, params), 200)
    other_rank = delays(build_straggler("random", 3, 4, params), 200)
    other_seed = delays(build_straggler("random", 2, 4, {**params, "seed": 8}), 200)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, other_rank)
    assert not np.array_equal(a, other_seed)


def test_random_probability_and_exponential_mean():
    model = build_straggler("random", 0, 2, {"probability": 0.2, "scale": 0.05})
    d = delays(model, 5000)
    assert 0.17 < (d > 0).mean() < 0.23
    assert d[d > 0].mean() == pytest.approx(0.05, rel=0.15)


def test_random_pareto_heavier_tail_than_exponential():
    common = {"probability": 1.0, "scale": 0.01, "shape": 1.5}
    exp = delays(build_straggler("random", 0, 1, {**common, "distribution": "exponential"}), 5000)
    par = delays(build_straggler("random", 0, 1, {**common, "distribution": "pareto"}), 5000)
    assert np.percentile(par, 99.9) > np.percentile(exp, 99.9)


def test_random_only_listed_ranks():
    params = {"probability": 1.0, "ranks": [0]}
    assert (delays(build_straggler("random", 0, 3, params), 50) > 0).all()
    assert (delays(build_straggler("random", 1, 3, params), 50) == 0).all()


def test_shifting_all_ranks_agree_and_count():
    n, params = 6, {"count": 2, "slowdown": 3.0, "period": 1.0, "seed": 5}
    models = [build_straggler("shifting", r, n, params) for r in range(n)]
    sets = set()
    for now in np.linspace(0, 50, 200):
        slow = [r for r, m in enumerate(models) if m.delay(0.1, now) > 0]
        assert len(slow) == 2
        assert all(m.slow_set(now) == slow for m in models)
        assert models[slow[0]].delay(0.1, now) == pytest.approx(0.2)
        sets.add(tuple(slow))
    assert len(sets) > 1


def test_shifting_set_constant_within_a_window():
    model = build_straggler("shifting", 0, 8, {"count": 3, "period": 10.0})
    assert model.slow_set(20.0) == model.slow_set(29.9)
    assert model.describe().startswith("shifting: 3 of 8 ranks 4x slower")


@pytest.mark.parametrize("name, params, field", [
    ("fixed", {"slowdown": 0.5}, "slowdown"),
    ("fixed", {"ranks": [1, 2], "slowdown": [2]}, "one factor per rank"),
    ("fixed", {"ranks": [1, 1], "slowdown": [2, 3]}, "each rank once"),
    ("fixed", {"ranks": [1], "slowdown": [0.5]}, "slowdown"),
    ("fixed", {"slowdown": "fast"}, "slowdown"),
    ("fixed", {"ranks": [5]}, "ranks"),
    ("fixed", {"ranks": 1}, "ranks"),
    ("fixed", {"ranks": ["a"]}, "ranks"),
    ("random", {"probability": 1.5}, "probability"),
    ("random", {"distribution": "gauss"}, "distribution"),
    ("random", {"scale": -1}, "scale"),
    ("random", {"shape": 0}, "shape"),
    ("random", {"seed": -1}, "seed"),
    ("random", {"seed": 1.5}, "seed"),
    ("random", {"ranks": [-1]}, "ranks"),
    ("shifting", {"count": 5}, "count"),
    ("shifting", {"count": True}, "count"),
    ("shifting", {"slowdown": 0.9}, "slowdown"),
    ("shifting", {"period": 0}, "period"),
    ("shifting", {"seed": "x"}, "seed"),
    ("fixed", {"slowdwn": 2}, "slowdown"),  # unknown parameter: suggests the right one
])
def test_invalid_parameters(name, params, field):
    with pytest.raises(UserError, match=field) as err:
        build_straggler(name, 0, 4, params)
    assert "\n" not in str(err.value)


def test_ranks_error_names_world_size():
    with pytest.raises(UserError, match="world size 4"):
        build_straggler("fixed", 0, 4, {"ranks": [4]})


def test_unknown_model_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'shifting'"):
        build_straggler("shiftng", 0, 4)


def test_slow_down_sleeps_only_when_positive(monkeypatch):
    slept = []
    monkeypatch.setattr(stragglers.time, "sleep", slept.append)
    assert slow_down(build_straggler("fixed", 0, 2), 0.1, 0) == 0
    assert slept == []
    assert slow_down(build_straggler("fixed", 1, 2), 0.1, 0) == pytest.approx(0.3)
    assert slept == [pytest.approx(0.3)]


def test_random_resumes_its_delay_sequence_from_a_checkpointed_state():
    import json
    params = {"probability": 0.5, "seed": 7}
    model = build_straggler("random", 2, 4, params)
    delays(model, 50)
    state = json.loads(json.dumps(model.state_dict()))
    resumed = build_straggler("random", 2, 4, params)
    resumed.load_state_dict(state)
    assert np.array_equal(delays(model, 100), delays(resumed, 100))
    assert build_straggler("fixed", 1, 4, {}).state_dict() == {}
