"""`python -m aau_mpi.topology`: describe a topology for a world size, and draw it.

    python -m aau_mpi.topology ring -n 8
    python -m aau_mpi.topology topologies/two_clusters_8.yaml -n 8 --png graph.png

The graphs and their weights: aau_mpi/algorithms/graphs.py; the YAML format:
aau_mpi/algorithms/topology.py.
"""

import argparse
import sys

import numpy as np

from aau_mpi.algorithms.graphs import MIXING_KINDS
from aau_mpi.algorithms.topology import load_topology
from aau_mpi.base.errors import UserError, exit_status


def report(graph, mixing):
    """Multi-line summary of a graph and its mixing matrix."""
    degrees = [graph.degree(i) for i in range(graph.n)]
    degree_label = "in-degree" if graph.directed else "degree"
    return "\n".join([
        f"topology      {graph.name}",
        f"nodes         {graph.n}",
        f"edges         {len(graph.edges)}",
        f"directed      {'yes' if graph.directed else 'no'}",
        f"{degree_label:<13} min {min(degrees)}, mean {np.mean(degrees):.2f}, max {max(degrees)}",
        f"diameter      {graph.diameter()}",
        f"spectral gap  {graph.spectral_gap(mixing):.4f} ({mixing} mixing)",
    ])


def draw_png(graph, path):
    """Draw the graph on a circle into a PNG file."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--png needs matplotlib: pip install matplotlib") from None
    angles = 2 * np.pi * np.arange(graph.n) / graph.n
    xs, ys = np.cos(angles), np.sin(angles)
    figure = Figure(figsize=(6, 6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, j in graph.edges:
        if graph.directed:
            arrow = {"arrowstyle": "->", "color": "grey", "shrinkA": 10, "shrinkB": 10}
            axes.annotate("", xy=(xs[j], ys[j]), xytext=(xs[i], ys[i]), arrowprops=arrow)
        else:
            axes.plot([xs[i], xs[j]], [ys[i], ys[j]], color="grey", linewidth=0.8, zorder=1)
    axes.scatter(xs, ys, s=300, color="tab:blue", zorder=2)
    for node in range(graph.n):
        axes.text(xs[node], ys[node], str(node), ha="center", va="center",
                  color="white", fontsize=8, zorder=3)
    axes.set_title(graph.name)
    axes.set_aspect("equal")
    axes.axis("off")
    figure.savefig(path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m aau_mpi.topology",
        description="Describe a topology (YAML file or generator name) for a world size.")
    parser.add_argument("source", help="topology YAML file or generator name, e.g. ring")
    parser.add_argument("-n", type=int, required=True, help="world size (number of ranks)")
    parser.add_argument("--mixing", choices=MIXING_KINDS,
                        help="mixing weights (default: metropolis, uniform when directed)")
    parser.add_argument("--png", help="also draw the graph into this PNG file")
    args = parser.parse_args(argv)
    graph = load_topology(args.source, args.n)
    mixing = args.mixing or ("uniform" if graph.directed else "metropolis")
    print(report(graph, mixing))
    if args.png:
        draw_png(graph, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
