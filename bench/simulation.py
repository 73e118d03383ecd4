"""The simulator against the real straggler benchmark, then beyond what this machine runs.

    python bench/simulation.py validate [--real bench/results/stragglers.json ...] [--jobs 2]
    python bench/simulation.py project [--ranks 16 64 256 1024] [--jobs 2]

validate: every evaluated run of the emulated-accelerator benchmark's
results (bench/emulated.py, bench/results/emulated/n<N>.json) of the
policies in VALIDATED is run again in the simulator (aau_mpi.simulate): the
same job, partition, stragglers, seed and learning rate, N virtual workers
for N ranks, the job's emulated accelerator as the compute model (the same
jitter draws), and the calibration fitted from that benchmark's own rank
logs (calibration-n<N>.json, which bench/emulated.py writes beside its
results: each policy's per-iteration overhead and the allreduce's collective). For each cell (partition, setting) and
pair of policies it compares the ratio of their times to the pair's common
accuracy, real against simulated: the geometric mean over the seeds of the
per-seed ratios, at the target or below it the highest multiple of
LEVEL_STEP that every seed of both policies reached, real and simulated
(none below MIN_LEVEL: the pair is listed as not compared). Writes
simulation_validation.json (share_within_15pct: the share of compared
ratios within TOLERANCE) and .md.

project: N = 16 ... 1024 workers on the benchmark's job with a sample budget
(--epochs, default BUDGET_EPOCHS, of the training set, all workers together) instead of a time
budget, so that "samples to target" answers whether the speed-up is linear:
with a linear speed-up it does not grow with N, and time to target falls as
1/N. Per-worker batch fixed; the learning rate tuned on 4 ranks (the real
result's dirichlet rates) and scaled by sqrt(global batch / the 4-rank
global batch) for every policy, and for aau also unscaled. Without
stragglers and under the Pareto model (every worker's steps delayed at
random: a synchronous round waits for the slowest of N). The step time is
measured once here (one thread, before the workers start). Writes
simulation_projection.json, .md and .png.

Simulations run in --jobs processes (one torch thread each); the run
folders stay under --runs. No timing of this machine enters the virtual
clocks except the step times named above.
"""

import argparse
import itertools
import json
import math
import multiprocessing
import time
from pathlib import Path


import benchlib
import emulated
import emulated_report
import stragglers
from benchlib import cell, median

VALIDATED = ("allreduce", "dpsgd", "async", "fixed_k", "aau")
TOLERANCE = 0.15          # a simulated ratio within 15 % of the real one agrees
MIN_LEVEL = 0.2           # a common accuracy below twice chance compares nothing
COMPARED = ("aau", "dpsgd", "async", "allreduce")
BASELINES = ("dpsgd", "async", "allreduce")
# Compared with the baselines too where the real result has it: aau with the
# rate-scaled step (the default before the MNIST-1D benchmark).
SUBJECTS = ("aau", "aau_scaled")
LEVEL_STEP = 0.05
PROJECTED_RANKS = (16, 64, 256, 1024)
PROJECTED_SETTINGS = ("none", "pareto")
BUDGET_EPOCHS = 20        # 320,000 samples: 625 iterations a worker at N = 16, 10 at N = 1024
PROJECTION_PARTITION = "dirichlet"
TUNED_RANKS = 4           # the rates come from the 4-rank benchmark


# ------------------------------------------------------------------ simulations

def simulate(task):
    """One simulation in this (pool) process; the benchmark's record of its run folder."""
    import torch

    from aau_mpi.training.config_loading import load_config
    from aau_mpi.base.errors import UserError
    from aau_mpi.simulate import Simulator

    torch.set_num_threads(1)
    config = load_config(task["config"], [*task["overrides"], "output.progress=false"])
    started = time.perf_counter()
    try:
        Simulator(config, task["ranks"], **task["options"]).run()
    except UserError as err:
        if not str(err).startswith("training diverged"):
            raise
        # As a real run may: a failed run (recorded so), not a failed benchmark.
        print(f"sim {task['ranks']:5} {' '.join(map(str, task['key'].values()))}: {err}",
              flush=True)
    record = {**recorded(task), "wall_seconds": time.perf_counter() - started}
    print(f"sim {task['ranks']:5} {' '.join(map(str, task['key'].values()))}: accuracy "
          f"{cell(record['accuracy'], '.4f')}, target at {cell(record['time_to_target'], '.2f')} "
          f"virtual s ({record['wall_seconds']:.0f} s)", flush=True)
    return record


