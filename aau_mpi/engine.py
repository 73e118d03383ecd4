"""The iteration of spec section 3, on one rank, over a flat float32 vector.

    deposit(x, k) into every out-neighbour          # one-sided, returns fast
    g = compute()                                   # gradient at x
    S = policy.select(header snapshot)              # polled until it answers
    x = mix(x, payloads of S) - lr * scale * g      # adapt-with-combine
    k = k + 1

The engine wires a policy (pure decisions) to a mailbox (transport) and calls
back into the caller for the model: `compute()` returns the gradient at the
current x as a flat float32 array, `apply_step(g, scale)` takes the local
optimiser step on x in place (plain SGD, momentum, weight decay: the caller's
choice; optimiser state is never averaged). x itself is updated in place, so
a torch model whose parameters view x sees every mix.

The `allreduce` policy has no mailbox: gradients are averaged with Allreduce.
"""

import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from aau_mpi.counter import SharedCounter
from aau_mpi.mailbox import Backoff, Mailbox


@dataclass
class StopRule:
    """Training ends at the first of these that holds (None = not used)."""
    max_iterations: int = None     # this rank's iterations
    sample_budget: int = None      # samples used by all ranks together
    samples_per_step: int = 1
    time_limit: float = None       # seconds of this rank's training


@dataclass
class Iteration:
    """What one iteration did: the policy's visible behaviour, logged per rank."""
    iteration: int
    time: float                   # job clock at the end of the iteration
    compute_seconds: float
    wait_seconds: float
    averaged: list = field(default_factory=list)   # ranks whose deposits were mixed
    staleness: list = field(default_factory=list)  # k - their deposits' iterations
    step_scale: float = 1.0


class Engine:
    """One rank's decentralized training loop. Collective to build and to finish."""

    def __init__(self, comm, graph, policy, x, clock=MPI.Wtime):
        self.comm, self.policy, self.x, self.clock = comm, policy, x, clock
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.k = 0
        self.mailbox = None
        if policy.uses_mailbox:
            self.mailbox = Mailbox(comm, graph.in_neighbours(self.rank),
                                   graph.out_neighbours(self.rank), x.size,
                                   policy.slots_per_neighbour, clock)
            self._mix = np.empty_like(x)
            self._incoming = np.empty_like(x)

    def step(self, compute, apply_step):
        """One iteration; returns its Iteration record."""
        k = self.k
        if self.mailbox:
            self.mailbox.deposit(self.x, k)
            self.policy.deposited(self.clock())
        started = self.clock()
        g = compute()
        computed = self.clock()
        self.policy.computed(computed - started)
        record = Iteration(k, 0.0, computed - started, 0.0)
        if self.mailbox:
            self._mix_neighbours(k, record)
            record.step_scale = self.policy.step_scale()
        else:
            self.comm.Allreduce(MPI.IN_PLACE, g)
            g /= self.size
        record.wait_seconds = self.clock() - computed
        apply_step(g, record.step_scale)
        self.k += 1
        record.time = self.clock()
        return record

    def _mix_neighbours(self, k, record):
        backoff = Backoff()
        while (selection := self.policy.select(self.mailbox.headers(), k, self.clock())) is None:
            backoff.wait()
        np.multiply(self.x, selection.self_weight, out=self._mix)
        used = []
        for (j, slot), weight in zip(selection.slots, selection.weights):
            got = self.mailbox.read(j, slot, out=self._incoming)
            if got is None:  # every copy overlapped a write: its weight stays with x
                self._mix += weight * self.x
                continue
            self._incoming *= weight
            self._mix += self._incoming
            used.append((j, slot, got[0]))
            record.averaged.append(self.mailbox.in_neighbours[j])
            record.staleness.append(int(k - got[0]["iteration"]))
        self.x[:] = self._mix
        self.policy.mixed(used, k)

    def run(self, compute, apply_step, stop, on_iteration=None):
        """Iterate until `stop` holds, then `finish()`; returns the averaged x."""
        counter = SharedCounter(self.comm) if stop.sample_budget else None
        started = time.monotonic()
        try:
            while True:
                record = self.step(compute, apply_step)
                if on_iteration:
                    on_iteration(record)
                done = stop.max_iterations is not None and self.k >= stop.max_iterations
                if stop.time_limit is not None:
                    done |= time.monotonic() - started >= stop.time_limit
                if counter:
                    used = counter.add(stop.samples_per_step) + stop.samples_per_step
                    done |= used >= stop.sample_budget
                if not self.mailbox:
                    # Synchronous data parallelism: all ranks stop together or
                    # the next Allreduce would wait for the stopped ones.
                    done = self.comm.allreduce(done, op=MPI.LOR)
                if done:
                    return self.finish()
        finally:
            if counter:
                counter.close()

    def finish(self):
        """Collective: final 'done' deposit, free the windows, average all x_i.

        The done deposit comes first so that no neighbour waits for this rank
        while it waits in the collectives below.
        """
        if self.mailbox:
            self.mailbox.deposit(self.x, self.k, done=True)
        average = np.empty(self.x.shape, np.float64)
        self.comm.Allreduce(self.x.astype(np.float64), average)
        if self.mailbox:
            self.mailbox.close()
        return (average / self.size).astype(np.float32)
