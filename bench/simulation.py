"""The calibrated simulator against the emulated-accelerator benchmark.

    python bench/simulation.py validate [--emulated bench/results/emulated/n8.json ...]
                                        [--jobs 2] [--runs DIR]

Every evaluated run of the emulated-accelerator benchmark's results
(bench/emulated.py, bench/results/emulated/n<N>.json) of the policies in
VALIDATED is run again in the simulator (aau_mpi.simulate): the same job,
partition, stragglers, seed and learning rate, N virtual workers for N
ranks, the job's emulated accelerator as the compute model (the same
jitter draws), and the calibration fitted from that benchmark's own rank
logs (calibration-n<N>.json, which bench/emulated.py writes beside its
results: each policy's per-iteration overhead and the allreduce's
collective, per straggler setting). For each cell (partition, setting) and
pair of policies it compares the ratio of their times to the pair's common
accuracy, real against simulated: the geometric mean over the seeds of the
per-seed ratios, at the target or below it the highest multiple of
LEVEL_STEP that every seed of both policies reached, real and simulated
(none below MIN_LEVEL: the pair is listed as not compared). Writes
simulation_validation.json (share_within_15pct: the share of compared
ratios within TOLERANCE) and .md.

Five seeds do not always pin the real ratio down to TOLERANCE: each row
also carries the real ratio's bootstrap 95 % interval over the seeds, and
the record counts the misses that fall inside it (the benchmark itself
cannot tell them from a hit) and the share within TOLERANCE among the rows
whose real interval lies within TOLERANCE of the real ratio.

Simulations run in --jobs processes (one torch thread each); the run
folders stay under --runs, and a relaunch with the same --runs simulates
only what is missing (bench/projection.py runs its simulations here too).
No timing of this machine enters the virtual clocks.
"""

import argparse
import itertools
import json
import math
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import yaml

import benchlib
import emulated
import emulated_report
from benchlib import cell

VALIDATED = ("allreduce", "dpsgd", "async", "fixed_k", "aau")
TOLERANCE = 0.15          # a simulated ratio within 15 % of the real one agrees
MIN_LEVEL = 0.2           # a common accuracy below twice chance compares nothing
LEVEL_STEP = 0.05


# ------------------------------------------------------------------ simulations

DIVERGED = "diverged"      # the mark of a run folder whose simulation diverged
WALL = "wall_seconds"      # a run folder's file: the seconds its simulation took here


def simulate(task):
    """One simulation in this (pool) process; the benchmark's record of its run folder.
    A folder with a summary or the DIVERGED mark is read, not simulated again; one
    without either (a stopped benchmark's) is simulated again."""
    import torch

    from aau_mpi.training.config_loading import load_config
    from aau_mpi.base.errors import UserError
    from aau_mpi.simulate import Simulator

    torch.set_num_threads(1)
    config = load_config(task["config"], task["overrides"])
    folder = benchlib.run_folder(config)
    label = f"sim {task['ranks']:5} {' '.join(map(str, task['key'].values()))}"
    started = time.perf_counter()
    if benchlib.run_state(folder) == "finished" or (folder / DIVERGED).is_file():
        return recorded(task, config, check=True)
    if folder.is_dir():
        shutil.rmtree(folder)
    try:
        Simulator(config, task["ranks"], **task["options"]).run()
    except UserError as err:
        if not str(err).startswith("training diverged"):
            raise
        # As a real run may: a failed run (recorded so), not a failed benchmark.
        (folder / DIVERGED).touch()
        print(f"{label}: {err}", flush=True)
    (folder / WALL).write_text(f"{time.perf_counter() - started:.1f}\n")
    record = recorded(task, config)
    print(f"{label}: accuracy {cell(record['accuracy'], '.4f')}, target at "
          f"{cell(record['time_to_target'], '.2f')} virtual s ({record['wall_seconds']:.0f} s)",
          flush=True)
    return record


def recorded(task, config, check=False):
    """A finished (or diverged) simulation's record, read back from its run folder;
    `check`: the folder must hold this task's run (its job and N), not another's."""
    folder = benchlib.run_folder(config)
    if check:
        written = yaml.safe_load((folder / "config.yaml").read_text())
        if (written.pop("simulation")["ranks"] != task["ranks"]
                or written != yaml.safe_load(config.to_yaml())):
            raise SystemExit(f"error: run folder {folder} holds another run than this "
                             f"task's: give another --runs, or delete it")
    finished = benchlib.run_state(folder) == "finished"
    run = benchlib.read_run(config) if finished else benchlib.read_failed_run(config)
    wall = folder / WALL   # absent in folders simulated before it was written
    return {**task["key"], "ranks": task["ranks"], **run,
            "wall_seconds": float(wall.read_text()) if wall.is_file() else None}


