"""Policies: which neighbours' deposits to average, and with what weights (spec section 4).

A policy is pure decision logic. It sees a header snapshot (the structured
array `Mailbox.headers()` returns, shape (in-neighbours, slots)), its own
iteration k and the job clock, and answers with a `Selection` or None
(None = keep waiting; the optimizer polls again). It never touches MPI, so
every rule is unit-tested with synthetic snapshots and a fake clock.

Definitions at worker i (spec section 4): slot j is *fresh* when its seq is
greater than the seq that i last averaged from j; `last_used[j]` is i's
iteration when it last averaged a deposit from j (0 at the start, when every
rank holds the same broadcast x). A neighbour is *live* unless its header
says done or the watchdog found it stalled (`skip`), until it deposits again.

Clocks (spec contract 5): header times are the job clock (`World.clock`),
one time line for all ranks within the start-up offset measurement. A
sender's interval is measured from its own timestamps only, per iteration of
its own (time difference over iteration difference between two of its
deposits), so it is the same whether the sender deposits here every
iteration (a static graph) or every P-th (a time-varying one). The adaptive
rule compares a predicted arrival (the sender's time plus its interval) with
the receiver's job clock, which contract 5 allows once the offset is removed.

Time-varying graphs: `graph.period` P (1 for static graphs). The neighbours
are the union over the period; an edge is active once per period, so a
staleness bound of tau *rounds* is tau * P iterations.

Timing is kept as exponentially weighted moving averages (EWMA, weight
EWMA_WEIGHT on the newest sample).
"""

from dataclasses import dataclass

import numpy as np

from aau_mpi.base import checks
from aau_mpi.base.registry import Registry

POLICIES = Registry("policy")
EWMA_WEIGHT = 0.3


@dataclass
class Selection:
    """What to mix: x <- self_weight * x + sum(weights[n] * payload of slots[n])."""
    slots: list       # (neighbour index, slot index) pairs
    weights: list     # one per slot
    self_weight: float


def ewma(old, sample):
    return sample if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample


class Policy:
    """Shared bookkeeping: freshness, last use, liveness, deposit-interval estimates."""

    uses_mailbox = True
    slots_per_neighbour = 1
    synchronous = False     # True: ranks must agree on iteration numbers (see resume)
    waits = True            # False: select never returns None (wait-free)
    time_dependent = False  # True: select's answer can change with the clock alone

    def __init__(self, graph, rank):
        self.graph, self.rank = graph, rank
        self.neighbours = graph.in_neighbours(rank)
        self.period = graph.period
        m = len(self.neighbours)
        self.last_seq = np.zeros((m, self.slots_per_neighbour), np.int64)
        self.last_used = np.zeros(m, np.int64)
        self.interval = [None] * m          # EWMA of each neighbour's seconds per iteration
        self._seen = [(0, 0.0, 0)] * m      # (newest seq, its time, its iteration) per neighbour
        self.own_interval = None            # EWMA of this rank's seconds per iteration
        self.compute_time = None            # EWMA of this rank's compute phase
        self._last_deposit_time = None
        self._skipped_at = np.full(m, -1, np.int64)  # seq at which a neighbour was skipped

    # ---- timing the optimizer reports --------------------------------------

    def deposited(self, now):
        """This rank deposited (once per iteration) at job time `now`."""
        if self._last_deposit_time is not None:
            self.own_interval = ewma(self.own_interval, now - self._last_deposit_time)
        self._last_deposit_time = now

    def computed(self, seconds):
        self.compute_time = ewma(self.compute_time, seconds)

    # ---- reading a snapshot -----------------------------------------------

    def observe(self, headers):
        """Update each neighbour's seconds-per-iteration EWMA from its new header times."""
        seqs = headers["seq"].sum(axis=1)
        for j in np.flatnonzero(seqs > np.array([seen[0] for seen in self._seen])):
            newest = int(np.argmax(headers["seq"][j]))
            time, iteration = float(headers["time"][j, newest]), int(headers["iteration"][j, newest])
            old_seq, old_time, old_iteration = self._seen[j]
            if old_seq > 0 and iteration > old_iteration:
                self.interval[j] = ewma(self.interval[j],
                                        (time - old_time) / (iteration - old_iteration))
            self._seen[j] = (int(seqs[j]), time, iteration)

    def done(self, headers):
        """Neighbours not to wait for or mix: finished, or skipped as stalled and
        not heard from since."""
        return headers["done"].any(axis=1) | (headers["seq"].sum(axis=1) == self._skipped_at)

    def skip(self, neighbours, headers):
        """Stop waiting for, and mixing, `neighbours` (the watchdog found them
        stalled) until they deposit again."""
        for j in neighbours:
            self._skipped_at[j] = headers["seq"][j].sum()

    def fresh(self, headers, slot=0):
        return headers["seq"][:, slot] > self.last_seq[:, slot]

    def deposit_slot(self, k):
        """This rank's slot, in each target's window, for its iteration-k deposit."""
        return 0

    def select(self, headers, k, now):
        raise NotImplementedError

    def mixed(self, used, k):
        """The optimizer averaged `used`: list of (neighbour index, slot, header record)."""
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
        return Selection([(int(j), slot) for j in members], [share] * len(members), share)


