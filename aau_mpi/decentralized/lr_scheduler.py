"""ProgressLR: a torch learning-rate scheduler over the job's global progress.

Under a global budget ranks take different numbers of steps (a fast rank
many, a straggler few), so a schedule over a rank's own step count, such as
CosineAnnealingLR(T_max=steps), is wrong on most ranks: it ends early on the
fast ones and never ends on the slow ones. ProgressLR's factor is a function
of `opt.progress()`, the fraction of the job's budget used, which every rank
shares; the schedules and the warm-up are aau_mpi.algorithms.learning_rate's (the trainer's).

    opt = aau_mpi.DecentralizedOptimizer(..., schedule=aau_mpi.Schedule(sample_budget=n))
    scheduler = aau_mpi.ProgressLR(opt, schedule="cosine", warmup=0.05, final=0.0)
    while not opt.should_stop():
        ...; opt.step(); scheduler.step()
"""

import torch

from aau_mpi.base.errors import UserError
from aau_mpi.algorithms.learning_rate import LearningRate
from aau_mpi.decentralized.optimizer import DecentralizedOptimizer


class ProgressLR(torch.optim.lr_scheduler.LRScheduler):
    """Each group's lr = its initial lr x schedule(progress) x warm-up(progress).

    optimizer: a DecentralizedOptimizer whose Schedule has a sample or time budget.
    schedule:  "cosine" (final=0.0), "step" (milestones=(0.5, 0.75), factor=0.1) or
               "constant" (aau_mpi.algorithms.learning_rate.SCHEDULES), its parameters as keywords.
    warmup:    the fraction of the budget over which the lr rises linearly, from
               lr / 1000.
    step() sets the lr for the job's progress now: call it after each opt.step().
    """

    def __init__(self, optimizer, schedule="cosine", warmup=0.0, **params):
        if not isinstance(optimizer, DecentralizedOptimizer):
            raise UserError(f"ProgressLR follows a DecentralizedOptimizer's global progress, "
                            f"got {type(optimizer).__name__}: pass the DecentralizedOptimizer")
        if not (optimizer.schedule and optimizer.schedule.budgeted):
            raise UserError("ProgressLR needs a budget to measure progress against: build the "
                            "DecentralizedOptimizer with schedule=aau_mpi.Schedule("
                            "sample_budget=...) or time_budget=...")
        self.factor = LearningRate(1.0, schedule, params, warmup)
        super().__init__(optimizer)

    def get_lr(self):
        factor = self.factor(self.optimizer.progress())
        return [base * factor for base in self.base_lrs]
