"""Policies: which neighbours' deposits to average, and with what weights (spec section 4).

A policy is pure decision logic. It sees a header snapshot (the structured
array `Mailbox.headers()` returns, shape (in-neighbours, slots)), its own
iteration k and a clock reading, and answers with a `Selection` or None
(None = keep waiting; the engine polls again). It never touches MPI, so every
rule is unit-tested with synthetic snapshots and a fake clock.

Definitions at worker i (spec section 4): slot j is *fresh* when its seq is
greater than the seq that i last averaged from j; `last_used[j]` is i's
iteration when it last averaged a deposit from j (0 at the start, when every
rank holds the same broadcast x).

Timing that the adaptive rules use is kept as exponentially weighted moving
averages (EWMA, weight EWMA_WEIGHT on the newest sample): each neighbour's
interval between deposits (from its own header timestamps, so only a
sender's times are compared with each other), this rank's interval between
deposits and its compute time.
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np

from aau_mpi.errors import UserError
from aau_mpi.registry import Registry

POLICIES = Registry("policy")
EWMA_WEIGHT = 0.3


@dataclass
class Selection:
    """What to mix: x <- self_weight * x + sum(weights[n] * payload of slots[n])."""
    slots: list       # (neighbour index, slot index) pairs
    weights: list     # one per slot
    self_weight: float


def require_int(field, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_number(field, value, minimum):
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < minimum):
        raise UserError(f"{field} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def ewma(old, sample):
    return sample if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample


class Policy:
    """Shared bookkeeping: freshness, last use, deposit-interval estimates."""

    uses_mailbox = True
    slots_per_neighbour = 1
    synchronous = False     # True: ranks must agree on iteration numbers (see resume)

    def __init__(self, graph, rank):
        self.rank = rank
        self.neighbours = graph.in_neighbours(rank)
        m = len(self.neighbours)
        self.last_seq = np.zeros((m, self.slots_per_neighbour), np.int64)
        self.last_used = np.zeros(m, np.int64)
        self.interval = [None] * m          # EWMA of each neighbour's deposit interval
        self._seen = [(0, 0.0)] * m         # (newest seq, its time) per neighbour
        self.own_interval = None            # EWMA of this rank's deposit interval
        self.compute_time = None            # EWMA of this rank's compute phase
        self._last_deposit_time = None
        self._skipped_at = np.full(m, -1, np.int64)  # seq at which a neighbour was skipped

    # ---- timing the engine reports ----------------------------------------

    def deposited(self, now):
        if self._last_deposit_time is not None:
            self.own_interval = ewma(self.own_interval, now - self._last_deposit_time)
        self._last_deposit_time = now

    def computed(self, seconds):
        self.compute_time = ewma(self.compute_time, seconds)

    # ---- reading a snapshot -----------------------------------------------

    def observe(self, headers):
        """Update each neighbour's deposit-interval EWMA from new header times."""
        for j in range(len(self.neighbours)):
            newest = int(np.argmax(headers["seq"][j]))
            seq, time = int(headers["seq"][j].sum()), float(headers["time"][j, newest])
            old_seq, old_time = self._seen[j]
            if seq > old_seq:
                if old_seq > 0:
                    self.interval[j] = ewma(self.interval[j], (time - old_time) / (seq - old_seq))
                self._seen[j] = (seq, time)

    def done(self, headers):
        """Neighbours that have finished, or were skipped and have not deposited since:
        never wait for them."""
        return headers["done"].any(axis=1) | (headers["seq"].sum(axis=1) == self._skipped_at)

    def skip(self, neighbours, headers):
        """Stop waiting for `neighbours` (the watchdog found them stalled) until
        they deposit again."""
        for j in neighbours:
            self._skipped_at[j] = headers["seq"][j].sum()

    def fresh(self, headers, slot=0):
        return headers["seq"][:, slot] > self.last_seq[:, slot]

    def select(self, headers, k, now):
        raise NotImplementedError

    def mixed(self, used, k):
        """The engine averaged `used`: list of (neighbour index, slot, header record)."""
        for j, slot, record in used:
            self.last_seq[j, slot] = record["seq"]
            self.last_used[j] = k

    def step_scale(self):
        """Multiplier of the local learning rate (1 unless a policy adapts it)."""
        return 1.0

    def state_dict(self):
        """What a checkpoint keeps: last use and timing estimates (JSON-able).

        Sequence numbers are not kept: a resumed job has new, empty mailboxes,
        so `last_seq` and the deposits seen restart from zero.
        """
        return {"last_used": self.last_used.tolist(), "interval": list(self.interval),
                "own_interval": self.own_interval, "compute_time": self.compute_time}

    def load_state_dict(self, state):
        self.last_used[:] = state["last_used"]
        self.interval = list(state["interval"])
        self.own_interval, self.compute_time = state["own_interval"], state["compute_time"]

    def uniform(self, members, slot=0):
        """Uniform weights over this rank and `members`."""
        share = 1.0 / (len(members) + 1)
        return Selection([(j, slot) for j in members], [share] * len(members), share)


