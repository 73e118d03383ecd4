"""The simulator's calibration: what an iteration of the real system costs beyond its compute.

`calibrate(folders)` fits it from run folders that aau_mpi.train wrote
(config.yaml, summary.json, rank-NNNNN.jsonl), per (policy, number of ranks):

- overhead: per iteration, the time a step takes beyond its compute phase
  and its wait (mixing, the local step, the deposit's snapshot, counting
  samples and serving events): the next iteration's start minus this one's,
  minus its compute and its wait, from every rank's log;
- collective (the allreduce policy): per iteration, the gradient
  Allreduce's wait beyond the wait for the slowest rank's compute phase;
- deposit: the communication thread's seconds per deposit (mailbox policies).

Each is summarised by its mean, median, 5th and 95th percentiles and the
number of iterations behind it; the first iteration of each rank (start-up)
is left out. Runs on an emulated accelerator (`emulate:`) give these free of
the host's compute; the compute model itself is the job's (the simulator
reads `emulate` and the stragglers from the job config, not from here).

The file (JSON): {"groups": [{"policy", "ranks", "runs", "overhead_seconds",
"collective_seconds" (allreduce) or "deposit_seconds"}, ...], "sources",
"command"}; `load_calibration` picks a group for the simulator.
Files only: no MPI, no torch.
"""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from aau_mpi.base.errors import UserError


def summarise(values):
    """Mean, median, 5th and 95th percentiles (seconds) and the count, or None if empty."""
    if not values:
        return None
    data = np.asarray(values, np.float64)
    p05, median, p95 = np.percentile(data, [5, 50, 95])
    return {"mean": float(data.mean()), "median": float(median), "p05": float(p05),
            "p95": float(p95), "count": int(data.size)}


def read_run(folder):
    """(policy, ranks, {rank: [iteration records]}) of one run folder."""
    folder = Path(folder)
    config_file, summary_file = folder / "config.yaml", folder / "summary.json"
    if not config_file.is_file() or not summary_file.is_file():
        raise UserError(f"{folder} is not a finished run folder (no config.yaml or "
                        f"summary.json): pass the folders that aau_mpi.train wrote")
    config = yaml.safe_load(config_file.read_text())
    if "simulation" in config:
        raise UserError(f"{folder} is a simulated run: calibrate from runs of the real "
                        f"system (aau_mpi.train)")
    ranks = int(json.loads(summary_file.read_text())["world_size"])
    logs = {}
    for path in sorted(folder.glob("rank-*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        logs[int(path.stem.split("-")[1])] = [r for r in records if "iteration" in r]
    if not logs:
        raise UserError(f"{folder} holds no rank logs (rank-NNNNN.jsonl): pass the "
                        f"folders that aau_mpi.train wrote")
    return config["policy"]["name"], ranks, logs


def overheads(records):
    """Per iteration after the first: next start - this start - compute - wait."""
    return [b["time"] - a["time"] - b["compute"] - b["wait"]
            for a, b in zip(records, records[1:])]


def collective_waits(logs):
    """Per rank and iteration after the first: the Allreduce's wait beyond the wait
    for the slowest rank's compute (lock step: iteration k is the same step on all)."""
    by_iteration = defaultdict(dict)
    for rank, records in logs.items():
        for record in records[1:]:
            by_iteration[record["iteration"]][rank] = record
    beyond = []
    for records in by_iteration.values():
        if len(records) < len(logs):   # a rank stopped first: not a whole round
            continue
        slowest = max(r["compute"] for r in records.values())
        beyond += [r["wait"] - (slowest - r["compute"]) for r in records.values()]
    return beyond


def calibrate(folders):
    """The calibration dict of the run folders (see the module doc)."""
    grouped = defaultdict(lambda: {"runs": 0, "overhead": [], "collective": [], "deposit": []})
    for folder in folders:
        policy, ranks, logs = read_run(folder)
        group = grouped[policy, ranks]
        group["runs"] += 1
        for records in logs.values():
            group["overhead"] += overheads(records)
            group["deposit"] += [r["deposit"] for r in records[1:] if r.get("deposit")]
        if policy == "allreduce":
            group["collective"] += collective_waits(logs)
    groups = []
    for (policy, ranks), group in sorted(grouped.items()):
        entry = {"policy": policy, "ranks": ranks, "runs": group["runs"],
                 "overhead_seconds": summarise(group["overhead"])}
        if policy == "allreduce":
            entry["collective_seconds"] = summarise(group["collective"])
        else:
            entry["deposit_seconds"] = summarise(group["deposit"])
        if entry["overhead_seconds"] is None:
            raise UserError(f"the {policy} runs on {ranks} ranks have fewer than two "
                            f"iterations per rank: calibrate from longer runs")
        groups.append(entry)
    return {"groups": groups, "sources": [str(f) for f in folders]}


def load_calibration(path, policy, ranks):
    """The group of calibration file `path` for `policy`, from the nearest number of
    ranks (the larger on a tie): (group, what it says about where it came from)."""
    path = Path(path)
    try:
        groups = json.loads(path.read_text())["groups"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot read calibration {path} ({error}): write one with "
                        f"python -m aau_mpi.calibrate RUN_FOLDER ... --out {path}") from None
    mine = [g for g in groups if g["policy"] == policy]
    if not mine:
        have = sorted({g["policy"] for g in groups})
        raise UserError(f"calibration {path} has no {policy} runs (it has {', '.join(have)}): "
                        f"calibrate from runs of policy {policy} too")
    group = min(mine, key=lambda g: (abs(g["ranks"] - ranks), -g["ranks"]))
    return group, f"{path} ({policy}, {group['ranks']} ranks, {group['runs']} runs)"
