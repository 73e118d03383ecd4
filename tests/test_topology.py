"""Topology graphs, generators, mixing matrices, YAML loading and the CLI (no MPI)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aau_mpi.base.errors import UserError
from aau_mpi.algorithms.graphs import GENERATORS, Graph, generate
from aau_mpi.algorithms.topology import load_topology
from aau_mpi.base.errors import exit_status
from aau_mpi.topology import main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "topologies").glob("*.yaml"))
EXPLICIT_SHIPPED = {"two_clusters_8.yaml": 8}

# (generator, params) for every generator; each scales to the sizes listed.
GENERATOR_CASES = [
    ("ring", {}, [1, 2, 3, 4, 8, 16]),
    ("torus", {}, [1, 2, 3, 4, 8, 9, 16]),
    ("exponential", {}, [1, 2, 3, 4, 8, 16]),
    ("exponential", {"directed": True}, [1, 2, 3, 4, 8, 16]),
    ("complete", {}, [1, 2, 3, 4, 8, 16]),
    ("star", {}, [1, 2, 3, 4, 8, 16]),
    ("random_regular", {"degree": 3}, [4, 8, 16]),
    ("random_regular", {"degree": 2}, [3, 4, 8, 16]),
    ("erdos_renyi", {"p": 0.3}, [1, 2, 3, 4, 8, 16]),
    ("exponential_one_peer", {}, [1, 2, 3, 4, 6, 8, 16, 64]),
]
GENERATED = [pytest.param(name, params, n, id=f"{name}{params or ''}-n{n}")
             for name, params, sizes in GENERATOR_CASES for n in sizes]


def all_degrees(graph):
    return [graph.degree(i) for i in range(graph.n)]


def write(tmp_path, text, name="topo.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- generators ------------------------------------------------------------

def test_every_registered_generator_is_covered():
    assert {name for name, _, _ in GENERATOR_CASES} == set(GENERATORS.names())


@pytest.mark.parametrize("name, params, n", GENERATED)
def test_generated_graph_is_connected_and_simple(name, params, n):
    graph = generate(name, n, params)
    assert graph.n == n
    assert graph.is_connected()
    assert all(i != j for i, j in graph.edges), "self-loop"
    assert len(set(graph.edges)) == len(graph.edges), "duplicate edge"
    if not graph.directed:
        assert all(i < j for i, j in graph.edges), "undirected edge stored twice"
        for i in range(n):
            assert graph.in_neighbours(i) == graph.out_neighbours(i)


@pytest.mark.parametrize("n", [3, 4, 8, 16])
def test_ring_has_degree_two(n):
    assert all_degrees(generate("ring", n)) == [2] * n


def test_tiny_graphs_have_no_loops_or_duplicates():
    for name in ("ring", "complete", "exponential"):
        assert generate(name, 1).edges == ()
        assert generate(name, 2).edges == ((0, 1),)


@pytest.mark.parametrize("n, rows", [(9, None), (16, None), (12, 3), (12, 4)])
def test_torus_has_degree_four_when_both_sides_are_at_least_three(n, rows):
    graph = generate("torus", n, {"rows": rows})
    assert all_degrees(graph) == [4] * n


def test_torus_picks_the_most_square_grid():
    assert generate("torus", 16).name == "torus(n=16, rows=4, cols=4)"
    assert generate("torus", 12).name == "torus(n=12, rows=3, cols=4)"
    assert generate("torus", 7).edges == generate("ring", 7).edges  # prime n: 1 x n


def test_torus_rows_must_divide_n():
    with pytest.raises(UserError, match="divisible by 3"):
        generate("torus", 8, {"rows": 3})


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_complete_has_degree_n_minus_one(n):
    assert all_degrees(generate("complete", n)) == [n - 1] * n


@pytest.mark.parametrize("n, hub", [(8, 0), (8, 5), (16, 15)])
def test_star_hub_is_linked_to_everyone_else(n, hub):
    degrees = all_degrees(generate("star", n, {"hub": hub}))
    assert degrees[hub] == n - 1
    assert degrees[:hub] + degrees[hub + 1:] == [1] * (n - 1)


def test_star_hub_must_be_a_rank():
    with pytest.raises(UserError, match="choose a hub in 0..7"):
        generate("star", 8, {"hub": 8})


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_directed_exponential_links_powers_of_two(n):
    graph = generate("exponential", n, {"directed": True})
    hops = [2 ** k for k in range(int(np.floor(np.log2(n - 1))) + 1)]
    for i in range(n):
        assert graph.out_neighbours(i) == sorted((i + hop) % n for hop in hops)
        assert graph.degree(i) == len(hops)


@pytest.mark.parametrize("degree, n", [(3, 8), (4, 16), (2, 10), (7, 8)])
def test_random_regular_has_the_asked_degree(degree, n):
    assert all_degrees(generate("random_regular", n, {"degree": degree})) == [degree] * n


@pytest.mark.parametrize("n, degree", [(7, 3), (4, 4), (1, 3)])
def test_random_regular_rejects_impossible_sizes(n, degree):
    with pytest.raises(UserError, match="degree < n and n\\*degree even"):
        generate("random_regular", n, {"degree": degree})


def test_random_graphs_that_cannot_connect_give_up_with_advice():
    with pytest.raises(UserError, match="could not draw a connected .* larger degree"):
        generate("random_regular", 8, {"degree": 1})
    with pytest.raises(UserError, match="could not draw a connected .* larger p"):
        generate("erdos_renyi", 30, {"p": 0.01})


@pytest.mark.parametrize("name, params", [("random_regular", {"degree": 3}),
                                          ("erdos_renyi", {"p": 0.3})])
def test_seeded_generators_are_reproducible(name, params):
    same = [generate(name, 16, {**params, "seed": 7}).edges for _ in range(2)]
    assert same[0] == same[1]
    assert generate(name, 16, {**params, "seed": 8}).edges != same[0]


# ---- Graph -----------------------------------------------------------------

def test_directed_neighbours_follow_deposit_direction():
    graph = Graph(3, [(0, 1), (1, 2), (2, 0), (0, 2)], directed=True)
    assert graph.out_neighbours(0) == [1, 2]
    assert graph.in_neighbours(0) == [2]
    assert graph.in_neighbours(2) == [0, 1]
    assert graph.degree(2) == 2


def test_graph_is_immutable():
    graph = generate("ring", 4)
    with pytest.raises(AttributeError):
        graph.n = 5
    graph.in_neighbours(0).append(99)
    assert graph.in_neighbours(0) == [1, 3]
    assert isinstance(graph.edges, tuple)


def test_diameter():
    assert generate("ring", 8).diameter() == 4
    assert generate("complete", 8).diameter() == 1
    assert generate("ring", 1).diameter() == 0
    assert Graph(3, [(0, 1), (1, 2), (2, 0)], directed=True).diameter() == 2
    assert Graph(4, [(0, 1), (2, 3)]).diameter() == float("inf")


def test_connectivity_is_strong_for_directed_graphs():
    assert not Graph(3, [(0, 1), (1, 2)], directed=True).is_connected()
    assert Graph(3, [(0, 1), (1, 2)]).is_connected()
    assert not Graph(4, [(0, 1), (2, 3)]).is_connected()


# ---- mixing matrices -------------------------------------------------------

UNDIRECTED = [p for p in GENERATED if not p.values[1].get("directed")
              and p.values[0] != "exponential_one_peer"]


@pytest.mark.parametrize("name, params, n", UNDIRECTED)
def test_metropolis_is_symmetric_doubly_stochastic(name, params, n):
    graph = generate(name, n, params)
    weights = graph.mixing_matrix("metropolis")
    assert weights.shape == (n, n) and weights.dtype == np.float64
    assert np.allclose(weights, weights.T)
    assert np.allclose(weights.sum(axis=0), 1) and np.allclose(weights.sum(axis=1), 1)
    assert (weights >= 0).all()
    assert 0 < graph.spectral_gap("metropolis") <= 1


# Static graphs; the time-varying one's weights change with k (tested below).
STATIC = [case for case in GENERATED if case.values[0] != "exponential_one_peer"]


@pytest.mark.parametrize("name, params, n", STATIC)
def test_uniform_is_row_stochastic_over_in_neighbours(name, params, n):
    graph = generate(name, n, params)
    weights = graph.mixing_matrix("uniform")
    assert np.allclose(weights.sum(axis=1), 1)
    for i in range(n):
        support = sorted(graph.in_neighbours(i) + [i])
        assert np.flatnonzero(weights[i]).tolist() == support
        assert np.allclose(weights[i, support], 1 / (graph.degree(i) + 1))
    assert 0 < graph.spectral_gap("uniform") <= 1


def test_ring_of_four_metropolis_by_hand():
    # Every degree is 2, so every weight is 1/(1+2) = 1/3, self included;
    # eigenvalues 1, 1/3, 1/3, -1/3 give a gap of 2/3.
    graph = generate("ring", 4)
    third = 1 / 3
    expected = np.array([[third, third, 0, third],
                         [third, third, third, 0],
                         [0, third, third, third],
                         [third, 0, third, third]])
    assert np.allclose(graph.mixing_matrix("metropolis"), expected)
    assert graph.spectral_gap("metropolis") == pytest.approx(2 / 3)


def test_metropolis_on_star_uses_the_larger_degree():
    weights = generate("star", 4).mixing_matrix("metropolis")
    assert np.allclose(weights[0], [0.25] * 4)
    assert np.allclose(weights[1], [0.25, 0.75, 0, 0])


def test_metropolis_refuses_directed_graphs():
    graph = generate("exponential", 8, {"directed": True})
    with pytest.raises(UserError, match="metropolis mixing needs an undirected graph.*'uniform'"):
        graph.mixing_matrix("metropolis")


def test_unknown_mixing_kind():
    with pytest.raises(UserError, match="unknown mixing 'metro'"):
        generate("ring", 4).mixing_matrix("metro")


# ---- loading ---------------------------------------------------------------

def test_all_topology_files_are_tested():
    names = {path.name for path in SHIPPED}
    assert {"ring.yaml", "torus.yaml", "exponential.yaml", "complete.yaml", "star.yaml",
            "random_regular.yaml", "erdos_renyi.yaml"} | set(EXPLICIT_SHIPPED) == names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_loads_and_documents_the_format(path):
    n = EXPLICIT_SHIPPED.get(path.name, 8)
    graph = load_topology(path, n)
    assert graph.n == n and graph.is_connected()
    header = path.read_text().splitlines()[0]
    assert header.startswith("# aau_mpi topology")


@pytest.mark.parametrize("name", sorted(EXPLICIT_SHIPPED))
def test_shipped_edge_list_rejects_other_sizes(name):
    nodes = EXPLICIT_SHIPPED[name]
    with pytest.raises(UserError, match=f"topology has {nodes} nodes but the job has 6 ranks: "
                                        f"run with -n {nodes} or use a generator"):
        load_topology(REPO / "topologies" / name, 6)


def test_two_clusters_has_one_bridge():
    graph = load_topology(str(REPO / "topologies" / "two_clusters_8.yaml"), 8)
    assert graph.name == "two_clusters_8(n=8)"
    assert len(graph.edges) == 2 * 6 + 1
    assert graph.diameter() == 3


def test_sources_of_every_kind_give_the_same_graph(tmp_path, monkeypatch):
    path = write(tmp_path, "generator: torus\nparams: {rows: 2}\n")
    expected = generate("torus", 8, {"rows": 2}).edges
    monkeypatch.chdir(tmp_path)
    for source in (path, str(path), "topo.yaml", {"file": "topo.yaml"}, {"file": path},
                   {"generator": "torus", "params": {"rows": 2}}):
        assert load_topology(source, 8).edges == expected
    assert load_topology("ring", 5).edges == generate("ring", 5).edges


def test_inline_edge_list_and_single_node():
    graph = load_topology({"nodes": 3, "edges": [[0, 1], [2, 1]]}, 3)
    assert graph.edges == ((0, 1), (1, 2)) and not graph.directed
    assert load_topology({"nodes": 1, "edges": []}, 1).edges == ()
    directed = load_topology({"nodes": 2, "directed": True, "edges": [[0, 1], [1, 0]]}, 2)
    assert directed.edges == ((0, 1), (1, 0))


INVALID_SPECS = [
    ({}, ["neither of 'generator' and 'edges'"]),
    ({"generator": "ring", "nodes": 2, "edges": []}, ["both of 'generator' and 'edges'"]),
    ({"generater": "ring"}, ["unknown topology key 'generater'", "did you mean 'generator'"]),
    ({"generator": "ring", "nodes": 8}, ["'nodes' does not go with a generator"]),
    ({"generator": "rign"}, ["unknown topology generator 'rign'", "did you mean 'ring'"]),
    ({"generator": "random_regular", "params": {"degre": 3}},
     ["unknown parameter 'degre'", "did you mean 'degree'", "it takes: degree, seed"]),
    ({"generator": "ring", "params": {"size": 3}}, ["it takes: no parameters"]),
    ({"generator": "random_regular", "params": {"degree": "three"}},
     ["random_regular parameter degree must be an integer"]),
    ({"generator": "erdos_renyi", "params": {"p": 1.5}}, ["erdos_renyi parameter p must be a number > 0 and <= 1"]),
    ({"generator": "exponential", "params": {"directed": "yes"}},
     ["directed must be true or false"]),
    ({"generator": "ring", "params": [1]}, ["params must be a mapping"]),
    ({"nodes": 6, "edges": [[0, 1]]},
     ["topology has 6 nodes but the job has 8 ranks: run with -n 6 or use a generator"]),
    ({"nodes": "eight", "edges": []}, ["needs 'nodes: <positive integer>'"]),
    ({"nodes": 8, "directed": "no", "edges": []}, ["'directed' must be true or false"]),
    ({"nodes": 8, "edges": "0-1"}, ["'edges' must be a list of pairs"]),
    ({"nodes": 8, "edges": [[0, 1, 2]]}, ["not a pair"]),
    ({"nodes": 8, "edges": [[3, 3]]}, ["edge [3, 3] is a self-loop"]),
    ({"nodes": 8, "edges": [[1, 2], [2, 1]]}, ["duplicate edge [2, 1] repeats [1, 2]"]),
    ({"nodes": 8, "directed": True, "edges": [[1, 2], [1, 2]]}, ["duplicate edge [1, 2]"]),
    ({"nodes": 8, "edges": [[0, 8]]}, ["names node 8, out of range", "0..7"]),
    ({"nodes": 8, "edges": [[-1, 0]]}, ["names node -1, out of range"]),
    ({"nodes": 8, "edges": [[0, "a"]]}, ["non-integer node id"]),
    ({"nodes": 8, "edges": [[0, 1.0]]}, ["non-integer node id"]),
    ({"nodes": 8, "edges": [[0, True]]}, ["non-integer node id"]),
    ({"nodes": 8, "edges": [[0, 1], [2, 3], [1, 2]]},
     ["disconnected", "node 4 cannot be reached from node 0"]),
    ({"nodes": 8, "directed": True, "edges": [[i, i + 1] for i in range(7)]},
     ["not strongly connected", "node 1 cannot reach node 0"]),
    ({"nodes": 8, "directed": True, "edges": [[i, 0] for i in range(1, 8)]},
     ["not strongly connected", "node 1 cannot be reached from node 0"]),
    ({"file": "ring.yaml", "generator": "ring"}, ["'file' and also generator"]),
    ({"file": 3}, ["topology file must be a path"]),
]


@pytest.mark.parametrize("spec, fragments", INVALID_SPECS, ids=lambda v: str(v)[:40])
def test_invalid_inline_topology_names_the_problem(spec, fragments):
    with pytest.raises(UserError) as caught:
        load_topology(spec, 8)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_file_errors_name_the_file(tmp_path):
    path = write(tmp_path, "nodes: 4\nedges: [[0, 1], [2, 3]]\n", "split.yaml")
    with pytest.raises(UserError, match=f"^{path}: topology split\\(n=4\\) is disconnected"):
        load_topology(path, 4)


def test_missing_file_says_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere" / "torus.yaml"
    with pytest.raises(UserError, match=f"topology file not found: looked for {missing}"):
        load_topology(str(missing), 8)
    with pytest.raises(UserError, match="topology file not found"):
        load_topology({"file": str(missing)}, 8)


@pytest.mark.parametrize("text, fragment", [
    ("generator: [ring\n", "malformed YAML at line"),
    ("nodes: 4\n  edges: [[0, 1]]\n", "malformed YAML"),
    ("", "expected a mapping"),
    ("- ring\n", "expected a mapping"),
])
def test_malformed_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=fragment) as caught:
        load_topology(path, 8)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("source, n, fragment", [
    (3.5, 8, "topology must be a YAML path, a mapping or a generator name"),
    ("ring", 0, "world size n must be an integer >= 1"),
    ("ring", "8", "world size n must be an integer >= 1"),
])
def test_bad_source_or_world_size(source, n, fragment):
    with pytest.raises(UserError, match=fragment):
        load_topology(source, n)


@st.composite
def edge_list_topologies(draw):
    """(spec, job size): mostly well-formed edge lists, some with one bad entry."""
    nodes = draw(st.integers(1, 6))
    pairs = [[i, j] for i in range(nodes) for j in range(nodes) if i != j]
    edges = draw(st.lists(st.sampled_from(pairs), min_size=nodes - 1, max_size=15,
                          unique_by=frozenset)) if pairs else []
    if draw(st.integers(0, 3)) == 0:  # sometimes a repeated edge or a self-loop
        edges.append(draw(st.sampled_from(edges + [[0, 0]])))
    if draw(st.integers(0, 3)) == 0:  # sometimes a malformed entry
        bad = draw(st.sampled_from([[-1, 0], [0, nodes], [0, "a"], [0, 1.5], [None, 0],
                                    [True, 0], [0], [0, 1, 2], 3, "0-1"]))
        edges.insert(draw(st.integers(0, len(edges))), bad)
    directed = draw(st.sampled_from([False, True] * 4 + ["maybe"]))
    job = draw(st.sampled_from([nodes] * 4 + [nodes + 1]))
    return {"nodes": nodes, "directed": directed, "edges": edges}, job


@settings(max_examples=300, deadline=None)
@given(edge_list_topologies())
def test_random_edge_lists_load_or_raise_user_error(topology):
    spec, job = topology
    try:
        graph = load_topology(spec, job)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert graph.n == job == spec["nodes"]
    assert graph.is_connected()
    assert all(i != j for i, j in graph.edges)
    assert len(set(graph.edges)) == len(graph.edges)
    assert np.allclose(graph.mixing_matrix("uniform").sum(axis=1), 1)


# ---- command line ----------------------------------------------------------

def test_cli_prints_report_and_draws_png(tmp_path, capsys):
    png = tmp_path / "ring.png"
    assert main([str(REPO / "topologies" / "ring.yaml"), "-n", "8", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    for fragment in ("ring(n=8)", "nodes         8", "edges         8", "directed      no",
                     "min 2, mean 2.00, max 2", "diameter      4",
                     "spectral gap  0.1953 (metropolis mixing)"):
        assert fragment in out
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_directed_defaults_to_uniform_and_draws_arrows(tmp_path, capsys):
    png = tmp_path / "exp.png"
    path = write(tmp_path, "generator: exponential\nparams: {directed: true}\n")
    assert main([str(path), "-n", "8", "--png", str(png)]) == 0
    assert "(uniform mixing)" in capsys.readouterr().out
    assert png.read_bytes().startswith(b"\x89PNG")
    assert exit_status(main, [str(path), "-n", "8", "--mixing", "metropolis"]) == 2
    assert "metropolis mixing needs an undirected graph" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["no/such/file.yaml", "-n", "8"], "topology file not found"),
    (["two_clusters_8.yaml", "-n", "8"], "topology file not found"),
    (["random_regular", "-n", "7"], "n*degree even"),
])
def test_cli_errors_exit_2_with_one_line(argv, fragment, capsys):
    assert exit_status(main, argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and fragment in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_cli_png_without_matplotlib(tmp_path, capsys, monkeypatch):
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    assert exit_status(main, ["ring", "-n", "4", "--png", str(tmp_path / "x.png")]) == 2
    assert "--png needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_module_runs_as_script_without_mpi_or_torch():
    check = ("import sys, aau_mpi.topology;"
             "assert 'mpi4py' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)
    result = subprocess.run([sys.executable, "-m", "aau_mpi.topology", "nope.yml", "-n", "4"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: topology file not found")


# ---- time-varying graphs ------------------------------------------------------

@pytest.mark.parametrize("n", [2, 5, 8, 64])
def test_one_peer_graph_sends_one_copy_per_iteration_and_its_union_is_the_exponential_graph(n):
    graph = generate("exponential_one_peer", n)
    hops = [2 ** h for h in range((n - 1).bit_length())]
    assert graph.period == len(hops) and graph.directed
    for k in range(2 * graph.period):
        targets = [graph.active_out(i, k)[0] for i in range(n)]
        assert sorted(targets) == list(range(n)), "each k's edges form a permutation"
        for i in range(n):
            assert graph.active_out(i, k) == [(i + hops[k % len(hops)]) % n]
            assert i in graph.active_in(graph.active_out(i, k)[0], k), "in matches out"
            self_weight, row = graph.mixing_row(i, k)
            assert self_weight == 0.5 and list(row.values()) == [0.5]
    assert graph.edges == generate("exponential", n, {"directed": True}).edges
    assert graph.edge_round(graph.period * 4 - 1) == 3


def test_one_peer_graph_averages_exactly_over_a_period_for_powers_of_two():
    graph = generate("exponential_one_peer", 16)
    product = np.eye(16)
    for k in range(graph.period):
        w = np.zeros((16, 16))
        for i in range(16):
            w[i, i], row = graph.mixing_row(i, k)
            for j, weight in row.items():
                w[i, j] = weight
        product = w @ product
    assert np.allclose(product, 1 / 16)


# ---- how far a synchronous writer runs ahead ---------------------------------

def rounds_in_flight_by_playing(graph):
    """rounds_in_flight by playing the synchronous run out: the reader stops at
    iteration m without reading it, every other rank steps while its active
    in-neighbours' deposits of its own iteration are there, and the writer's
    deposits into the reader from m's on are counted (no formula shared)."""
    worst = 1
    for reader in range(graph.n):
        for m in range(graph.period, 2 * graph.period):
            deposited = [0] * graph.n  # every rank has deposited iterations 0..this
            moved = True
            while moved:
                moved = False
                for a in range(graph.n):
                    k = deposited[a]
                    if (a != reader or k < m) and all(deposited[b] >= k
                                                      for b in graph.active_in(a, k)):
                        deposited[a], moved = k + 1, True
            for writer in graph.active_in(reader, m):
                worst = max(worst, sum(reader in graph.active_out(writer, t)
                                       for t in range(m, deposited[writer] + 1)))
    return worst