def recorded(task):
    """A finished (or diverged) simulation's record, read back from its run folder."""
    from aau_mpi.training.config_loading import load_config

    config = load_config(task["config"], [*task["overrides"], "output.progress=false"])
    state = benchlib.run_state(benchlib.run_folder(config))
    if state == "new":
        raise SystemExit(f"error: no run folder {benchlib.run_folder(config)}: --from-runs takes "
                         "the --runs folder of a projection with the same --ranks and --epochs")
    run = benchlib.read_run(config) if state == "finished" else benchlib.read_failed_run(config)
    return {**task["key"], "ranks": task["ranks"], **run}


def run_all(tasks, jobs):
    # Longest first, so the pool's last task is a short one.
    tasks = sorted(tasks, key=lambda t: -t["ranks"])
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.map(simulate, tasks, chunksize=1)


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
        name = emulated.run_name("sim", *key.values(), run["lr"])
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


def geometric_mean_ratio(first, second, level):
    """Over the seeds: exp(mean log(first's time to `level` / second's))."""
    logs = [math.log(emulated_report.crossing(a["curve"], level)
                     / emulated_report.crossing(b["curve"], level))
            for a, b in zip(first, second)]
    return math.exp(sum(logs) / len(logs))


def compare(result, simulated):
    """One row per (cell, pair of policies): their time ratio, real and simulated."""
    ranks, target = result["plan"]["ranks"], result["runs"][0]["target"]
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
            ratio = {source: geometric_mean_ratio(pick[source, first], pick[source, second],
                                                  level) for source in ("real", "simulated")}
            error = ratio["simulated"] / ratio["real"] - 1
            rows.append({**row, "compared": True, "level": level, "real_ratio": ratio["real"],
                         "simulated_ratio": ratio["simulated"], "error": error,
                         "within": abs(error) <= TOLERANCE})
    return rows


VALIDATION_HEADERS = ["N", "partition", "setting", "pair", "accuracy", "real ratio",
                      "simulated ratio", "sim / real - 1", f"within {TOLERANCE:.0%}"]


def validation_cells(row):
    head = [row["ranks"], row["partition"], row["setting"], "/".join(row["pair"])]
    if not row["compared"]:
        return head + [cell(row.get("level"), ".2f"), "-", "-", "-", row["why"]]
    return head + [f"{row['level']:.2f}", f"{row['real_ratio']:.2f}",
                   f"{row['simulated_ratio']:.2f}", f"{row['error']:+.0%}",
                   "yes" if row["within"] else "**no**"]


def validate(args):
    runs_dir = Path(args.runs).resolve()
    results, tasks, calibrations = [], [], {}
    for path in args.emulated:
        result = json.loads(Path(path).read_text())
        calibration, mine = validation_tasks(path, result, runs_dir)
        results.append(result)
        calibrations[result["plan"]["ranks"]] = str(calibration)
        tasks += mine
    simulated = run_all(tasks, args.jobs)
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
    record = {"benchmark": "simulation_validation", "date": benchlib.today(),
              "machine": benchlib.machine(), "emulated": [str(p) for p in args.emulated],
              "calibrations": calibrations, "tolerance": TOLERANCE,
              "share_within_15pct": share, "share_within_15pct_by_ranks": per_ranks,
              "within": within, "compared": len(compared),
              "not_compared": len(rows) - len(compared), "rows": rows, "simulated": simulated}
    out = Path(args.out)
    json_path = benchlib.write_json(out / "simulation_validation.json", record)
    table = [validation_cells(r) for r in rows]
    (out / "simulation_validation.md").write_text(
        f"# The simulator against the emulated-accelerator benchmark ({record['date']})\n\n"
        f"`{' '.join(['python bench/simulation.py validate', *map(str, args.emulated)])}`. "
        f"Per cell and pair of policies, the geometric mean over the seeds of the ratio of "
        f"their times to the pair's common accuracy, real and simulated (calibrations "
        f"{json.dumps(calibrations)}). {within} of {len(compared)} compared ratios within "
        f"{TOLERANCE:.0%} ({len(rows) - len(compared)} pairs not compared).\n\n"
        + benchlib.markdown_table(VALIDATION_HEADERS, table))
    print()
    print(benchlib.text_table(VALIDATION_HEADERS, table))
    print(f"{within} of {len(compared)} within {TOLERANCE:.0%}; wrote {json_path}")


# ------------------------------------------------------------------ project

