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

from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from aau_mpi.mailbox import Backoff, Mailbox

# Every microsecond between a deposit (or a collective's completion) and
# this rank noticing it adds to the iteration: poll at least every 0.1 ms
# (a 1 ms cap made LeNet iterations on digits 1.6x slower, for every policy).
POLL_CAP = 1e-4


def wait_for(request, idle=None):
    """Complete a non-blocking collective, calling `idle` while it is pending.

    Waiting in Test rather than in a blocking call lets the caller watch for
    a rank that never arrives (a blocking Allreduce cannot be left).
    """
    backoff = Backoff(cap=POLL_CAP)
    while not request.Test():
        backoff.wait()
        if idle:
            idle()


@dataclass
class Iteration:
    """What one iteration did: the policy's visible behaviour, logged per rank."""
    iteration: int
    started: float                # clock at the start of the iteration
    deposit_seconds: float
    compute_seconds: float
    wait_seconds: float           # waiting for the policy, or the Allreduce
    time: float = 0.0             # clock at the end of the iteration
    averaged: list = field(default_factory=list)   # ranks whose deposits were mixed
    staleness: list = field(default_factory=list)  # k - their deposits' iterations
    step_scale: float = 1.0


class Engine:
    """One rank's decentralized training loop. Collective to build and to finish."""

    def __init__(self, comm, graph, policy, x, clock=MPI.Wtime, checksum=False):
        self.comm, self.policy, self.x, self.clock = comm, policy, x, clock
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.k = 0
        self.mailbox = None
        if policy.uses_mailbox:
            self.mailbox = Mailbox(comm, graph.in_neighbours(self.rank),
                                   graph.out_neighbours(self.rank), x.size,
                                   policy.slots_per_neighbour, clock, checksum)
            self._mix = np.empty_like(x)
            self._incoming = np.empty_like(x)

    def step(self, compute, apply_step, idle=None):
        """One iteration; returns its Iteration record.

        `idle()`, if given, is called between polls of the policy while this
        rank waits for neighbours: the caller's chance to serve job-wide
        events that the neighbours it waits for may be blocked in.
        """
        k = self.k
        started = self.clock()
        if self.mailbox:
            self.mailbox.deposit(self.x, k)
            self.policy.deposited(self.clock())
        deposited = self.clock()
        g = compute()
        computed = self.clock()
        self.policy.computed(computed - deposited)
        record = Iteration(k, started, deposited - started, computed - deposited, 0.0)
        if self.mailbox:
            self._mix_neighbours(k, record, idle)
            record.step_scale = self.policy.step_scale()
        else:
            wait_for(self.comm.Iallreduce(MPI.IN_PLACE, g), idle)
            g /= self.size
        record.wait_seconds = self.clock() - computed
        apply_step(g, record.step_scale)
        self.k += 1
        record.time = self.clock()
        return record

    def _mix_neighbours(self, k, record, idle):
        backoff = Backoff(cap=POLL_CAP)
        while (selection := self.policy.select(self.mailbox.headers(), k, self.clock())) is None:
            backoff.wait()
            if idle:
                idle()
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

    def finish(self, idle=None):
        """Collective: final 'done' deposit, free the windows, average all x_i.

        The done deposit comes first so that no neighbour waits for this rank
        while it waits in the collectives below.
        """
        if self.mailbox:
            self.mailbox.deposit(self.x, self.k, done=True)
        average = np.empty(self.x.shape, np.float64)
        mine = self.x.astype(np.float64)  # alive until the request completes
        wait_for(self.comm.Iallreduce(mine, average), idle)
        if self.mailbox:
            self.mailbox.close()
        return (average / self.size).astype(np.float32)
