"""Straggler models: make chosen ranks slower, reproducibly (spec section 5).

A model's `delay(step_seconds, now)` returns the extra seconds this rank should
sleep after a step whose compute took `step_seconds`, at job time `now`
(seconds since the job start). `delay` never sleeps; `slow_down` is the one
place that does (time.sleep costs no CPU). Every model has a one-line
`describe()` for logs.

Models (build with `build_straggler(name, rank, world_size, params)`):
  none      never delays.
  fixed     ranks=[1], slowdown=4.0: listed ranks sleep (slowdown-1) x step;
            slowdown may be a list, one factor per listed rank, in their order
            (e.g. a tenth of the ranks 2-8x slower).
  random    probability=0.1, distribution="exponential"|"pareto", scale=0.01,
            shape=2.0, seed=0, ranks=None (all), relative=False, cap=None:
            each step, with probability p, an extra delay ~ Exp(mean=scale)
            or rng.pareto(shape) * scale, at most `cap`, in seconds, or with
            relative=True in steps (times the step's time: a transient scaled
            to the step). A heavy tail without a cap eventually draws a stall
            of minutes, which the watchdog rightly ends. The
            RNG is seeded by (seed, rank), so each rank draws its own
            reproducible sequence (one draw sequence per call of `delay`).
  shifting  count=1, slowdown=4.0, period=10.0, seed=0: the slow set changes
            every `period` seconds; the set of window floor(now/period) comes
            from an RNG keyed by (seed, window), so all ranks agree without
            communicating.
"""

import math
import time

import numpy as np

from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import Registry

STRAGGLERS = Registry("straggler model")

DISTRIBUTIONS = ("exponential", "pareto")


# ---------------------------------------------------------------- validation

def _field(name):
    return f"stragglers.{name}"


def _ranks(value, world_size):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise UserError(f"stragglers.ranks must be a list of ranks, got {value!r}")
    ranks = sorted({checks.integer(_field("ranks"), r) for r in value})
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise UserError(f"stragglers.ranks {bad} out of range for world size {world_size}: "
                        f"use ranks 0..{world_size - 1}")
    return ranks


# ---------------------------------------------------------------- models