@POLICIES.register("dpsgd")
class DPSGD(Policy):
    """Synchronous D-PSGD: wait for every live neighbour's iteration-k deposit.

    Two slots per neighbour, by iteration parity: a neighbour may deposit k+1
    before this rank has read k, but cannot deposit k+2 before this rank has
    deposited k+1, which it does only after reading k. Metropolis-Hastings
    weights; a finished neighbour's weight stays with this rank.
    """

    slots_per_neighbour = 2
    synchronous = True

    def __init__(self, graph, rank):
        super().__init__(graph, rank)
        row = graph.mixing_matrix("metropolis")[rank]
        self.weights = [float(row[j]) for j in self.neighbours]

    def select(self, headers, k, now):
        parity = k % 2
        has_k = headers["iteration"][:, parity] == k
        has_k &= headers["seq"][:, parity] > self.last_seq[:, parity]
        if not (has_k | self.done(headers)).all():
            return None
        members = [j for j in range(len(self.neighbours)) if has_k[j]]
        weights = [self.weights[j] for j in members]
        return Selection([(j, parity) for j in members], weights, 1.0 - sum(weights))


@POLICIES.register("allreduce")
class AllreduceSGD(Policy):
    """Synchronous data-parallel SGD: the engine averages gradients with Allreduce."""

    uses_mailbox = False
    synchronous = True


@POLICIES.register("async")
class Async(Policy):
    """Wait-free gossip: mix every neighbour's latest deposit, fresh or not."""

    def select(self, headers, k, now):
        deposited = np.flatnonzero(headers["seq"][:, 0] > 0)
        return self.uniform(list(deposited))


@POLICIES.register("async_one")
class AsyncOne(Policy):
    """AD-PSGD-style pairwise averaging: one random neighbour, weight 1/2."""

    def __init__(self, graph, rank, seed=0):
        super().__init__(graph, rank)
        self.rng = np.random.default_rng([seed, rank])

    def select(self, headers, k, now):
        deposited = np.flatnonzero(headers["seq"][:, 0] > 0)
        if deposited.size == 0:
            return Selection([], [], 1.0)
        return self.uniform([int(self.rng.choice(deposited))])

    def state_dict(self):
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]


@POLICIES.register("fixed_k")
class FixedK(Policy):
    """Backup workers: wait for the first k fresh neighbours, average them uniformly."""

    def __init__(self, graph, rank, k=1):
        super().__init__(graph, rank)
        self.k = require_int("policy.k", k, 1)

    def select(self, headers, k, now):
        fresh = np.flatnonzero(self.fresh(headers))
        wanted = min(self.k, int((~self.done(headers)).sum()))
        if fresh.size < wanted:
            return None
        arrival_order = fresh[np.argsort(headers["time"][fresh, 0], kind="stable")]
        return self.uniform(list(arrival_order[:max(wanted, 1)]))


@POLICIES.register("aau")
class AAU(Policy):
    """DSGD-AAU as this project realises it (spec section 4, rules 1-3).

    tau:   staleness bound per edge; a neighbour unused for tau iterations is
           waited for, so every edge is used at least once every tau + 1
           iterations and the union of used edges stays the whole graph.
    gamma: extra-wait budget as a fraction of this rank's compute time, for
           neighbours predicted to deposit within it (0 = fastest first).
    rate_scaled, max_scale: the local step is scaled by
           clip(own interval / median neighbour interval, 1, max_scale), so a
           slow worker's fewer steps still carry its data's weight.
    """

    def __init__(self, graph, rank, tau=4, gamma=0.0, rate_scaled=True, max_scale=4.0):
        super().__init__(graph, rank)
        self.tau = require_int("policy.tau", tau, 1)
        self.gamma = require_number("policy.gamma", gamma, 0.0)
        self.max_scale = require_number("policy.max_scale", max_scale, 1.0)
        if not isinstance(rate_scaled, bool):
            raise UserError(f"policy.rate_scaled must be true or false, got {rate_scaled!r}")
        self.rate_scaled = rate_scaled
        self._wait_started = None

    def select(self, headers, k, now):
        self.observe(headers)
        if self._wait_started is None:
            self._wait_started = now
        fresh, live = self.fresh(headers), ~self.done(headers)

        # Rule 1: at least one fresh neighbour, unless all have finished.
        if not fresh.any() and live.any():
            return None
        # Rule 2: a live neighbour unused for tau iterations must be waited for.
        overdue = live & (k - self.last_used >= self.tau)
        if (overdue & ~fresh).any():
            return None
        # Rule 3: within the budget, wait for neighbours predicted to arrive in it.
        deadline = self._wait_started + self.gamma * (self.compute_time or 0.0)
        if now < deadline and any(self.predicted_arrival(j) <= deadline
                                  for j in np.flatnonzero(live & ~fresh)):
            return None

        self._wait_started = None
        return self.uniform(list(np.flatnonzero(fresh)))

    def predicted_arrival(self, j):
        """Neighbour j's next deposit time: its last one plus its usual interval."""
        seq, time = self._seen[j]
        if seq == 0 or self.interval[j] is None:
            return float("inf")
        return time + self.interval[j]

    def step_scale(self):
        known = [t for t in self.interval if t is not None]
        if not self.rate_scaled or self.own_interval is None or not known:
            return 1.0
        return float(np.clip(self.own_interval / np.median(known), 1.0, self.max_scale))


def build_policy(name, graph, rank, params=None):
    """The policy registered as `name`, for this rank of `graph`."""
    return POLICIES.build(name, params, graph, rank)
