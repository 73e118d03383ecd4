"""Communication graphs and their mixing weights: Graph, the generators
(GENERATORS, generate) and the graph of the ranks left after failures (without).

Edges point the way data flows: edge (i, j) means "rank i deposits into rank
j's mailbox", so j reads from i. Node ids are the ranks 0..n-1; every rank
always keeps a weight for itself, so there are no self-loops.

Generators: ring, torus (rows), exponential (directed), complete, star (hub),
random_regular (degree, seed), erdos_renyi (p, seed), and the time-varying
exponential_one_peer.

Time-varying graphs: a graph has a `period` P (1 for every static graph) and,
at iteration k, the edges `active_out(i, k)` / `active_in(i, k)`; the
in/out-neighbour lists are the union over the period (what a mailbox must
hold slots for). `edge_round(k) = k // P` counts how often the edges active
at k have been active before; `rounds_in_flight` is how many rounds of one
edge a synchronous policy can have deposited and not yet read (dpsgd keeps
that many slots per neighbour, keyed by the round modulo it).
exponential_one_peer(n): at iteration k rank i deposits only into
i + 2^(k mod L) mod n and reads only from i - 2^(k mod L) mod n, L =
ceil(log2 n) (SGP's time-varying exponential graph, BlueFog's dynamic
one-peer exp-2): one model copy per iteration at any n, and for n a power of
two L iterations of (I + P_k)/2 average exactly.

The topology YAML format and load_topology: aau_mpi/algorithms/topology.py.
This module is pure numpy: it must not import mpi4py or torch.
"""

import functools
import math
from collections import deque

import numpy as np

from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import Registry

GENERATORS = Registry("topology generator")
MIXING_KINDS = ("metropolis", "uniform")
# Random generators give up after this many disconnected draws.
MAX_ATTEMPTS = 100


