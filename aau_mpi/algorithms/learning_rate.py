"""Learning-rate schedules: the lr as a function of training progress.

`progress` in [0, 1] is the fraction of the training budget used so far. It is
global (all ranks share one budget), so ranks that run different numbers of
iterations still follow the same schedule at the same time.

Schedules (SCHEDULES; each factory takes keyword params and returns
multiplier(progress)):
  constant                          1 throughout.
  step(milestones=(0.5, 0.75), factor=0.1)
                                    times `factor` at each milestone passed.
  cosine(final=0.0)                 from 1 down to `final` along a half cosine.

LearningRate(lr, schedule, params, warmup, scaling=...) combines a schedule with
a linear warm-up over the first `warmup` fraction of the budget, and, for many
ranks, scales lr with the global batch (all ranks' batches of one round, N x B)
against the reference batch the lr was tuned for, as large-batch practice does
(Goyal et al. 2017: linear scaling with warm-up; sqrt scaling, Krizhevsky 2014
and Hoffer et al. 2017, is gentler):
  none    lr as given
  linear  lr x global / reference
  sqrt    lr x sqrt(global / reference)
"""

import bisect
import math

from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import Registry

SCHEDULES = Registry("lr schedule")
LR_SCALINGS = ("none", "linear", "sqrt")
# Warm-up starts at this fraction of the lr instead of 0, so that the very
# first steps (at progress 0) still move the model.
MIN_WARMUP_FACTOR = 1e-3


@SCHEDULES.register("constant")
def constant():
    return lambda progress: 1.0


@SCHEDULES.register("step")
def step(milestones=(0.5, 0.75), factor=0.1):
    field = "optim.schedule.milestones"
    if not isinstance(milestones, (list, tuple)):
        raise UserError(f"{field} must be a list of fractions like [0.5, 0.75], "
                        f"got {milestones!r}")
    points = [checks.number(field, m, above=0, below=1) for m in milestones]
    if any(a >= b for a, b in zip(points, points[1:])):
        raise UserError(f"{field} must be increasing fractions in (0, 1), "
                        f"got {list(milestones)!r}")
    factor = checks.number("optim.schedule.factor", factor, above=0, maximum=1)
    # bisect_right: a milestone counts as passed from the moment progress reaches it.
    return lambda progress: factor ** bisect.bisect_right(points, progress)


@SCHEDULES.register("cosine")
def cosine(final=0.0):
    final = checks.number("optim.schedule.final", final, 0, 1)
    return lambda progress: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


class LearningRate:
    """lr(progress) = lr * scale * schedule(progress) * min(1, progress / warmup).

    With warmup > 0 the warm-up factor is at least MIN_WARMUP_FACTOR, so the lr
    at progress 0 is lr / 1000 rather than 0. Progress is clipped to [0, 1].
    `scale` comes from `scaling` (see the module docstring); it needs
    global_batch and reference_batch unless scaling is "none".
    """

    def __init__(self, lr, schedule="constant", params=None, warmup=0.0, scaling="none",
                 global_batch=None, reference_batch=None):
        self.lr = checks.number("optim.lr", lr, above=0)
        self.warmup = checks.number("optim.warmup", warmup, 0, below=1)
        checks.choice("optim.scale_lr", scaling, LR_SCALINGS)
        self.scale = 1.0
        if scaling != "none" and global_batch is not None:
            ratio = global_batch / checks.integer("optim.reference_batch", reference_batch, 1)
            self.scale = ratio if scaling == "linear" else math.sqrt(ratio)
        self.schedule = schedule
        self.multiplier = SCHEDULES.build(schedule, params)

    def __call__(self, progress):
        progress = min(max(float(progress), 0.0), 1.0)
        rate = self.lr * self.scale * self.multiplier(progress)
        if self.warmup > 0:
            rate *= min(1.0, max(progress / self.warmup, MIN_WARMUP_FACTOR))
        return rate
