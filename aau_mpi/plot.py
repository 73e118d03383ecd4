"""Compare finished (or killed) training runs: three PNGs and a table.

    python -m aau_mpi.plot RUN [RUN ...] [--out plots] [--target 0.9]

Each RUN is a folder the trainer wrote under output.dir (config.yaml,
rank-NNNNN.jsonl, eval.jsonl, summary.json). Writes into --out:
  accuracy.png    averaged-model test accuracy against training time, all runs
  neighbours.png  neighbours averaged per iteration over time, a panel per run
  wait_share.png  share of time each rank spent waiting, a bar group per run
  runs.md         the table printed to stdout, as markdown

A run that was killed has no summary.json and may end in a half-written line;
its numbers then come from the jsonl files and the half line is skipped.
"""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
# Figures are built without pyplot and drawn by the Agg canvas, so no display
# backend is ever loaded and importing this module changes no global state.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aau_mpi.base.errors import UserError, exit_status

ROLLING_WINDOW = 20  # iterations per point in neighbours.png: smooths the 0/1/2 jitter
RANK_FILE = re.compile(r"rank-(\d+)\.jsonl")


@dataclass
class Run:
    label: str
    folder: Path
    config: dict
    ranks: dict   # rank -> its per-iteration records, in order
    evals: list   # eval.jsonl records, in order
    summary: Optional[dict]  # None when the run did not finish writing it


def _read_jsonl(path):
    """The records of a jsonl file, skipping a final line cut off by a kill."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the writer was killed mid-line
            raise UserError(f"{path} line {number} is not JSON: the file is corrupt; "
                            f"drop that run or restore the file") from None
    return records


def _read_config(path):
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise UserError(f"{path} is not valid YAML ({problem}): restore the config.yaml "
                        f"the trainer wrote") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a YAML mapping: restore the config.yaml the "
                        f"trainer wrote")
    return config


def _read_summary(path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # killed while writing it: fall back to the jsonl files


def _default_label(folder, config):
    if config.get("name"):
        return str(config["name"])
    policy = (config.get("policy") or {}).get("name")
    straggler = (config.get("stragglers") or {}).get("name")
    if policy and straggler:
        return f"{policy} ({straggler})"
    return policy or folder.name


def load_run(folder):
    """Read one run folder; the label is not yet disambiguated (see load_runs)."""
    folder = Path(folder)
    config_path, eval_path, summary_path = (folder / "config.yaml", folder / "eval.jsonl",
                                            folder / "summary.json")
    rank_paths = {int(m.group(1)): p for p in folder.glob("rank-*.jsonl")
                  if (m := RANK_FILE.fullmatch(p.name))}
    if not folder.is_dir() or not (config_path.is_file() or eval_path.is_file() or rank_paths):
        raise UserError(f"{folder} is not a run folder (no config.yaml, eval.jsonl or "
                        f"rank-*.jsonl): pass the folders the trainer wrote under output.dir")
    config = _read_config(config_path) if config_path.is_file() else {}
    return Run(label=_default_label(folder, config), folder=folder, config=config,
               ranks={rank: _read_jsonl(rank_paths[rank]) for rank in sorted(rank_paths)},
               # eval.jsonl also notes lost ranks ({"lost_ranks": ...}): evaluations only.
               evals=[e for e in _read_jsonl(eval_path) if "lost_ranks" not in e]
               if eval_path.is_file() else [],
               summary=_read_summary(summary_path) if summary_path.is_file() else None)


def load_runs(folders):
    """load_run for each folder, with the folder name appended to repeated labels."""
    runs = [load_run(folder) for folder in folders]
    counts = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} [{run.folder.name}]"
    return runs


def _mean(values):
    """Mean over the values that exist; nan when none do."""
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def per_rank(run):
    """Iterations, mean neighbours and wait share of each rank, as three lists
    indexed by rank (a rank without records counts as 0 iterations)."""
    if run.summary is not None:
        return run.summary["iterations"], run.summary["neighbours"], run.summary["wait_share"]
    iterations, neighbours, wait_share = [], [], []
    for rank in range(max(run.ranks, default=-1) + 1):
        records = run.ranks.get(rank, [])
        iterations.append(len(records))
        neighbours.append(_mean([len(r["averaged"]) for r in records]))
        last_time = records[-1]["time"] if records else 0.0
        wait_share.append(sum(r["wait"] for r in records) / last_time if last_time > 0
                          else math.nan)
    return iterations, neighbours, wait_share


def _time_to_target(run, target):
    # The summary's figure is authoritative for its own target; any other
    # target is read off the evaluations: the first one that reaches it.
    if run.summary is not None and run.summary.get("target_accuracy") == target:
        return run.summary.get("time_to_target")
    return next((e["time"] for e in run.evals if e["accuracy"] >= target), None)


def table(runs, target=None):
    """One row per run; target (accuracy) defaults to the one in each summary."""
    rows = []
    for run in runs:
        summary = run.summary or {}
        iterations, neighbours, wait_share = per_rank(run)
        last_times = [records[-1]["time"] for records in run.ranks.values() if records]
        last_times += [run.evals[-1]["time"]] if run.evals else []
        run_target = target if target is not None else summary.get("target_accuracy")
        rows.append({
            "run": run.label,
            "policy": summary.get("policy") or (run.config.get("policy") or {}).get("name"),
            "accuracy": summary.get("accuracy", run.evals[-1]["accuracy"] if run.evals else None),
            "seconds": summary.get("seconds", max(last_times, default=None)),
            "target": run_target,
            "time_to_target": None if run_target is None else _time_to_target(run, run_target),
            "iterations": (min(iterations), float(np.median(iterations)), max(iterations))
                          if iterations else None,
            "neighbours": _mean(neighbours),
            "wait_share": _mean(wait_share),
            "exit": summary.get("exit", "unfinished"),
        })
    return rows


def _cells(row):
    def number(value, spec):
        return "-" if value is None or math.isnan(value) else format(value, spec)

    if row["target"] is None:
        to_target = "-"
    elif row["time_to_target"] is None:
        to_target = f"not reached ({row['target']:g})"
    else:
        to_target = f"{row['time_to_target']:.1f} s ({row['target']:g})"
    iterations = "-" if row["iterations"] is None else "/".join(f"{n:g}" for n in row["iterations"])
    run = row["run"] + ("" if row["exit"] == "finished" else f" ({row['exit']})")
    return [run, row["policy"] or "-",
            number(row["accuracy"], ".4f"), number(row["seconds"], ".1f"), to_target, iterations,
            number(row["neighbours"], ".2f"), number(row["wait_share"], ".3f")]


HEADERS = ["run", "policy", "accuracy", "seconds", "time to target",
           "iterations min/median/max", "neighbours", "wait share"]


def format_table(rows):
    """The rows as aligned plain text, for the terminal."""
    lines = [HEADERS] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)


def format_markdown(rows):
    lines = [HEADERS, ["---"] * len(HEADERS)] + [_cells(row) for row in rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |"
                     for line in lines) + "\n"


def _save(figure, path):
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _rolling_mean(values, window):
    """Mean of each value with up to window - 1 before it, so that a run
    shorter than one window still draws a line from its first iteration."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_accuracy(runs, path, target=None):
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for run in runs:
        if run.evals:
            axes.plot([e["time"] for e in run.evals], [e["accuracy"] for e in run.evals],
                      marker=".", label=run.label)
    if target is not None:
        axes.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
    axes.set(xlabel="training time (s)", ylabel="test accuracy (averaged model)",
             title="Accuracy against wall-clock time")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    return _save(figure, path)


