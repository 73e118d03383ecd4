"""The simulator against the real straggler benchmark, then beyond what this machine runs.

    python bench/simulation.py validate [--real bench/results/stragglers.json ...] [--jobs 2]
    python bench/simulation.py project [--ranks 16 64 256 1024] [--jobs 2]

validate: every run of the real benchmark's results (bench/stragglers.py) of
the policies in COMPARED and SUBJECTS is run again in the simulator
(aau_mpi.simulate):
the same job, partition, straggler model, seed and learning rate, N virtual
workers for N ranks, and as the step time the real runs' own measurement
(the median over that result's runs of one step's compute, the straggler's
sleep left out). For each cell (partition, setting) it compares the
time-to-accuracy ratios aau/dpsgd, aau/async and aau/allreduce (and
aau_scaled's), real against simulated, at the cell's common accuracy: the
target, or below it the highest multiple of 0.05 that every finished
compared run of the cell reached (on strongly non-IID shards some policies
stay far below 0.9 in 20 s). Writes simulation_validation.json and .md.

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

import numpy as np

import benchlib
import stragglers
from benchlib import cell, median

COMPARED = ("aau", "dpsgd", "async", "allreduce")
BASELINES = ("dpsgd", "async", "allreduce")
# Compared with the baselines too where the real result has it: aau with the
# rate-scaled step (the default before the MNIST-1D benchmark).
SUBJECTS = ("aau", "aau_scaled")
AGREEMENT = 0.25          # the simulator's ratio within 25 % of the real one
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
        Simulator(config, task["ranks"], step_seconds=task["step_seconds"]).run()
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

def validation_tasks(result, runs_dir):
    plan = {**result["plan"], "runs_dir": str(runs_dir)}
    step = median(r["step_seconds"] for r in result["runs"] if r["variant"] != "ddp")
    tasks = []
    for run in result["runs"]:
        if run["variant"] not in COMPARED + SUBJECTS:
            continue
        overrides = stragglers.run_overrides(plan, f"sim{plan['ranks']}", run["partition"],
                                             run["setting"], run["seed"], run["variant"],
                                             run["lr"])
        tasks.append({"config": config_path(plan), "overrides": overrides,
                      "ranks": plan["ranks"], "step_seconds": step,
                      "key": {"partition": run["partition"], "setting": run["setting"],
                              "seed": run["seed"], "variant": run["variant"]}})
    return step, tasks


def common_level(runs, target):
    """The target, or the highest multiple of LEVEL_STEP that every finished run
    reached (a run that diverged reaches nothing and counts as never reaching it)."""
    reached = min(max(point[2] for point in run["curve"]) for run in runs
                  if not run.get("failed"))
    return min(target, math.floor(reached / LEVEL_STEP + 1e-9) * LEVEL_STEP)


def cell_times(runs, level):
    """{policy: median over seeds of the time to `level`} (inf: a seed never reached it)."""
    times = {}
    for variant in {r["variant"] for r in runs}:
        mine = [stragglers.time_to(r["curve"], level) for r in runs if r["variant"] == variant]
        times[variant] = float(np.median([math.inf if t is None else t for t in mine]))
    return times


def compare(real_result, simulated):
    """One row per (cell, baseline): aau's time ratio, real and simulated, and their agreement."""
    ranks = real_result["plan"]["ranks"]
    real = [r for r in real_result["runs"] if r["variant"] in COMPARED + SUBJECTS]
    rows = []
    cells = sorted({(r["partition"], r["setting"]) for r in real},
                   key=lambda c: (real_result["plan"]["partitions"].index(c[0]),
                                  real_result["plan"]["settings"].index(c[1])))
    for part, setting in cells:
        mine = [r for r in real if (r["partition"], r["setting"]) == (part, setting)]
        sims = [r for r in simulated if (r["partition"], r["setting"]) == (part, setting)]
        level = common_level(mine, real_result["target"])
        real_times, sim_times = cell_times(mine, level), cell_times(sims, level)
        for subject, baseline in itertools.product(SUBJECTS, BASELINES):
            if subject not in real_times or baseline not in real_times:
                continue
            real_ratio = real_times[subject] / real_times[baseline]
            sim_ratio = sim_times[subject] / sim_times[baseline]
            error = sim_ratio / real_ratio - 1 if math.isfinite(sim_ratio * real_ratio) else None
            rows.append({"ranks": ranks, "partition": part, "setting": setting,
                         "level": level, "subject": subject, "baseline": baseline,
                         "real_seconds": [real_times[subject], real_times[baseline]],
                         "simulated_seconds": [sim_times[subject], sim_times[baseline]],
                         "real_ratio": real_ratio, "simulated_ratio": sim_ratio,
                         "error": error,
                         "agrees": error is not None and abs(error) <= AGREEMENT})
    return rows


VALIDATION_HEADERS = ["ranks", "partition", "setting", "accuracy", "ratio", "real (s)",
                      "real ratio", "simulated (s)", "simulated ratio", "sim / real - 1",
                      "within 25 %"]


def validation_cells(row):
    real, sim = row["real_seconds"], row["simulated_seconds"]
    return [row["ranks"], row["partition"], row["setting"], f"{row['level']:.2f}",
            f"{row['subject']}/{row['baseline']}", f"{cell(real[0], '.1f')} / {cell(real[1], '.1f')}",
            cell(row["real_ratio"], ".2f"), f"{cell(sim[0], '.1f')} / {cell(sim[1], '.1f')}",
            cell(row["simulated_ratio"], ".2f"), cell(row["error"], "+.0%"),
            "yes" if row["agrees"] else "**no**"]


def validate(args):
    runs_dir = Path(args.runs).resolve()
    results, tasks, steps = [], [], {}
    for path in args.real:
        result = json.loads(Path(path).read_text())
        step, mine = validation_tasks(result, runs_dir)
        results.append((path, result))
        steps[str(path)] = step
        tasks += mine
    simulated = run_all(tasks, args.jobs)
    rows = []
    for (path, result), step in zip(results, steps.values()):
        ranks = result["plan"]["ranks"]
        rows += compare(result, [r for r in simulated if r["ranks"] == ranks])
    agreed = sum(r["agrees"] for r in rows)
    record = {"benchmark": "simulation_validation", "date": benchlib.today(),
              "machine": benchlib.machine(), "real": [str(p) for p in args.real],
              "step_seconds": steps, "agreement": AGREEMENT,
              "agreed": agreed, "compared": len(rows), "rows": rows, "simulated": simulated}
    out = Path(args.out)
    json_path = benchlib.write_json(out / "simulation_validation.json", record)
    table = benchlib.markdown_table(VALIDATION_HEADERS, [validation_cells(r) for r in rows])
    (out / "simulation_validation.md").write_text(
        f"# The simulator against the real benchmark ({record['date']})\n\n"
        f"Real: {', '.join(record['real'])}; step seconds {json.dumps(steps)}. Medians over "
        f"seeds of the time (training s, virtual s) to the cell's common accuracy. "
        f"{agreed} of {len(rows)} ratios within {AGREEMENT:.0%}.\n\n{table}")
    print()
    print(benchlib.text_table(VALIDATION_HEADERS, [validation_cells(r) for r in rows]))
    print(f"{agreed} of {len(rows)} within {AGREEMENT:.0%}; wrote {json_path}")


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
                          "ranks": ranks, "step_seconds": step,
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
    parser.add_argument("--real", nargs="+", default=[str(benchlib.RESULTS / "stragglers.json")],
                        help="real results of bench/stragglers.py (validate: each is "
                             "simulated; project: the first gives the rates)")
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