@pytest.mark.parametrize("name, params, n", [p for p in GENERATED if p.values[2] <= 16])
def test_rounds_in_flight_is_what_a_synchronous_run_reaches(name, params, n):
    graph = generate(name, n, params)
    assert graph.rounds_in_flight == rounds_in_flight_by_playing(graph)


def test_rounds_in_flight_is_the_way_back_plus_one():
    assert generate("ring", 8).rounds_in_flight == 2      # back over the edge itself
    assert generate("exponential", 4, {"directed": True}).rounds_in_flight == 3  # 0 -> 2 -> 3
    assert generate("exponential", 16, {"directed": True}).rounds_in_flight == 5
    assert Graph(5, [(i, (i + 1) % 5) for i in range(5)], directed=True).rounds_in_flight == 5
    assert generate("exponential_one_peer", 8).rounds_in_flight == 2  # every rank in a period
    assert generate("ring", 1).rounds_in_flight == 1


def test_rounds_in_flight_refuses_a_writer_that_never_hears_from_its_reader():
    with pytest.raises(UserError) as error:
        Graph(3, [(0, 1), (1, 2)], directed=True, name="path").rounds_in_flight
    assert str(error.value) == (
        "path: rank 0 deposits into rank 1 but no path of edges leads back from 1 to 0, so "
        "a synchronous policy cannot bound how far ahead it runs: add edges so that every "
        "node reaches every other")


def test_mixing_row_needs_no_dense_matrix_and_matches_it():
    graph = generate("random_regular", 12, {"degree": 3, "seed": 2})
    dense = graph.mixing_matrix("metropolis")
    for i in range(12):
        self_weight, row = graph.mixing_row(i)
        assert self_weight == pytest.approx(dense[i, i])
        assert all(dense[i, j] == pytest.approx(w) for j, w in row.items())