def plot_neighbours(runs, path):
    figure = Figure(figsize=(7, 2.6 * len(runs)))
    panels = figure.subplots(len(runs), 1, squeeze=False, sharex=True)[:, 0]
    for run, axes in zip(runs, panels):
        for rank, records in run.ranks.items():
            if records:
                axes.plot([r["time"] for r in records],
                          _rolling_mean([len(r["averaged"]) for r in records], ROLLING_WINDOW),
                          label=f"rank {rank}")
        axes.set(title=run.label, ylabel="neighbours averaged")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small", ncol=4)
    panels[-1].set_xlabel(f"training time (s), mean over {ROLLING_WINDOW} iterations")
    return _save(figure, path)


def plot_wait_share(runs, path):
    figure = Figure(figsize=(max(5, 1.8 * len(runs)), 4.5))
    axes = figure.add_subplot()
    shares = [per_rank(run)[2] for run in runs]
    width = 0.8 / max(len(s) for s in shares) if any(shares) else 0.8
    colours = {}
    for group, run_shares in enumerate(shares):
        # Bars are centred on their group; a rank keeps its colour across runs.
        start = group - width * (len(run_shares) - 1) / 2
        for rank, share in enumerate(run_shares):
            bars = axes.bar(start + rank * width, share, width, color=colours.get(rank),
                            label=None if rank in colours else f"rank {rank}")
            colours.setdefault(rank, bars[0].get_facecolor())
    axes.set_xticks(range(len(runs)), [run.label for run in runs], rotation=15, ha="right")
    axes.set(ylabel="share of time waiting", title="Wait share per rank")
    axes.grid(axis="y", alpha=0.3)
    if colours:
        axes.legend(fontsize="small", ncol=4)
    return _save(figure, path)


def plot_runs(runs, out_dir, target=None):
    """Write the three PNGs into out_dir (created if missing); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_accuracy(runs, out_dir / "accuracy.png", target),
            plot_neighbours(runs, out_dir / "neighbours.png"),
            plot_wait_share(runs, out_dir / "wait_share.png")]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m aau_mpi.plot",
                                     description="Plot and tabulate training runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders the trainer wrote")
    parser.add_argument("--out", type=Path, default=Path("plots"),
                        help="folder for the PNGs and runs.md (default: plots)")
    parser.add_argument("--target", type=float,
                        help="test accuracy (0-1) to time the runs to; default: each summary's")
    args = parser.parse_args(argv)
    if args.target is not None and not 0 < args.target <= 1:
        raise UserError(f"--target must be an accuracy in (0, 1], got {args.target:g}: "
                        f"write e.g. 0.9 for 90%")
    runs = load_runs(args.runs)
    paths = plot_runs(runs, args.out, args.target)
    rows = table(runs, args.target)
    paths.append(args.out / "runs.md")
    paths[-1].write_text(format_markdown(rows))
    print(format_table(rows))
    print("\nwrote " + ", ".join(str(p) for p in paths))


def cli():
    sys.exit(exit_status(main))


if __name__ == "__main__":
    cli()