class Straggler:
    """Base: a model without random state has nothing to checkpoint."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class NoStraggler(Straggler):
    def delay(self, step_seconds, now):
        return 0.0

    def describe(self):
        return "none: no stragglers"


class FixedStraggler(Straggler):
    """factors: {rank: slowdown} of the slow ranks."""

    def __init__(self, rank, factors):
        self.factors = factors
        self.slowdown = factors.get(rank, 1.0)

    def delay(self, step_seconds, now):
        return (self.slowdown - 1.0) * step_seconds

    def describe(self):
        ranks = sorted(self.factors)
        if len(set(self.factors.values())) == 1:
            return f"fixed: ranks {ranks} {self.factors[ranks[0]]:g}x slower"
        return "fixed: " + ", ".join(f"rank {r} {self.factors[r]:g}x" for r in ranks) + " slower"


class RandomStraggler(Straggler):
    def __init__(self, rank, probability, distribution, scale, shape, seed, ranks, relative,
                 cap):
        self.probability, self.distribution = probability, distribution
        self.scale, self.shape, self.seed, self.ranks = scale, shape, seed, ranks
        self.relative, self.cap = relative, cap
        self.active = ranks is None or rank in ranks
        self.rng = np.random.default_rng([seed, rank])

    def delay(self, step_seconds, now):
        if not self.active or self.rng.random() >= self.probability:
            return 0.0
        if self.distribution == "exponential":
            drawn = float(self.rng.exponential(self.scale))
        else:
            drawn = float(self.rng.pareto(self.shape) * self.scale)
        if self.cap is not None:
            drawn = min(drawn, self.cap)
        return drawn * (step_seconds if self.relative else 1.0)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]

    def describe(self):
        who = "all ranks" if self.ranks is None else f"ranks {self.ranks}"
        unit = " steps" if self.relative else "s"
        law = (f"exponential(mean={self.scale:g}{unit})" if self.distribution == "exponential"
               else f"pareto(shape={self.shape:g}) x {self.scale:g}{unit}")
        cap = f" (at most {self.cap:g}{unit})" if self.cap is not None else ""
        return (f"random: {who}, p={self.probability:g} per step, extra delay ~ {law}{cap}, "
                f"seed {self.seed}")


class ShiftingStraggler(Straggler):
    def __init__(self, rank, world_size, count, slowdown, period, seed):
        self.rank, self.world_size = rank, world_size
        self.count, self.slowdown, self.period, self.seed = count, slowdown, period, seed
        self._window, self._set = None, ()

    def window(self, now):
        return max(0, math.floor(now / self.period))

    def slow_set(self, now):
        """The sorted slow ranks at job time `now` (same on every rank)."""
        w = self.window(now)
        if w != self._window:
            rng = np.random.default_rng([self.seed, w])
            chosen = rng.choice(self.world_size, size=self.count, replace=False)
            self._window, self._set = w, tuple(sorted(int(r) for r in chosen))
        return list(self._set)

    def delay(self, step_seconds, now):
        if self.rank in self.slow_set(now):
            return (self.slowdown - 1.0) * step_seconds
        return 0.0

    def describe(self):
        return (f"shifting: {self.count} of {self.world_size} ranks {self.slowdown:g}x slower, "
                f"set redrawn every {self.period:g}s, seed {self.seed}")


# ---------------------------------------------------------------- factories

@STRAGGLERS.register("none")
def _none(rank, world_size):
    return NoStraggler()


@STRAGGLERS.register("fixed")
def _fixed(rank, world_size, ranks=(1,), slowdown=None):
    # None stands for 4.0: a float default would make the config reader refuse a list.
    slowdown = 4.0 if slowdown is None else slowdown
    listed = _ranks(ranks, world_size)
    if isinstance(slowdown, (list, tuple)):
        if len(slowdown) != len(ranks) or len(listed) != len(ranks):
            raise UserError(f"stragglers.slowdown lists {len(slowdown)} factors for "
                            f"stragglers.ranks {list(ranks)}: give one factor per rank, each "
                            f"rank once (or one number for all)")
        factors = [checks.number(_field("slowdown"), f, 1) for f in slowdown]
        return FixedStraggler(rank, dict(zip((int(r) for r in ranks), factors)))
    factor = checks.number(_field("slowdown"), slowdown, 1)
    return FixedStraggler(rank, dict.fromkeys(listed, factor))


@STRAGGLERS.register("random")
def _random(rank, world_size, probability=0.1, distribution="exponential", scale=0.01,
            shape=2.0, seed=0, ranks=None, relative=False, cap=None):
    probability = checks.number(_field("probability"), probability, 0, 1)
    checks.choice(_field("distribution"), distribution, DISTRIBUTIONS)
    return RandomStraggler(rank, probability, distribution,
                           checks.number(_field("scale"), scale, 0),
                           checks.number(_field("shape"), shape, above=0),
                           checks.integer(_field("seed"), seed, 0),
                           None if ranks is None else _ranks(ranks, world_size),
                           checks.boolean(_field("relative"), relative),
                           None if cap is None else checks.number(_field("cap"), cap, above=0))


@STRAGGLERS.register("shifting")
def _shifting(rank, world_size, count=1, slowdown=4.0, period=10.0, seed=0):
    count = checks.integer(_field("count"), count, 0, world_size)
    return ShiftingStraggler(rank, world_size, count, checks.number(_field("slowdown"), slowdown, 1),
                             checks.number(_field("period"), period, above=0),
                             checks.integer(_field("seed"), seed, 0))


def build_straggler(name, rank, world_size, params=None):
    """The straggler model `name` for `rank` of `world_size` ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return STRAGGLERS.build(name, params, rank, world_size)


def slow_down(model, step_seconds, now):
    """Sleep for the model's delay after a step (if any); return the delay."""
    d = model.delay(step_seconds, now)
    if d > 0:
        time.sleep(d)
    return d