def pool(jobs):
    """Processes for simulate(): started once (each imports torch), used for every batch."""
    return multiprocessing.get_context("spawn").Pool(jobs)


def run_all(tasks, processes):
    """simulate() every task in `processes` (a pool()); the records in the tasks' order."""
    # Longest first, so the pool's last task is a short one.
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i]["ranks"])
    records = processes.map(simulate, [tasks[i] for i in order], chunksize=1)
    return [record for _, record in sorted(zip(order, records))]


def config_path(plan):
    """The plan's job; a result made on another machine names its own path."""
    path = Path(plan["config"])
    return str(path if path.is_file() else benchlib.BENCH / path.name)


# ------------------------------------------------------------------ validate

def validation_tasks(path, result, runs_dir):
    """A simulation of every evaluated run of the emulated benchmark's result at
    `path`, calibrated by calibration-n<N>.json beside it."""
    plan = {**result["plan"], "runs_dir": str(runs_dir),
            "overrides": [*result["plan"]["overrides"], "output.progress=false"]}
    calibration = Path(path).parent / f"calibration-n{plan['ranks']}.json"
    if not calibration.is_file():
        raise SystemExit(f"error: no {calibration}: bench/emulated.py --ranks "
                         f"{plan['ranks']} writes it beside its results")
    tasks = []
    for run in result["runs"]:
        if run["phase"] != "run" or run["policy"] not in VALIDATED or run.get("refused"):
            continue
        key = {"partition": run["partition"], "setting": run["setting"], "seed": run["seed"],
               "policy": run["policy"]}
        # N in the name: the same cell at another N is another run.
        name = emulated.run_name(f"sim-n{plan['ranks']}", *key.values(), run["lr"])
        tasks.append({"config": config_path(plan), "ranks": plan["ranks"],
                      "overrides": emulated.overrides(plan, name, *key.values(), run["lr"]),
                      "options": {"calibration": str(calibration)}, "key": key})
    return calibration, tasks


def common_level(runs, target):
    """The target, or the highest multiple of LEVEL_STEP that every run reached
    (a diverged run reaches what its evaluations show)."""
    reached = min(max((point[2] for point in run["curve"]), default=0.0) for run in runs)
    # rounded: 6 x 0.05 is 0.30000000000000004, which a curve at 0.3 never reaches
    return min(target, round(math.floor(reached / LEVEL_STEP + 1e-9) * LEVEL_STEP, 9))


def seed_ratios(first, second, level):
    """Per seed: first's time to `level` over second's."""
    return [emulated_report.crossing(a["curve"], level)
            / emulated_report.crossing(b["curve"], level) for a, b in zip(first, second)]


def compare(result, simulated):
    """One row per (cell, pair of policies): their time ratio, real and simulated."""
    ranks, target = result["plan"]["ranks"], result["runs"][0]["target"]
    rng = np.random.default_rng(0)
    real = [r for r in result["runs"] if r["phase"] == "run" and r["policy"] in VALIDATED
            and not r.get("refused")]
    by = {}
    for source, runs in (("real", real), ("simulated", simulated)):
        for r in runs:
            by[source, r["partition"], r["setting"], r["policy"], r["seed"]] = r
    rows = []
    for part, setting in dict.fromkeys((r["partition"], r["setting"]) for r in real):
        for first, second in itertools.combinations(VALIDATED, 2):
            seeds = sorted({r["seed"] for r in real if (r["partition"], r["setting"], r["policy"])
                            == (part, setting, first)})
            pick = {(source, policy): [by.get((source, part, setting, policy, seed))
                                       for seed in seeds]
                    for source in ("real", "simulated") for policy in (first, second)}
            row = {"ranks": ranks, "partition": part, "setting": setting,
                   "pair": [first, second], "seeds": seeds}
            runs = [r for group in pick.values() for r in group]
            if not seeds or None in runs:
                rows.append({**row, "compared": False, "why": "a run is missing"})
                continue
            level = common_level(runs, target)
            if level < MIN_LEVEL:
                rows.append({**row, "compared": False, "level": level,
                             "why": f"no common accuracy of {MIN_LEVEL:g} or more"})
                continue
            real_ratio, low, high = emulated_report.geometric_mean_interval(
                seed_ratios(pick["real", first], pick["real", second], level), rng)
            simulated_ratio = statistics.geometric_mean(seed_ratios(
                pick["simulated", first], pick["simulated", second], level))
            error = simulated_ratio / real_ratio - 1
            rows.append({**row, "compared": True, "level": level, "real_ratio": real_ratio,
                         "real_low": low, "real_high": high, "simulated_ratio": simulated_ratio,
                         "error": error, "within": abs(error) <= TOLERANCE,
                         "inside_real_interval": low <= simulated_ratio <= high,
                         "real_precise": low >= real_ratio / (1 + TOLERANCE)
                         and high <= real_ratio * (1 + TOLERANCE)})
    return rows


