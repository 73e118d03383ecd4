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
is left out. Per (policy, ranks) there is a group of every run, and a group
per straggler setting (the job's `stragglers` section, its seed left out):
on oversubscribed cores the lock-step policies' costs depend on how the
ranks arrive (16 emulated ranks on 2 cores: allreduce's overhead and
collective 27 ms a step without stragglers, 15 ms with one rank 4x slower). Runs on an emulated accelerator (`emulate:`) give these free of
the host's compute; the compute model itself is the job's (the simulator
reads `emulate` and the stragglers from the job config, not from here).

The file (JSON): {"groups": [{"policy", "ranks", "stragglers" (None: every
setting), "runs", "overhead_seconds", "collective_seconds" (allreduce) or
"deposit_seconds"}, ...], "sources", "command"}; `load_calibration` picks a
group for the simulator.
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


def setting(stragglers):
    """A straggler section as a calibration group names it: its seed left out (a
    setting's seeds are one setting)."""
    return {key: value for key, value in stragglers.items() if key != "seed"}


def read_run(folder):
    """(policy, ranks, straggler setting, {rank: [iteration records]}) of one run folder."""
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
    return config["policy"]["name"], ranks, setting(config.get("stragglers") or {}), logs


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
        policy, ranks, stragglers, logs = read_run(folder)
        overhead, deposit = [], []
        for records in logs.values():
            overhead += overheads(records)
            deposit += [r["deposit"] for r in records[1:] if r.get("deposit")]
        collective = collective_waits(logs) if policy == "allreduce" else []
        # Every run, and its setting's group (the key: the setting as sorted JSON).
        for key in (None, json.dumps(stragglers, sort_keys=True)):
            group = grouped[policy, ranks, key]
            group["runs"] += 1
            group["overhead"] += overhead
            group["deposit"] += deposit
            group["collective"] += collective
    groups = []
    for (policy, ranks, key), group in sorted(grouped.items(),
                                              key=lambda item: (*item[0][:2], item[0][2] or "")):
        entry = {"policy": policy, "ranks": ranks,
                 "stragglers": None if key is None else json.loads(key), "runs": group["runs"],
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


def load_calibration(path, policy, ranks, stragglers=None):
    """The group of calibration file `path` for `policy`, from the nearest number of
    ranks (the larger on a tie), of the straggler setting `stragglers` (a job's
    section) where the file has it, else of every setting: (group, what it says
    about where it came from)."""
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
    nearest = min(mine, key=lambda g: (abs(g["ranks"] - ranks), -g["ranks"]))["ranks"]
    mine = [g for g in mine if g["ranks"] == nearest]
    wanted = None if stragglers is None else setting(stragglers)
    exact = [g for g in mine if wanted is not None and g.get("stragglers") == wanted]
    every = [g for g in mine if g.get("stragglers") is None]
    group = (exact or every or mine)[0]
    which = "every setting" if group.get("stragglers") is None else "this setting"
    return group, (f"{path} ({policy}, {group['ranks']} ranks, {which}, "
                   f"{group['runs']} runs)")
