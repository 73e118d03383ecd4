"""Learning-rate schedules and LearningRate: values, shape, warm-up, validation."""

import math

import pytest

from aau_mpi.base.errors import UserError
from aau_mpi.algorithms.learning_rate import MIN_WARMUP_FACTOR, SCHEDULES, LearningRate

GRID = [i / 100 for i in range(101)]


def test_constant_is_one_everywhere():
    multiplier = SCHEDULES.build("constant")
    assert all(multiplier(p) == 1.0 for p in GRID)


def test_step_multiplies_by_factor_at_each_milestone():
    multiplier = SCHEDULES.build("step", {"milestones": [0.5, 0.75], "factor": 0.1})
    assert multiplier(0.0) == multiplier(0.49) == 1.0
    assert multiplier(0.5) == pytest.approx(0.1)  # reaching a milestone passes it
    assert multiplier(0.74) == pytest.approx(0.1)
    assert multiplier(0.75) == multiplier(1.0) == pytest.approx(0.01)


def test_step_without_milestones_is_constant():
    multiplier = SCHEDULES.build("step", {"milestones": []})
    assert multiplier(0.9) == 1.0


def test_cosine_runs_from_one_to_final():
    multiplier = SCHEDULES.build("cosine", {"final": 0.1})
    assert multiplier(0.0) == pytest.approx(1.0)
    assert multiplier(0.5) == pytest.approx(0.55)
    assert multiplier(1.0) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule, params", [("constant", {}), ("step", {}),
                                              ("step", {"factor": 1.0}), ("cosine", {}),
                                              ("cosine", {"final": 0.3})])
def test_schedules_never_increase(schedule, params):
    lr = LearningRate(0.1, schedule, params)
    values = [lr(p) for p in GRID]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(v > 0 for v in values[:-1])


def test_learning_rate_scales_the_schedule_and_clips_progress():
    lr = LearningRate(0.2, "step", {"milestones": [0.5], "factor": 0.5})
    assert lr(0.25) == pytest.approx(0.2)
    assert lr(0.75) == pytest.approx(0.1)
    assert lr(-3) == lr(0.0)
    assert lr(7) == lr(1.0)


def test_warmup_ramps_linearly_then_follows_the_schedule():
    lr = LearningRate(1.0, "cosine", warmup=0.2)
    assert lr(0.1) == pytest.approx(0.5 * (0.5 + 0.5 * math.cos(math.pi * 0.1)))
    assert lr(0.2) == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 0.2))
    ramp = [lr(p) for p in GRID[:21]]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))


def test_warmup_starts_small_but_not_at_zero():
    lr = LearningRate(0.5, warmup=0.1)
    assert lr(0.0) == pytest.approx(0.5 * MIN_WARMUP_FACTOR)
    assert lr(0.0) > 0


def test_no_warmup_starts_at_full_lr():
    assert LearningRate(0.5)(0.0) == 0.5


@pytest.mark.parametrize("kwargs, field", [
    ({"lr": 0}, "optim.lr"),
    ({"lr": -0.1}, "optim.lr"),
    ({"lr": float("nan")}, "optim.lr"),
    ({"lr": float("inf")}, "optim.lr"),
    ({"lr": True}, "optim.lr"),
    ({"lr": "0.1"}, "optim.lr"),
    ({"lr": 10 ** 400}, "optim.lr"),
    ({"lr": 0.1, "warmup": 1.0}, "optim.warmup"),
    ({"lr": 0.1, "warmup": -0.1}, "optim.warmup"),
    ({"lr": 0.1, "schedule": "step", "params": {"factor": 0}}, "optim.schedule.factor"),
    ({"lr": 0.1, "schedule": "step", "params": {"factor": 1.5}}, "optim.schedule.factor"),
    ({"lr": 0.1, "schedule": "step", "params": {"factor": "x"}}, "optim.schedule.factor"),
    ({"lr": 0.1, "schedule": "step", "params": {"milestones": [0.75, 0.5]}},
     "optim.schedule.milestones"),
    ({"lr": 0.1, "schedule": "step", "params": {"milestones": [0.5, 0.5]}},
     "optim.schedule.milestones"),
    ({"lr": 0.1, "schedule": "step", "params": {"milestones": [0, 0.5]}},
     "optim.schedule.milestones"),
    ({"lr": 0.1, "schedule": "step", "params": {"milestones": [0.5, 1]}},
     "optim.schedule.milestones"),
    ({"lr": 0.1, "schedule": "step", "params": {"milestones": ["a"]}},
     "optim.schedule.milestones"),
    ({"lr": 0.1, "schedule": "step", "params": {"milestones": 0.5}}, "optim.schedule.milestones"),
    ({"lr": 0.1, "schedule": "cosine", "params": {"final": 1.5}}, "optim.schedule.final"),
    ({"lr": 0.1, "schedule": "cosine", "params": {"final": -0.5}}, "optim.schedule.final"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(UserError) as info:
        LearningRate(**kwargs)
    message = str(info.value)
    assert f"{field} must be" in message
    assert "\n" not in message


def test_unknown_schedule_and_parameter_suggest_the_closest():
    with pytest.raises(UserError, match="did you mean 'cosine'"):
        LearningRate(0.1, "cosin")
    with pytest.raises(UserError, match="did you mean 'factor'"):
        LearningRate(0.1, "step", {"facter": 0.5})


@pytest.mark.parametrize("scaling,expected", [("none", 0.1), ("linear", 0.1 * 64 * 32 / 256),
                                              ("sqrt", 0.1 * (64 * 32 / 256) ** 0.5)])
def test_lr_scales_with_the_global_batch_against_the_reference(scaling, expected):
    """64 ranks of batch 32 against a reference batch of 256 (Goyal et al.'s)."""
    lr = LearningRate(0.1, scaling=scaling, global_batch=64 * 32, reference_batch=256)
    assert lr(0.5) == pytest.approx(expected)
    warm = LearningRate(0.1, warmup=0.1, scaling=scaling, global_batch=64 * 32,
                        reference_batch=256)
    assert warm(0.05) == pytest.approx(expected / 2), "the warm-up ramps to the scaled lr"


def test_bad_scaling_names_its_field():
    with pytest.raises(UserError, match="optim.scale_lr must be one of none, linear, sqrt"):
        LearningRate(0.1, scaling="square")
