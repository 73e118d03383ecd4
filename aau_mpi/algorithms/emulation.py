"""An emulated accelerator: each step's compute phase lasts a modelled device's time.

Each rank still computes real gradients of a real model; the step then sleeps
until its compute phase has taken `step_seconds` x (1 + a jitter draw) x its
straggler's factor. While it sleeps the CPU is idle, as a host's is while its
GPU computes, so many ranks sharing a few cores behave like as many
accelerators: the MPI, the windows, the policies and the waiting stay real,
and a slow rank frees nothing that the others could use.

The straggler models (stragglers.py) apply to the modelled step: a `fixed`
4x rank's compute phase lasts 4 x step_seconds whatever its real work took.
Real work longer than the modelled time is an overrun: the step then lasts
as long as the real work (nothing is paid back later), and the share of
overrun steps says how far the emulation holds (bench/emulated.py refuses a
run with more than 5 % of its steps overrun).

    emulate: {step_seconds: 0.05, jitter: 0.1}      # the job config's section
    DecentralizedOptimizer(..., emulate={"step_seconds": 0.05, "jitter": 0.1})
"""

import time

import numpy as np

from aau_mpi.base import checks

# The longest sleep between two calls of pace()'s `idle`: an evaluation that
# rank 0 announces is joined within this (plus the events' own poll interval).
IDLE_EVERY = 0.005


class EmulatedAccelerator:
    """A modelled device's step time for one rank, with its overrun count.

    step_seconds: the modelled compute phase of one step (forward, backward).
    jitter:       a fraction j in [0, 1): each step's time is step_seconds x
                  (1 + u), u uniform in [-j, j], drawn from an RNG seeded by
                  (seed, rank), so a run repeats.
    """

    def __init__(self, step_seconds, jitter=0.0, seed=0, rank=0):
        self.step_seconds = checks.number("emulate.step_seconds", step_seconds, above=0)
        self.jitter = checks.number("emulate.jitter", jitter, 0, below=1)
        self.seed = checks.integer("emulate.seed", seed, 0)
        self.rng = np.random.default_rng([self.seed, rank])
        self.steps = 0
        self.overruns = 0

    def modelled_seconds(self, straggler, now):
        """This step's compute time on the modelled device, the straggler's slowdown included."""
        base = self.step_seconds
        if self.jitter:
            base *= 1.0 + self.jitter * self.rng.uniform(-1.0, 1.0)
        return base + straggler.delay(base, now)

    def pace(self, compute_seconds, straggler, now, clock=None, idle=None):
        """Sleep out the rest of the modelled step after `compute_seconds` of real
        work (time.sleep costs no CPU); returns (the sleep, whether it overran).

        With `idle`, the sleep is cut into slices of at most IDLE_EVERY seconds
        of `clock` (the clock `now` is read on) and `idle` is called between
        them: the host serves the job's events while its device computes, so
        an evaluation does not wait for the end of every rank's step. Time
        that `clock` does not count (an evaluation's) is not part of the step.
        """
        modelled = self.modelled_seconds(straggler, now)
        self.steps += 1
        if compute_seconds > modelled:
            self.overruns += 1
            return 0.0, True
        rest = modelled - compute_seconds
        if idle is None:
            time.sleep(rest)
            return rest, False
        end = now + rest
        while (left := end - clock()) > 0:
            time.sleep(min(left, IDLE_EVERY))
            idle()
        return rest, False

    @property
    def overrun_share(self):
        return self.overruns / self.steps if self.steps else 0.0

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "steps": self.steps,
                "overruns": self.overruns}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.steps, self.overruns = int(state["steps"]), int(state["overruns"])

    def describe(self):
        jitter = f" +-{self.jitter:.0%}" if self.jitter else ""
        return f"emulated accelerator: {self.step_seconds:g} s a step{jitter}"