def projection_tasks(args, real, step, runs_dir):
    best = real["best_lr"][PROJECTION_PARTITION]
    plan = {**real["plan"], "runs_dir": str(runs_dir), "overrides": [
        f"budget={json.dumps({'epochs': args.epochs})}",
        f"eval={json.dumps({'every_epochs': 1, 'target_accuracy': real['target']})}",
        f"optim.reference_batch={TUNED_RANKS * real_batch(real)}"]}
    tasks = []
    for ranks, setting, variant in itertools.product(args.ranks, PROJECTED_SETTINGS, COMPARED):
        for scaling in ("sqrt", "none") if variant == "aau" and setting == "none" else ("sqrt",):
            overrides = stragglers.run_overrides(plan, f"n{ranks}-{scaling}",
                                                 PROJECTION_PARTITION, setting, 0, variant,
                                                 best[variant])
            tasks.append({"config": config_path(plan),
                          "overrides": [*overrides, f"optim.scale_lr={scaling}"],
                          "ranks": ranks, "options": {"step_seconds": step},
                          "key": {"setting": setting, "variant": variant, "scaling": scaling}})
    return tasks


def real_batch(real):
    from aau_mpi.training.config_loading import load_config

    return load_config(config_path(real["plan"])).data.batch_size


def measured_step(real):
    """One step of the job's model and batch here, one thread, nothing else running."""
    import torch

    from aau_mpi.training.config_loading import load_config
    from aau_mpi.training.datasets import load_dataset
    from aau_mpi.training.models import build_model
    from aau_mpi.simulate import measure_step_seconds

    torch.set_num_threads(1)
    config = load_config(config_path(real["plan"]))
    data = load_dataset(config.data.name, config.data.params)
    model = build_model(config.model.name, data.input_shape, data.num_classes,
                        config.model.params)
    return measure_step_seconds(model, data.x_train, data.y_train, config.data.batch_size,
                                config.optim)


def samples_to(curve, accuracy):
    return next((point[1] for point in curve if point[2] >= accuracy), None)


def projection_rows(records, target):
    rows = []
    for r in sorted(records, key=lambda r: (r["setting"], r["variant"], r["scaling"],
                                            r["ranks"])):
        rows.append({"ranks": r["ranks"], "setting": r["setting"], "variant": r["variant"],
                     "scaling": r["scaling"], "accuracy": r["accuracy"],
                     "samples_to_target": samples_to(r["curve"], target),
                     "time_to_target": r["time_to_target"], "seconds": r["seconds"],
                     "diverged": bool(r.get("failed")),
                     "iterations": median(r["iterations"]) if r["iterations"] else None})
    return rows


def straggler_ratios(rows):
    """aau's virtual time to target over each baseline's, per (setting, N), sqrt scaling."""
    by = {(r["setting"], r["ranks"], r["variant"]): r for r in rows if r["scaling"] == "sqrt"}
    ratios = []
    for (setting, ranks, variant), aau in by.items():
        if variant != "aau":
            continue
        for baseline in BASELINES:
            base = by.get((setting, ranks, baseline))
            mine, theirs = aau["time_to_target"], base and base["time_to_target"]
            ratios.append({"setting": setting, "ranks": ranks, "baseline": baseline,
                           "ratio": mine / theirs if mine and theirs else None,
                           "aau_reached": mine is not None, "baseline_reached": bool(theirs)})
    return ratios


PROJECTION_HEADERS = ["setting", "policy", "lr scaling", "N", "iterations per worker",
                      "final acc", "samples to target", "virtual s to target", "virtual s"]


def projection_cells(row):
    return [row["setting"], row["variant"], row["scaling"], row["ranks"],
            cell(row["iterations"], ".0f"),
            f"diverged ({cell(row['accuracy'], '.4f')})" if row["diverged"]
            else cell(row["accuracy"], ".4f"),
            cell(row["samples_to_target"], ",d") if row["samples_to_target"] else "not reached",
            cell(row["time_to_target"], ".2f") if row["time_to_target"] else "not reached",
            cell(row["seconds"], ".2f")]


def plot_projection(record, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.8))
    panels = figure.subplots(1, len(PROJECTED_SETTINGS) + 1, squeeze=False)[0]
    for axes, setting in zip(panels, PROJECTED_SETTINGS):
        for n, (variant, scaling) in enumerate(
                [(v, "sqrt") for v in COMPARED] + [("aau", "none")]):
            runs = sorted((r for r in record["simulated"] if (r["setting"], r["variant"],
                           r["scaling"]) == (setting, variant, scaling)),
                          key=lambda r: r["ranks"])
            if not runs:
                continue
            axes.plot([r["ranks"] for r in runs], [r["accuracy"] for r in runs], marker="o",
                      color=f"C{n}", label=f"{variant} ({scaling})")
        axes.axhline(record["target"], color="grey", linestyle="--", linewidth=0.8)
        axes.set(title=f"{setting}: final accuracy, {record['budget_epochs']:g} epochs",
                 xlabel="workers N", xscale="log")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("test accuracy (averaged model)")
    panels[0].legend(fontsize="small")
    axes = panels[-1]
    for n, run in enumerate(sorted((r for r in record["simulated"]
                                    if (r["setting"], r["variant"], r["scaling"])
                                    == ("none", "aau", "sqrt")), key=lambda r: r["ranks"])):
        axes.plot([p[1] for p in run["curve"]], [p[2] for p in run["curve"]],
                  color=f"C{n}", label=f"N = {run['ranks']}")
    axes.set(title="aau (sqrt), none: accuracy against samples", xlabel="samples, all workers")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def recorded_step(runs_dir):
    """The step time a finished projection ran with (its summaries' timing)."""
    for summary in sorted(Path(runs_dir).glob("*/summary.json")):
        return json.loads(summary.read_text())["timing"]["step_seconds"]
    raise SystemExit(f"error: no finished simulation under {runs_dir}")