@POLICIES.register("dpsgd")
class DPSGD(Policy):
    """Synchronous D-PSGD: wait for every live active in-neighbour's iteration-k deposit.

    A neighbour j waits for this rank only through the path that leads from
    here back to it, so it may deposit several rounds of its edge before this
    rank has read the first: on an undirected graph two (the path is the edge
    itself), on a directed one the distance back plus one (3 on the directed
    exponential graph of 4 ranks, where 0 -> 2 -> 3 is rank 3's way to hear
    from rank 0). The mailbox keeps `graph.rounds_in_flight` slots per
    neighbour (the most, over every edge), keyed by the edge's round
    (k // period) modulo that count, so no deposit replaces one not yet read.
    Weights: the graph's mixing row at k (Metropolis-Hastings on static
    undirected graphs, uniform 1/(in-degree + 1) on static directed ones,
    1/2 on the one-peer graph); a finished neighbour's weight stays with
    this rank.
    """

    synchronous = True

    def __init__(self, graph, rank):
        self.slots_per_neighbour = graph.rounds_in_flight
        super().__init__(graph, rank)
        self._index = {j: n for n, j in enumerate(self.neighbours)}
        self._kind = "uniform" if graph.directed else "metropolis"

    def deposit_slot(self, k):
        return self.graph.edge_round(k) % self.slots_per_neighbour

    def select(self, headers, k, now):
        slot = self.deposit_slot(k)
        self_weight, row = self.graph.mixing_row(self.rank, k, self._kind)
        active = [self._index[j] for j in row]
        has_k = (headers["iteration"][active, slot] == k) & \
            (headers["seq"][active, slot] > self.last_seq[active, slot])
        if not (has_k | self.done(headers)[active]).all():
            return None
        members = [j for j, ready in zip(active, has_k) if ready]
        weights = [row[self.neighbours[j]] for j in members]
        return Selection([(j, slot) for j in members], weights, 1.0 - sum(weights))


@POLICIES.register("allreduce")
class AllreduceSGD(Policy):
    """Synchronous data-parallel SGD: the optimizer averages gradients with Allreduce."""

    uses_mailbox = False
    synchronous = True


@POLICIES.register("async")
class Async(Policy):
    """Wait-free gossip: mix every live neighbour's latest deposit, fresh or not."""

    waits = False

    def select(self, headers, k, now):
        return self.uniform(np.flatnonzero((headers["seq"][:, 0] > 0) & ~self.done(headers)))


@POLICIES.register("async_one")
class AsyncOne(Policy):
    """AD-PSGD-style pairwise averaging: one random live neighbour, weight 1/2."""

    waits = False

    def __init__(self, graph, rank, seed=0):
        super().__init__(graph, rank)
        self.rng = np.random.default_rng([checks.integer("policy.seed", seed, 0), rank])

    def select(self, headers, k, now):
        candidates = np.flatnonzero((headers["seq"][:, 0] > 0) & ~self.done(headers))
        if candidates.size == 0:
            return Selection([], [], 1.0)
        return self.uniform([int(self.rng.choice(candidates))])

    def state_dict(self):
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]