VALIDATION_HEADERS = ["N", "partition", "setting", "pair", "accuracy", "real ratio [95 % CI]",
                      "simulated ratio", "sim / real - 1", f"within {TOLERANCE:.0%}"]


def validation_cells(row):
    head = [row["ranks"], row["partition"], row["setting"], "/".join(row["pair"])]
    if not row["compared"]:
        return head + [cell(row.get("level"), ".2f"), "-", "-", "-", row["why"]]
    verdict = ("yes" if row["within"] else
               "**no**, inside the real interval" if row["inside_real_interval"] else "**no**")
    return head + [f"{row['level']:.2f}",
                   f"{row['real_ratio']:.2f} [{row['real_low']:.2f}, {row['real_high']:.2f}]",
                   f"{row['simulated_ratio']:.2f}", f"{row['error']:+.0%}", verdict]


def validate(args):
    runs_dir = Path(args.runs).resolve()
    results, tasks, calibrations = [], [], {}
    for path in args.emulated:
        result = json.loads(Path(path).read_text())
        calibration, mine = validation_tasks(path, result, runs_dir)
        results.append(result)
        calibrations[result["plan"]["ranks"]] = str(calibration)
        tasks += mine
    with pool(args.jobs) as processes:
        simulated = run_all(tasks, processes)
    rows = []
    for result in results:
        ranks = result["plan"]["ranks"]
        rows += compare(result, [r for r in simulated if r["ranks"] == ranks])
    compared = [r for r in rows if r["compared"]]
    within = sum(r["within"] for r in compared)
    share = within / len(compared) if compared else None
    per_ranks = {ranks: sum(r["within"] for r in compared if r["ranks"] == ranks)
                 / max(1, sum(1 for r in compared if r["ranks"] == ranks))
                 for ranks in calibrations}
    precise = [r for r in compared if r["real_precise"]]
    misses_inside = sum(not r["within"] and r["inside_real_interval"] for r in compared)
    record = {"benchmark": "simulation_validation", "date": benchlib.today(),
              "machine": benchlib.machine(), "code": benchlib.source(),
              "emulated": [str(p) for p in args.emulated],
              "calibrations": calibrations, "tolerance": TOLERANCE,
              "share_within_15pct": share, "share_within_15pct_by_ranks": per_ranks,
              "within": within, "compared": len(compared),
              "misses_inside_real_interval": misses_inside, "real_precise": len(precise),
              "share_within_15pct_where_real_is_precise":
                  sum(r["within"] for r in precise) / len(precise) if precise else None,
              "not_compared": len(rows) - len(compared), "rows": rows, "simulated": simulated}
    intro = (f"# The simulator against the emulated-accelerator benchmark ({record['date']})\n\n"
             f"`{' '.join(['python bench/simulation.py validate', *map(str, args.emulated)])}`. "
             f"Per cell and pair of policies, the geometric mean over the seeds of the ratio of "
             f"their times to the pair's common accuracy, real and simulated (calibrations "
             f"{json.dumps(calibrations)}). {within} of {len(compared)} compared ratios within "
             f"{TOLERANCE:.0%} ({len(rows) - len(compared)} pairs not compared); of the "
             f"{len(compared) - within} misses, {misses_inside} fall inside the real ratio's "
             f"bootstrap 95 % interval over the seeds. {len(precise)} real ratios are known "
             f"within {TOLERANCE:.0%} (their interval inside it): "
             f"{sum(r['within'] for r in precise)} of them agree.")
    json_path = benchlib.write_report(args.out, "simulation_validation", record, intro,
                                      VALIDATION_HEADERS, [validation_cells(r) for r in rows])
    print(f"{within} of {len(compared)} within {TOLERANCE:.0%} ({misses_inside} misses inside "
          f"the real interval); wrote {json_path}")


# ------------------------------------------------------------------ driver

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["validate"])
    parser.add_argument("--emulated", nargs="+",
                        default=sorted(str(p) for p in (benchlib.RESULTS / "emulated")
                                       .glob("n*.json")),
                        help="results of bench/emulated.py, each simulated again")
    parser.add_argument("--jobs", type=int, default=2, help="simulations at once")
    parser.add_argument("--runs", help="folder for the run folders "
                                       "(default runs/bench-simulation-<time>)")
    parser.add_argument("--out", default=str(benchlib.RESULTS), help="folder for the report")
    args = parser.parse_args(argv)
    args.runs = args.runs or f"runs/bench-simulation-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv=None):
    validate(parse_args(argv))


if __name__ == "__main__":
    main()
