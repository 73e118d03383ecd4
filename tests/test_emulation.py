"""The emulated accelerator: modelled step times, straggler factors, overruns, input."""

import time

import numpy as np
import pytest

from aau_mpi.algorithms.emulation import EmulatedAccelerator
from aau_mpi.algorithms.stragglers import build_straggler
from aau_mpi.base.errors import UserError
from aau_mpi.decentralized.arguments import resolve_emulation
from aau_mpi.training.config_loading import load_config

NONE = build_straggler("none", 0, 4)


def test_a_step_lasts_the_modelled_time_times_the_stragglers_slowdown():
    accelerator = EmulatedAccelerator(0.02)
    assert accelerator.modelled_seconds(NONE, 0.0) == 0.02
    slow = build_straggler("fixed", 1, 4, {"ranks": [1], "slowdown": 4.0})
    assert accelerator.modelled_seconds(slow, 0.0) == pytest.approx(0.08)
    quarter = [build_straggler("fixed", r, 8, {"ranks": [1, 5], "slowdown": 2.0})
               for r in range(8)]
    assert [accelerator.modelled_seconds(s, 0.0) for s in quarter] == pytest.approx(
        [0.02, 0.04, 0.02, 0.02, 0.02, 0.04, 0.02, 0.02])


def test_jitter_stays_in_its_band_repeats_per_seed_and_differs_per_rank():
    def draws(seed, rank):
        accelerator = EmulatedAccelerator(0.1, jitter=0.2, seed=seed, rank=rank)
        return np.array([accelerator.modelled_seconds(NONE, 0.0) for _ in range(500)])

    first = draws(3, 0)
    assert 0.08 <= first.min() < 0.085 and 0.115 < first.max() <= 0.12
    assert np.array_equal(first, draws(3, 0))
    assert not np.array_equal(first, draws(3, 1))
    assert not np.array_equal(first, draws(4, 0))


def test_transients_relative_to_the_step_scale_with_it():
    params = {"distribution": "pareto", "probability": 1.0, "scale": 1.0, "shape": 1.5,
              "relative": True, "seed": 5}
    short, long = (build_straggler("random", 0, 4, params) for _ in range(2))
    ratios = [long.delay(0.2, 0.0) / short.delay(0.1, 0.0) for _ in range(20)]
    assert ratios == pytest.approx([2.0] * 20)
    seconds = build_straggler("random", 0, 4, {**params, "relative": False})
    assert seconds.delay(0.2, 0.0) == pytest.approx(build_straggler(
        "random", 0, 4, params).delay(1.0, 0.0)), "relative=False: scale in seconds"
    assert "1 steps" in short.describe()


def test_pace_sleeps_out_the_step_and_counts_the_steps_real_work_overran():
    accelerator = EmulatedAccelerator(0.05)
    started = time.perf_counter()
    assert accelerator.pace(0.01, NONE, 0.0) == (pytest.approx(0.04), False)
    assert time.perf_counter() - started >= 0.04
    assert accelerator.pace(0.06, NONE, 0.0) == (0.0, True)
    assert accelerator.pace(0.05, NONE, 0.0)[1] is False  # exactly the modelled time
    assert (accelerator.steps, accelerator.overruns) == (3, 1)
    assert accelerator.overrun_share == pytest.approx(1 / 3)
    slow = build_straggler("fixed", 1, 4)
    assert accelerator.pace(0.1, slow, 0.0)[1] is False, "4 x 0.05 s covers 0.1 s of work"


def test_pace_serves_between_slices_and_does_not_count_what_its_clock_leaves_out():
    """The host serves events while its device computes; an evaluation served
    there (0.05 s that the training clock excludes) does not shorten the step."""
    accelerator = EmulatedAccelerator(0.06)
    excluded = [0.0]
    clock = lambda: time.perf_counter() - excluded[0]  # noqa: E731 (the training clock)
    calls = []

    def idle():
        calls.append(clock())
        if len(calls) == 2:  # an evaluation
            time.sleep(0.05)
            excluded[0] += 0.05

    started_wall, started = time.perf_counter(), clock()
    assert accelerator.pace(0.01, NONE, started, clock=clock, idle=idle) == \
        (pytest.approx(0.05), False)
    assert clock() - started >= 0.05 and time.perf_counter() - started_wall >= 0.1
    assert len(calls) >= 0.05 / 0.005 - 1, "served every slice of the sleep"


def test_its_state_continues_the_jitter_draws_and_the_counts():
    accelerator = EmulatedAccelerator(0.1, jitter=0.5, seed=1, rank=2)
    accelerator.pace(1.0, NONE, 0.0)
    saved = accelerator.state_dict()
    expected = [accelerator.modelled_seconds(NONE, 0.0) for _ in range(5)]
    restored = EmulatedAccelerator(0.1, jitter=0.5, seed=1, rank=2)
    restored.load_state_dict(saved)
    assert [restored.modelled_seconds(NONE, 0.0) for _ in range(5)] == expected
    assert (restored.steps, restored.overruns) == (1, 1)


@pytest.mark.parametrize("arguments,message", [
    ({"step_seconds": 0}, "emulate.step_seconds must be a number > 0, got 0"),
    ({"step_seconds": "fast"}, "emulate.step_seconds must be a number > 0, got 'fast'"),
    ({"step_seconds": 0.1, "jitter": 1.0}, "emulate.jitter must be a number >= 0 and < 1"),
    ({"step_seconds": 0.1, "speed": 2}, "emulate takes step_seconds (required), jitter and seed"),
    ({"jitter": 0.1}, "emulate takes step_seconds (required)"),
    (0.05, "emulate must be a dict such as {'step_seconds': 0.05}"),
])
def test_bad_emulation_arguments_are_one_line_errors(arguments, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("{", r"\{").replace("}", r"\}")):
        resolve_emulation(arguments, 0)


def test_the_config_section_loads_and_refuses_bad_values():
    config = load_config("jobs/demo.yaml", ["emulate.step_seconds=0.05", "emulate.jitter=0.1"])
    assert (config.emulate.step_seconds, config.emulate.jitter) == (0.05, 0.1)
    assert load_config("jobs/demo.yaml", []).emulate.step_seconds is None, "off by default"
    assert "emulate: {step_seconds: 0.05, jitter: 0.1}" in config.to_yaml()
    for override, message in [("emulate.step_seconds=-1", "emulate.step_seconds"),
                              ("emulate.jitter=2", "emulate.jitter"),
                              ("emulate.speed=2", "emulate.speed")]:
        with pytest.raises(UserError, match=message):
            load_config("jobs/demo.yaml", [override])


def test_a_capped_heavy_tail_never_stalls_past_its_cap():
    params = {"distribution": "pareto", "probability": 1.0, "scale": 1.0, "shape": 0.5,
              "relative": True, "seed": 0}
    capped = build_straggler("random", 0, 4, {**params, "cap": 20})
    free = build_straggler("random", 0, 4, params)
    drawn = np.array([free.delay(0.1, 0.0) for _ in range(2000)])
    limited = np.array([capped.delay(0.1, 0.0) for _ in range(2000)])
    assert drawn.max() > 2.0, "shape 0.5: the uncapped tail draws stalls of many steps"
    assert limited.max() == pytest.approx(2.0) and np.array_equal(
        limited, np.minimum(drawn, 2.0)), "the same draws, cut at 20 steps of 0.1 s"
    assert "(at most 20 steps)" in capped.describe()