@POLICIES.register("fixed_k")
class FixedK(Policy):
    """Backup workers: wait until k live neighbours are fresh, average the newest k.

    With more than k fresh, the k newest deposits (smallest age now minus
    the deposit's time, each against this rank's clock) are the least stale
    models; the older fresh ones wait for a later iteration. k is capped at
    the live neighbours, and at the neighbours active per iteration: on the
    one-peer graph a neighbour deposits here once per period, so on average
    one fresh deposit arrives per iteration and waiting for two would slow
    every rank down without end.
    """

    def __init__(self, graph, rank, k=1):
        super().__init__(graph, rank)
        self.k = min(checks.integer("policy.k", k, 1),
                     max(1, len(graph.active_in(rank, 0))))

    def select(self, headers, k, now):
        fresh = np.flatnonzero(self.fresh(headers))
        wanted = min(self.k, int((~self.done(headers)).sum()))
        if fresh.size < wanted:
            return None
        age = now - headers["time"][fresh, 0]
        newest_first = fresh[np.argsort(age, kind="stable")]
        return self.uniform(newest_first[:max(wanted, 1)])


@POLICIES.register("aau")
class AAU(Policy):
    """DSGD-AAU as this project realises it (spec section 4, rules 1-3).

    tau:   staleness bound per edge, in rounds of the edge (tau * period
           iterations); a live neighbour unused that long is waited for, so
           every edge is used at least once every tau + 1 rounds and the
           union of used edges stays the whole graph.
    gamma: extra-wait budget as a fraction of this rank's compute time, for
           neighbours predicted to deposit within it from now (0 = fastest first).
    rate_scaled, max_scale: the local step is scaled by
           clip(own seconds per iteration / median neighbour's, 1, max_scale),
           so a slow worker's fewer steps carry more weight. Off by default:
           on strongly non-IID shards the straggler's larger steps pulled its
           model away and the averaged model did worst on its own classes
           (docs/benchmarks.md, "The rate-scaled step").
    """

    def __init__(self, graph, rank, tau=4, gamma=0.0, rate_scaled=False, max_scale=4.0):
        super().__init__(graph, rank)
        self.tau = checks.integer("policy.tau", tau, 1)
        self.gamma = checks.number("policy.gamma", gamma, 0.0)
        self.max_scale = checks.number("policy.max_scale", max_scale, 1.0)
        self.rate_scaled = checks.boolean("policy.rate_scaled", rate_scaled)
        self.time_dependent = self.gamma > 0  # rule 3's budget runs out with time
        self._wait_started = None
        self._last_mixed = -1   # the iteration that last averaged a neighbour

    def select(self, headers, k, now):
        self.observe(headers)
        if self._wait_started is None:
            self._wait_started = now
        # A finished neighbour's final deposit is fresh once, and mixed once.
        live, fresh = ~self.done(headers), self.fresh(headers)

        # Rule 1: at least one fresh neighbour a round, unless none is live. On
        # the one-peer graph one deposit arrives per iteration on average: a
        # rank that mixed two at once and then waited every iteration for the
        # next waited for its sender's current iteration, and chains of such
        # waits took 69 % of the time at 16 ranks (D-PSGD: 7 %).
        if not fresh.any() and live.any() and k - self._last_mixed >= self.period:
            return None
        # Rule 2: a live neighbour unused for tau rounds must be waited for.
        overdue = live & (k - self.last_used >= self.tau * self.period)
        if (overdue & ~fresh).any():
            return None
        # Rule 3: wait, at most the budget in all, while a neighbour is
        # predicted to deposit between now and the end of the budget; one
        # whose predicted deposit is already past is late, not about to come.
        deadline = self._wait_started + self.gamma * (self.compute_time or 0.0)
        if now < deadline and any(now <= self.predicted_arrival(j) <= deadline
                                  for j in np.flatnonzero(live & ~fresh)):
            return None

        self._wait_started = None
        return self.uniform(np.flatnonzero(fresh))

    def mixed(self, used, k):
        super().mixed(used, k)
        if used:
            self._last_mixed = k

    def predicted_arrival(self, j):
        """Neighbour j's next deposit here: its last one plus a period of its iterations."""
        seq, time, _ = self._seen[j]
        if seq == 0 or self.interval[j] is None:
            return float("inf")
        return time + self.period * self.interval[j]

    def step_scale(self):
        known = [t for t in self.interval if t is not None]
        if not self.rate_scaled or self.own_interval is None or not known:
            return 1.0
        return float(np.clip(self.own_interval / np.median(known), 1.0, self.max_scale))


def build_policy(name, graph, rank, params=None):
    """The policy registered as `name`, for this rank of `graph`. It remembers how it
    was built (`spec`), so that it can be built again for another graph (a job
    that lost a rank goes on with the survivors' graph)."""
    policy = POLICIES.build(name, params, graph, rank)
    policy.spec = (name, dict(params or {}))
    return policy