def project(args):
    real = json.loads(Path(args.real[0]).read_text())
    if args.from_runs:  # report again from the run folders, simulating nothing
        step = recorded_step(args.from_runs)
        simulated = [recorded(task) for task in
                     projection_tasks(args, real, step, Path(args.from_runs).resolve())]
    else:
        step = args.step_seconds or measured_step(real)
        print(f"step {step * 1e3:.2f} ms; rates {real['best_lr'][PROJECTION_PARTITION]}",
              flush=True)
        simulated = run_all(projection_tasks(args, real, step, Path(args.runs).resolve()),
                            args.jobs)
    rows = projection_rows(simulated, real["target"])
    record = {"benchmark": "simulation_projection", "date": benchlib.today(),
              "machine": benchlib.machine(), "tuned_on": str(args.real[0]),
              "step_seconds": step, "budget_epochs": args.epochs,
              "partition": PROJECTION_PARTITION, "target": real["target"],
              "rates": real["best_lr"][PROJECTION_PARTITION], "rows": rows,
              "straggler_ratios": straggler_ratios(rows), "simulated": simulated}
    out = Path(args.out)
    json_path = benchlib.write_json(out / "simulation_projection.json", record)
    ratio_table = benchlib.markdown_table(
        ["setting", "N", "aau / baseline", "virtual time ratio"],
        [[r["setting"], r["ranks"], f"aau/{r['baseline']}",
          cell(r["ratio"], ".2f") if r["ratio"] else
          f"aau {'reached' if r['aau_reached'] else 'not reached'}, "
          f"{r['baseline']} {'reached' if r['baseline_reached'] else 'not reached'}"]
         for r in record["straggler_ratios"]])
    (out / "simulation_projection.md").write_text(
        f"# Simulated projection to {max(args.ranks)} workers ({record['date']})\n\n"
        f"Job {config_path(real['plan'])}, partition {PROJECTION_PARTITION}, "
        f"{args.epochs:g} epochs, step {step * 1e3:.2f} ms, rates tuned on "
        f"{TUNED_RANKS} ranks ({args.real[0]}).\n\n"
        + benchlib.markdown_table(PROJECTION_HEADERS, [projection_cells(r) for r in rows])
        + "\n## Time to target, aau against each baseline\n\n" + ratio_table)
    plot_projection(record, out / "simulation_projection.png")
    print()
    print(benchlib.text_table(PROJECTION_HEADERS, [projection_cells(r) for r in rows]))
    print(f"wrote {json_path}")


# ------------------------------------------------------------------ driver

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["validate", "project"])
    parser.add_argument("--emulated", nargs="+",
                        default=sorted(str(p) for p in (benchlib.RESULTS / "emulated")
                                       .glob("n*.json")),
                        help="validate: results of bench/emulated.py, each simulated again")
    parser.add_argument("--real", nargs="+", default=[str(benchlib.RESULTS / "stragglers.json")],
                        help="project: the 4-rank results of bench/stragglers.py that give "
                             "the rates")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(PROJECTED_RANKS),
                        help="project: the numbers of workers")
    parser.add_argument("--epochs", type=float, default=BUDGET_EPOCHS,
                        help="project: the sample budget, epochs of all workers together")
    parser.add_argument("--step-seconds", type=float,
                        help="project: the step time (default: measured here)")
    parser.add_argument("--jobs", type=int, default=2, help="simulations at once")
    parser.add_argument("--from-runs", metavar="RUNS",
                        help="project: report from the run folders of an earlier projection "
                             "(its --runs) instead of simulating")
    parser.add_argument("--runs", help="folder for the run folders "
                                       "(default runs/bench-simulation-<time>)")
    parser.add_argument("--out", default=str(benchlib.RESULTS), help="folder for the report")
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.runs = args.runs or f"runs/bench-simulation-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv=None):
    args = parse_args(argv)
    validate(args) if args.action == "validate" else project(args)


if __name__ == "__main__":
    main()