class Graph:
    """An immutable communication graph over ranks 0..n-1."""

    def __init__(self, n, edges, directed=False, name=None):
        if not checks.is_integer(n) or n < 1:
            raise UserError(f"a graph needs a positive integer number of nodes, got {n!r}")
        self._n = int(n)
        self._directed = bool(directed)
        self._name = name or f"graph(n={n})"
        self._edges = self._checked_edges(edges)
        in_sets = [set() for _ in range(self._n)]
        out_sets = [set() for _ in range(self._n)]
        for i, j in self._edges:
            out_sets[i].add(j)
            in_sets[j].add(i)
            if not self._directed:
                out_sets[j].add(i)
                in_sets[i].add(j)
        self._in = tuple(tuple(sorted(s)) for s in in_sets)
        self._out = tuple(tuple(sorted(s)) for s in out_sets)

    def _checked_edges(self, edges):
        """Sorted edge tuple; undirected edges stored once as (low, high)."""
        seen = {}
        for edge in edges:
            if not isinstance(edge, (list, tuple)) or len(edge) != 2:
                raise UserError(f"edge {edge!r} is not a pair: write each edge as [i, j]")
            i, j = edge
            if not (checks.is_integer(i) and checks.is_integer(j)):
                raise UserError(f"edge {list(edge)!r} has a non-integer node id: "
                                f"node ids are the integers 0..{self._n - 1}")
            i, j = int(i), int(j)
            for node in (i, j):
                if not 0 <= node < self._n:
                    raise UserError(f"edge [{i}, {j}] names node {node}, out of range: "
                                    f"node ids are 0..{self._n - 1} for {self._n} nodes")
            if i == j:
                raise UserError(f"edge [{i}, {j}] is a self-loop: remove it "
                                "(every node always keeps a weight for itself)")
            key = (i, j) if self._directed else (min(i, j), max(i, j))
            if key in seen:
                same = "" if self._directed else " (undirected: [i, j] and [j, i] are one edge)"
                raise UserError(f"duplicate edge [{i}, {j}] repeats {list(seen[key])}{same}: "
                                "list each edge once")
            seen[key] = (i, j)
        return tuple(sorted(seen))

    @property
    def n(self):
        return self._n

    @property
    def directed(self):
        return self._directed

    @property
    def edges(self):
        return self._edges

    @property
    def name(self):
        return self._name

    def in_neighbours(self, i):
        """Nodes that i reads from (they deposit into i)."""
        return list(self._in[i])

    def out_neighbours(self, i):
        """Nodes that i deposits into."""
        return list(self._out[i])

    def degree(self, i):
        """In-degree: how many neighbours i mixes with."""
        return len(self._in[i])

    # ---- time (static graphs: every edge at every iteration) ---------------

    period = 1

    def active_out(self, i, k):
        """Nodes that i deposits into at iteration k."""
        return self.out_neighbours(i)

    def active_in(self, i, k):
        """Nodes whose iteration-k deposits i reads."""
        return self.in_neighbours(i)

    def edge_round(self, k):
        """How often the edges active at iteration k were active before k."""
        return k // self.period

    @functools.cached_property
    def rounds_in_flight(self):
        """The most rounds of one edge deposited and not yet read, when every rank
        waits at iteration k for the iteration-k deposits of its active in-neighbours.

        Writer j's deposit at iteration m' waits for reader i's deposit at m + 1
        (made after i read j's deposit at m) once a path of edges, each active
        when it is taken, leads from i at m + 1 to j by m'; until then j may
        deposit every round of the edge from m's on. On a static graph that is
        the distance from i back to j plus one: 2 on undirected graphs, up to n
        on a directed ring. The answer is the maximum over edges and phases.
        """
        worst = 1
        for phase in range(self.period):
            edges = np.array([(i, j) for i in range(self._n) for j in self.active_in(i, phase)],
                             np.int64).reshape(-1, 2)
            readers, writers = edges[:, 0], edges[:, 1]
            # waits[i, a]: a's deposit at iteration k waits for i's at phase + 1.
            waits, k, still = np.eye(self._n, dtype=bool), phase + 1, 0
            while readers.size:
                met = waits[readers, writers]
                if met.any():
                    # The edge's rounds in [phase, k) went out before the wait began.
                    worst = max(worst, (k - phase - 1) // self.period + 1)
                    readers, writers = readers[~met], writers[~met]
                    continue
                grown = waits.copy()
                for b in range(self._n):
                    for a in self.active_out(b, k):
                        grown[:, a] |= waits[:, b]
                still = still + 1 if (grown == waits).all() else 0
                if still >= self.period:  # a whole period added nothing: it never will
                    raise UserError(
                        f"{self._name}: rank {writers[0]} deposits into rank {readers[0]} but "
                        f"no path of edges leads back from {readers[0]} to {writers[0]}, so a "
                        "synchronous policy cannot bound how far ahead it runs: add edges so "
                        "that every node reaches every other")
                waits, k = grown, k + 1
        return worst

    def mixing_row(self, i, k=0, kind="metropolis"):
        """(self weight, {in-neighbour: weight}) of node i at iteration k: row i of
        the mixing matrix, computed from the degrees alone (no n x n matrix)."""
        if kind not in MIXING_KINDS:
            raise UserError(f"unknown mixing {kind!r}: choose from {', '.join(MIXING_KINDS)}")
        if kind == "metropolis" and self._directed:
            raise UserError(f"metropolis mixing needs an undirected graph and {self._name} "
                            "is directed: use mixing 'uniform'")
        if kind == "metropolis":
            row = {j: 1.0 / (1 + max(self.degree(i), self.degree(j))) for j in self._in[i]}
        else:
            row = {j: 1.0 / (self.degree(i) + 1) for j in self._in[i]}
        return 1.0 - sum(row.values()), row

    def _distances_from(self, start):
        """BFS hop counts along edge directions; unreachable nodes are absent."""
        distance = {start: 0}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in self._out[node]:
                if nxt not in distance:
                    distance[nxt] = distance[node] + 1
                    queue.append(nxt)
        return distance

    def unreachable_from_0(self):
        """A node that node 0 cannot reach, or None."""
        reached = self._distances_from(0)
        return next((node for node in range(self._n) if node not in reached), None)

    def cannot_reach_0(self):
        """A node with no directed path to node 0, or None."""
        reached = {0}
        queue = deque([0])
        while queue:
            for prev in self._in[queue.popleft()]:
                if prev not in reached:
                    reached.add(prev)
                    queue.append(prev)
        return next((node for node in range(self._n) if node not in reached), None)

    def is_connected(self):
        """Connected; strongly connected when directed."""
        if self.unreachable_from_0() is not None:
            return False
        return not self._directed or self.cannot_reach_0() is None

    def diameter(self):
        """Longest shortest path (directed when directed); inf when disconnected."""
        longest = 0
        for start in range(self._n):
            distance = self._distances_from(start)
            if len(distance) < self._n:
                return math.inf
            longest = max(longest, max(distance.values()))
        return longest

    def mixing_matrix(self, kind="metropolis"):
        """W with row i = the weights node i gives itself and its in-neighbours
        (dense n x n: for reports and tests; training uses mixing_row)."""
        weights = np.zeros((self._n, self._n))
        for i in range(self._n):
            weights[i, i], row = self.mixing_row(i, 0, kind)
            for j, w in row.items():
                weights[i, j] = w
        return weights

    def spectral_gap(self, kind="metropolis"):
        """1 - |second largest eigenvalue modulus| of W; 1.0 for a single node."""
        moduli = np.sort(np.abs(np.linalg.eigvals(self.mixing_matrix(kind))))[::-1]
        return 1.0 if self._n == 1 else float(1.0 - moduli[1])

    def __repr__(self):
        kind = "directed" if self._directed else "undirected"
        return f"Graph({self._name}: {self._n} nodes, {len(self._edges)} {kind} edges)"


# ---- generators ------------------------------------------------------------

def _undirected(n, pairs, name):
    """Graph from pairs that may repeat or loop (small n makes that natural)."""
    edges = {(min(i, j), max(i, j)) for i, j in pairs if i != j}
    return Graph(n, sorted(edges), directed=False, name=name)


def _connected_draw(draw, name, advice):
    """Call `draw()` until it gives a connected graph, at most MAX_ATTEMPTS times."""
    for _ in range(MAX_ATTEMPTS):
        graph = draw()
        if graph is not None and graph.is_connected():
            return graph
    raise UserError(f"could not draw a connected {name} in {MAX_ATTEMPTS} attempts: {advice}")


@GENERATORS.register("ring")
def ring(n):
    return _undirected(n, [(i, (i + 1) % n) for i in range(n)], f"ring(n={n})")


@GENERATORS.register("torus")
def torus(n, rows=None):
    """2-D wrap-around grid; without `rows`, the most square rows x cols = n
    (a prime n gives 1 x n, which is a ring)."""
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    rows = checks.integer("torus parameter rows", rows, 1)
    if n % rows:
        raise UserError(f"torus with rows={rows} needs a world size divisible by {rows}, "
                        f"got {n}: change rows or leave it out to pick the most square grid")
    cols = n // rows
    pairs = []
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            pairs.append((node, r * cols + (c + 1) % cols))
            pairs.append((node, ((r + 1) % rows) * cols + c))
    return _undirected(n, pairs, f"torus(n={n}, rows={rows}, cols={cols})")


@GENERATORS.register("exponential")
def exponential(n, directed=False):
    """Node i linked to i + 2^k mod n for k = 0..floor(log2(n-1))."""
    checks.boolean("exponential parameter directed", directed)
    hops = [2 ** k for k in range((n - 1).bit_length())]
    pairs = [(i, (i + hop) % n) for i in range(n) for hop in hops]
    if directed:
        return Graph(n, pairs, directed=True, name=f"exponential(n={n}, directed)")
    return _undirected(n, pairs, f"exponential(n={n})")


class OnePeerExponential(Graph):
    """Time-varying: at iteration k, i -> i + 2^(k mod L) mod n only (see module doc).

    Its edges are the union over the period (the directed exponential graph);
    mixing at iteration k is (x_i + x_{i - 2^(k mod L)}) / 2, doubly stochastic
    because each k's edges form a permutation.
    """

    def __init__(self, n):
        self.hops = [2 ** h for h in range((n - 1).bit_length())]
        super().__init__(n, [(i, (i + hop) % n) for i in range(n) for hop in self.hops],
                         directed=True, name=f"exponential_one_peer(n={n})")
        self.period = max(1, len(self.hops))

    def active_out(self, i, k):
        return [(i + self.hops[k % self.period]) % self.n] if self.hops else []

    def active_in(self, i, k):
        return [(i - self.hops[k % self.period]) % self.n] if self.hops else []

    def mixing_row(self, i, k=0, kind="uniform"):
        if kind not in MIXING_KINDS:
            raise UserError(f"unknown mixing {kind!r}: choose from {', '.join(MIXING_KINDS)}")
        row = {j: 0.5 for j in self.active_in(i, k)}
        return 1.0 - sum(row.values()), row

    def mixing_matrix(self, kind="uniform"):
        """The average of the period's matrices (for reports)."""
        weights = np.zeros((self.n, self.n))
        for k in range(self.period):
            for i in range(self.n):
                self_weight, row = self.mixing_row(i, k, kind)
                weights[i, i] += self_weight / self.period
                for j, w in row.items():
                    weights[i, j] += w / self.period
        return weights


@GENERATORS.register("exponential_one_peer")
def exponential_one_peer(n):
    return OnePeerExponential(n)


@GENERATORS.register("complete")
def complete(n):
    return _undirected(n, [(i, j) for i in range(n) for j in range(i + 1, n)],
                       f"complete(n={n})")


@GENERATORS.register("star")
def star(n, hub=0):
    hub = checks.integer("star parameter hub", hub, 0)
    if hub >= n:
        raise UserError(f"star hub {hub} is not a rank of a {n}-rank job: "
                        f"choose a hub in 0..{n - 1}")
    return _undirected(n, [(hub, i) for i in range(n)], f"star(n={n}, hub={hub})")


def _random_regular_edges(n, degree, rng):
    """Pair up `degree` stubs per node, avoiding self-loops and duplicates; the
    stubs that clash are re-shuffled (Steger-Wormald). None when stuck."""
    edges = set()
    stubs = np.repeat(np.arange(n), degree)
    while len(stubs):
        clashing = []
        for a, b in rng.permutation(stubs).reshape(-1, 2):
            edge = (int(min(a, b)), int(max(a, b)))
            if a != b and edge not in edges:
                edges.add(edge)
            else:
                clashing += [int(a), int(b)]
        # Stuck when no two leftover stubs could still form a new edge.
        leftover = set(clashing)
        if not any(a < b and (a, b) not in edges for a in leftover for b in leftover):
            return None if clashing else edges
        stubs = np.array(clashing)
    return edges


@GENERATORS.register("random_regular")
def random_regular(n, degree=3, seed=0):
    """Uniform-ish random graph where every node has `degree` neighbours."""
    degree = checks.integer("random_regular parameter degree", degree, 1)
    seed = checks.integer("random_regular parameter seed", seed, 0)
    if degree >= n or (n * degree) % 2:
        raise UserError(f"random_regular needs degree < n and n*degree even, got n={n}, "
                        f"degree={degree}: pick another degree or world size")
    rng = np.random.default_rng(seed)
    name = f"random_regular(n={n}, degree={degree}, seed={seed})"

    def draw():
        edges = _random_regular_edges(n, degree, rng)
        return None if edges is None else Graph(n, sorted(edges), name=name)

    return _connected_draw(draw, name, "use a larger degree or another seed")


@GENERATORS.register("erdos_renyi")
def erdos_renyi(n, p=0.5, seed=0):
    """Each of the n(n-1)/2 possible edges present with probability p."""
    p = checks.number("erdos_renyi parameter p", p, above=0, maximum=1)
    seed = checks.integer("erdos_renyi parameter seed", seed, 0)
    rng = np.random.default_rng(seed)
    name = f"erdos_renyi(n={n}, p={p}, seed={seed})"
    rows, cols = np.triu_indices(n, 1)

    def draw():
        keep = rng.random(len(rows)) < p
        return Graph(n, list(zip(rows[keep].tolist(), cols[keep].tolist())), name=name)

    return _connected_draw(draw, name, "use a larger p or another seed")


def generate(name, n, params=None):
    """The graph from generator `name` for n ranks, params checked by name."""
    graph = GENERATORS.build(name, params, checks.integer("the world size n", n, 1))
    graph.generator = (name, dict(params or {}))  # how to build it again for other sizes
    return graph


def without(graph, lost):
    """The graph of the ranks left when the ranks in `lost` died, numbered 0..n-1 in order.

    A generated graph is generated again for the new size (so a ring stays a
    ring and the one-peer graph keeps its hops); where that is impossible
    (a torus whose rows no longer divide n) or the graph came from an edge
    list, the lost nodes and their edges are removed and, if that splits the
    graph, each part is joined to the next by one edge (both ways when
    directed) between their lowest-numbered nodes.
    """
    lost = set(lost)
    keep = [i for i in range(graph.n) if i not in lost]
    generator = getattr(graph, "generator", None)
    if generator is not None:
        try:
            return generate(generator[0], len(keep), generator[1])
        except UserError:
            pass
    number = {old: new for new, old in enumerate(keep)}
    edges = {(number[i], number[j]) for i, j in graph.edges if i in number and j in number}
    survivors = Graph(len(keep), sorted(edges), directed=graph.directed,
                      name=f"{graph.name} without ranks {sorted(lost)}")
    parts = _components(survivors)
    for a, b in zip(parts, parts[1:]):
        edges.add((min(a), min(b)))
        if graph.directed:
            edges.add((min(b), min(a)))
    if len(parts) > 1:
        survivors = Graph(len(keep), sorted(edges), directed=graph.directed,
                          name=f"{graph.name} without ranks {sorted(lost)}, reconnected")
    return survivors


def _components(graph):
    """The weakly connected components, as sets of nodes, in order of their lowest node."""
    neighbours = [set(graph.in_neighbours(i)) | set(graph.out_neighbours(i))
                  for i in range(graph.n)]
    seen, parts = set(), []
    for start in range(graph.n):
        if start in seen:
            continue
        part, queue = {start}, deque([start])
        while queue:
            for nxt in neighbours[queue.popleft()]:
                if nxt not in part:
                    part.add(nxt)
                    queue.append(nxt)
        seen |= part
        parts.append(part)
    return parts
