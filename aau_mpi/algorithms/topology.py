"""The topology YAML format, and load_topology: a validated, connected Graph
(aau_mpi/algorithms/graphs.py) for a job of n ranks.

Edges point the way data flows: edge (i, j) means "rank i deposits into rank
j's mailbox", so j reads from i. A topology is chosen in one of two ways.

A generator with parameters (it scales to the job's world size n):

    generator: random_regular
    params: {degree: 3, seed: 0}

An explicit edge list (only valid for a job with exactly `nodes` ranks):

    nodes: 6
    directed: false          # optional, default false
    edges: [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0]]

Node ids are the ranks 0..nodes-1. An undirected edge [i, j] is listed once
(no [j, i]); there are no self-loops, since every rank always keeps a weight
for itself. The graph must be connected (strongly connected when directed).

`load_topology(source, n)` accepts a path to such a file, the same mapping
already parsed (the trainer's inline `topology:` section, which may also be
`{file: path/to/topology.yaml}`), or a bare generator name such as "ring".
The generators and their parameters: aau_mpi/algorithms/graphs.py.

Command line, to inspect a topology before a run:

    python -m aau_mpi.topology topologies/torus.yaml -n 16 [--mixing uniform] [--png torus.png]

This module is pure numpy: it must not import mpi4py or torch.
"""

from pathlib import Path

import yaml

from aau_mpi.algorithms.graphs import Graph, generate
from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import closest

GENERATOR_KEYS = ("generator", "params")
EDGE_LIST_KEYS = ("nodes", "directed", "edges")


def _read_yaml(path):
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"topology file not found: looked for {path.resolve()}: "
                        "check the path (relative paths start at the current directory)") from None
    except OSError as err:
        raise UserError(f"cannot read topology file {path}: {err.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid syntax"
        raise UserError(f"{path}: malformed YAML{where} ({problem}): fix the syntax") from None


def _looks_like_path(source):
    return (isinstance(source, Path) or Path(source).suffix in (".yaml", ".yml")
            or "/" in source or Path(source).is_file())


def _graph_from_spec(spec, n, label):
    """Graph from a parsed topology mapping (generator or edge list)."""
    if not isinstance(spec, dict):
        raise UserError(f"malformed topology: expected a mapping with 'generator' or 'edges', "
                        f"got {type(spec).__name__}: see the format in topologies/ring.yaml")
    for key in spec:
        if key not in GENERATOR_KEYS + EDGE_LIST_KEYS:
            hint = closest(key, GENERATOR_KEYS + EDGE_LIST_KEYS)
            suggestion = f"did you mean {hint!r}? " if hint else ""
            raise UserError(f"unknown topology key {key!r}: {suggestion}(a topology has "
                            "generator and params, or nodes, directed and edges)")
    if ("generator" in spec) == ("edges" in spec):
        which = "both" if "generator" in spec else "neither"
        raise UserError(f"topology has {which} of 'generator' and 'edges': give exactly one")
    form_keys, form = ((GENERATOR_KEYS, "a generator") if "generator" in spec
                       else (EDGE_LIST_KEYS, "an edge list"))
    for key in spec:
        if key not in form_keys:
            raise UserError(f"topology key {key!r} does not go with {form} "
                            f"(which takes: {', '.join(form_keys)}): remove it")
    if "generator" in spec:
        params = spec.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"topology params must be a mapping like {{degree: 3}}, got {params!r}")
        return generate(str(spec["generator"]), n, params)
    return _graph_from_edge_list(spec, n, label)


def _graph_from_edge_list(spec, n, label):
    nodes = spec.get("nodes")
    if not checks.is_integer(nodes) or nodes < 1:
        raise UserError(f"an edge-list topology needs 'nodes: <positive integer>', got {nodes!r}")
    if nodes != n:
        raise UserError(f"topology has {nodes} nodes but the job has {n} ranks: "
                        f"run with -n {nodes} or use a generator")
    directed = spec.get("directed", False)
    checks.boolean("topology 'directed'", directed)
    edges = spec["edges"]
    if edges is None:
        edges = []
    if not isinstance(edges, list):
        raise UserError(f"topology 'edges' must be a list of pairs like [[0, 1], [1, 2]], "
                        f"got {edges!r}")
    return Graph(nodes, edges, directed=directed, name=f"{label}(n={nodes})")


def _require_connected(graph):
    unreached = graph.unreachable_from_0()
    if unreached is not None:
        kind = "not strongly connected" if graph.directed else "disconnected"
        raise UserError(f"topology {graph.name} is {kind}: node {unreached} cannot be reached "
                        "from node 0: add edges so that every node reaches every other")
    if graph.directed:
        stuck = graph.cannot_reach_0()
        if stuck is not None:
            raise UserError(f"topology {graph.name} is not strongly connected: node {stuck} "
                            "cannot reach node 0: add edges so that every node reaches every other")


def load_topology(source, n):
    """A validated, connected Graph for a job of n ranks.

    `source`: a YAML file path (str or Path), a parsed mapping (may be
    {file: path}), or a generator name such as "ring".
    """
    n = checks.integer("the world size n", n, 1)
    if isinstance(source, dict) and "file" in source:
        if len(source) > 1:
            others = ", ".join(sorted(k for k in source if k != "file"))
            raise UserError(f"topology has 'file' and also {others}: "
                            "give either a file or the topology inline")
        if not isinstance(source["file"], (str, Path)):
            raise UserError(f"topology file must be a path like topologies/ring.yaml, "
                            f"got {source['file']!r}")
        source = Path(source["file"])
    if isinstance(source, (str, Path)) and _looks_like_path(source):
        spec = _read_yaml(source)  # its errors name the path already
        try:
            graph = _graph_from_spec(spec, n, Path(source).stem)
            _require_connected(graph)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
        return graph
    if isinstance(source, str):
        graph = generate(source, n)
    elif isinstance(source, dict):
        graph = _graph_from_spec(source, n, "edges")
    else:
        raise UserError(f"topology must be a YAML path, a mapping or a generator name, "
                        f"got {type(source).__name__}: e.g. topology: {{generator: ring}}")
    _require_connected(graph)
    return graph
