"""The straggler benchmark: every policy, and plain DDP, on one problem under stragglers.

    python bench/stragglers.py [--quick] [--seeds 0 1 2] [--ranks 4] [key=value ...]

Runs, then merges, two jobs on the same problem (bench/stragglers.yaml, or
--config), seeds, topology and ranks:

1. `mpiexec -n RANKS python bench/stragglers.py --worker PLAN`: every run
   inside one job (a rank's start-up costs more than a run here). First the
   learning-rate grid for each policy on the tuning setting (--tune-setting,
   first seed): a policy's best rate is the one that reaches the target
   accuracy in the fewest epochs (ties: higher final accuracy). Then every
   setting x seed x policy at its best rate; after each run rank 0 evaluates
   the final averaged model (model.h5) on each rank's training shard.
2. `torchrun --nproc_per_node RANKS bench/ddp_reference.py PLAN`: plain
   DistributedDataParallel (gloo) on the same model, data, shards, budget and
   straggler sleeps, at allreduce's best rate (it is the same algorithm).

Writes into --out: stragglers.json (plan, grid, every run, medians, the
issue's targets against the measurements), stragglers.md (the tables) and
stragglers_accuracy.png (accuracy against training time, one panel per
straggler setting). The run folders stay under --runs.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import benchlib
from benchlib import cell, median

DEFAULT_CONFIG = benchlib.BENCH / "stragglers.yaml"

# Straggler settings (spec section 5). Pareto: 10 % of a rank's steps get an
# extra delay of 0.02 s x Pareto(1.5) (mean 0.04 s, tens of LeNet steps here,
# with a heavy tail); shifting: a new 4x slow rank every half second.
SETTINGS = {
    "none": {"name": "none"},
    "fixed4": {"name": "fixed", "ranks": [1], "slowdown": 4.0},
    "fixed10": {"name": "fixed", "ranks": [1], "slowdown": 10.0},
    "pareto": {"name": "random", "distribution": "pareto", "probability": 0.1,
               "scale": 0.02, "shape": 1.5},
    "shifting": {"name": "shifting", "count": 1, "slowdown": 4.0, "period": 0.5},
}
VARIANTS = ("allreduce", "dpsgd", "async", "fixed_k", "aau", "aau_noscale")
DEFAULT_LRS = (0.05, 0.1, 0.2)
QUICK_OVERRIDES = ("budget.epochs=3", "eval.every_epochs=1")
TOLERANCE = 0.01  # "within 1 point" of accuracy


def policy_section(variant, tau, gamma):
    """The config's policy section for a benchmark variant."""
    if variant == "fixed_k":
        return {"name": "fixed_k", "k": 1}
    if variant in ("aau", "aau_noscale"):
        return {"name": "aau", "tau": tau, "gamma": gamma, "rate_scaled": variant == "aau"}
    return {"name": variant}


def straggler_section(setting, seed):
    section = dict(SETTINGS[setting])
    if section["name"] in ("random", "shifting"):
        section["seed"] = seed  # a different draw of delays / slow sets per seed
    return section


def run_overrides(plan, phase, setting, seed, variant, lr):
    name = f"{phase}-{setting}-{variant}-seed{seed}-lr{lr:g}"
    return [*plan["overrides"], f"name={name}", f"output.dir={plan['runs_dir']}",
            f"seed={seed}", f"optim.lr={lr}",
            f"policy={json.dumps(policy_section(variant, plan['tau'], plan['gamma']))}",
            f"stragglers={json.dumps(straggler_section(setting, seed))}"]


def tuning_key(record):
    """Fewest epochs to the target first, then the higher final accuracy."""
    epochs = record["epochs_to_target"]
    return (math.inf if epochs is None else epochs, -record["accuracy"])


def best_rates(tuning):
    best = {}
    for record in sorted(tuning, key=tuning_key):
        best.setdefault(record["variant"], record["lr"])
    return best


# ------------------------------------------------------------------ worker

def worker(plan_path):
    """One rank of the MPI job: train every run of the plan."""
    from aau_mpi.checkpoint import load_model
    from aau_mpi.world import init

    plan = json.loads(Path(plan_path).read_text())
    world = init(device="cpu")

    def train(phase, setting, seed, variant, lr):
        overrides = run_overrides(plan, phase, setting, seed, variant, lr)
        config = benchlib.train_run(world, plan["config"], overrides)
        if world.rank != 0:
            return None
        record = {"phase": phase, "setting": setting, "seed": seed, "variant": variant,
                  "lr": lr, **benchlib.read_run(config)}
        model = load_model(benchlib.run_folder(config) / "model.h5")
        record["shard_accuracy"] = benchlib.shard_accuracy(config, model, world.size)
        print(f"{phase:5} {setting:9} seed {seed} {variant:11} lr {lr:<6g} "
              f"accuracy {record['accuracy']:.4f} in {record['seconds']:.2f} s, "
              f"target at {cell(record['time_to_target'], '.2f')} s", flush=True)
        return record

    tuning = [train("tune", plan["tune_setting"], plan["seeds"][0], variant, lr)
              for variant in plan["variants"] for lr in plan["lrs"]]
    best = world.comm.bcast(best_rates(tuning) if world.rank == 0 else None, root=0)
    # Variants interleaved within each seed, so drifting load on the machine
    # touches every policy alike.
    runs = [train("run", setting, seed, variant, best[variant])
            for setting in plan["settings"] for seed in plan["seeds"]
            for variant in plan["variants"]]
    if world.rank == 0:
        benchlib.write_json(Path(plan["runs_dir"]) / "policies.json",
                            {"tuning": tuning, "best_lr": best, "runs": runs})


# ------------------------------------------------------------------ report

def accuracy_at(curve, seconds):
    """Accuracy of the last evaluation at or before `seconds` of training (None before the first)."""
    passed = [point[2] for point in curve if point[0] <= seconds]
    return passed[-1] if passed else None


def slow_ranks(setting):
    section = SETTINGS[setting]
    return section["ranks"] if section["name"] == "fixed" else []


def shard_gap(record, slow):
    """Mean accuracy on the slow ranks' shards minus that on the others' (None without a slow set)."""
    shards = record["shard_accuracy"]
    others = [a for rank, a in enumerate(shards) if rank not in slow]
    if not slow or not others:
        return None
    return float(np.mean([shards[r] for r in slow]) - np.mean(others))


def summarise(runs, settings, variants):
    """Medians over seeds, one row per (setting, variant) that has runs."""
    rows = []
    for setting in settings:
        in_setting = [r for r in runs if r["setting"] == setting]
        if not in_setting:
            continue
        # Accuracy at a fixed time: when the quickest run of this setting ended.
        fixed_time = min(r["seconds"] for r in in_setting)
        for variant in variants:
            mine = [r for r in in_setting if r["variant"] == variant]
            if not mine:
                continue
            to_target = [math.inf if r["time_to_target"] is None else r["time_to_target"]
                         for r in mine]
            iterations = [r["iterations"] for r in mine]
            rows.append({
                "setting": setting, "variant": variant, "seeds": len(mine), "lr": mine[0]["lr"],
                "time_to_target": float(np.median(to_target)),
                "fixed_time": fixed_time,
                "accuracy_at_fixed_time": median(accuracy_at(r["curve"], fixed_time)
                                                 for r in mine),
                "accuracy": median(r["accuracy"] for r in mine),
                "loss": median(r["loss"] for r in mine),
                "samples_per_second": median(r["samples_per_second"] for r in mine),
                "iterations": [median(min(i) for i in iterations),
                               median(float(np.median(i)) for i in iterations),
                               median(max(i) for i in iterations)],
                "neighbours": median(median(r["neighbours"]) for r in mine),
                "wait_share": median(median(r["wait_share"]) for r in mine),
                "slow_shard_gap": median(shard_gap(r, slow_ranks(setting)) for r in mine),
                "shard_spread": median(max(r["shard_accuracy"]) - min(r["shard_accuracy"])
                                       for r in mine),
                "step_seconds": median(r["step_seconds"] for r in mine),
            })
    return rows


def predicted_rates(graph, slow, slowdown, tau):
    """Iterations per unit step time of each rank under aau's rule 2 (first-order model).

    A slow rank runs at 1/slowdown. A rank may run at most tau iterations per
    fresh deposit of each live neighbour, so its rate is min(1, tau x its
    slowest neighbour's rate); iterate to the fixed point.
    """
    rates = [1.0 / slowdown if rank in slow else 1.0 for rank in range(graph.n)]
    for _ in range(graph.n):
        rates = [rates[i] if i in slow else
                 min([1.0] + [tau * rates[j] for j in graph.in_neighbours(i)])
                 for i in range(graph.n)]
    return rates


def throughput_checks(rows, plan):
    """aau's samples/s over dpsgd's in each fixed-straggler setting: the model's and measured.

    Synchronous dpsgd runs every rank at the straggler's pace (N / slowdown).
    """
    from aau_mpi.config import load_config
    from aau_mpi.topology import load_topology

    config = load_config(plan["config"], plan["overrides"])
    topology = config.topology
    graph = load_topology(Path(topology.file) if topology.file else
                          {"generator": topology.name, "params": topology.params}, plan["ranks"])
    by = {(r["setting"], r["variant"]): r for r in rows}
    checks = []
    for setting in plan["settings"]:
        section = SETTINGS[setting]
        aau, dpsgd = by.get((setting, "aau")), by.get((setting, "dpsgd"))
        if section["name"] != "fixed" or not aau or not dpsgd:
            continue
        rates = predicted_rates(graph, section["ranks"], section["slowdown"], plan["tau"])
        checks.append({"setting": setting, "slowdown": section["slowdown"], "tau": plan["tau"],
                       "predicted": sum(rates) / (graph.n / section["slowdown"]),
                       "measured": aau["samples_per_second"] / dpsgd["samples_per_second"]})
    return checks


def target_checks(rows):
    """The issue's targets on 4 ranks, each with the measured value (settings that ran only)."""
    by = {(r["setting"], r["variant"]): r for r in rows}
    checks = []

    def check(name, measured, met):
        checks.append({"target": name, "measured": measured, "met": bool(met)})

    aau = by.get(("fixed4", "aau"))
    if aau:
        for other in ("dpsgd", "allreduce", "ddp"):
            if (base := by.get(("fixed4", other))) and math.isfinite(base["time_to_target"]):
                ratio = aau["time_to_target"] / base["time_to_target"]
                check(f"fixed4: aau time to target <= 0.5 x {other}'s", ratio, ratio <= 0.5)
        if dpsgd := by.get(("fixed4", "dpsgd")):
            delta = aau["accuracy"] - dpsgd["accuracy"]
            check("fixed4: aau final accuracy within 1 point of dpsgd's (aau - dpsgd)",
                  delta, abs(delta) <= TOLERANCE or delta > 0)
        if asyn := by.get(("fixed4", "async")):
            check("fixed4: aau test loss <= async's (aau - async)",
                  aau["loss"] - asyn["loss"], aau["loss"] <= asyn["loss"])
        if aau["slow_shard_gap"] is not None:
            check("fixed4: aau slow rank's shard accuracy within 1 point of the others' "
                  "(slow - others)", aau["slow_shard_gap"],
                  aau["slow_shard_gap"] >= -TOLERANCE)
    aau, dpsgd = by.get(("none", "aau")), by.get(("none", "dpsgd"))
    if aau and dpsgd:
        ratio = aau["samples_per_second"] / dpsgd["samples_per_second"]
        check("none: aau samples/s >= 0.9 x dpsgd's", ratio, ratio >= 0.9)
    return checks


def iterations_cell(row):
    low, mid, high = row["iterations"]
    return "-" if low is None else f"{low:g}/{mid:g}/{high:g}"


ROW_HEADERS = ["setting", "policy", "lr", "seeds", "time to target (s)", "acc @ fixed time",
               "final acc", "final loss", "samples/s", "iterations min/med/max",
               "neighbours", "wait share", "slow shard - others", "shard spread"]


def row_cells(row):
    return [row["setting"], row["variant"], f"{row['lr']:g}", row["seeds"],
            cell(row["time_to_target"], ".2f"),
            f"{cell(row['accuracy_at_fixed_time'], '.4f')} ({row['fixed_time']:.1f} s)",
            cell(row["accuracy"], ".4f"), cell(row["loss"], ".4f"),
            cell(row["samples_per_second"], ".0f"), iterations_cell(row),
            cell(row["neighbours"], ".2f"), cell(row["wait_share"], ".3f"),
            cell(row["slow_shard_gap"], "+.4f"), cell(row["shard_spread"], ".4f")]


def markdown(result):
    plan = result["plan"]
    lines = [f"# Straggler benchmark ({result['date']})", "",
             f"Machine: {result['machine']}; {result['mpi']}.  ",
             f"Problem: `{plan['config']}` with {' '.join(plan['overrides']) or 'no overrides'}; "
             f"{plan['ranks']} ranks, seeds {plan['seeds']}; aau tau={plan['tau']}, "
             f"gamma={plan['gamma']}. Medians over seeds; times are training seconds "
             f"(evaluation excluded); target accuracy {result['target']}.", "",
             "## Results", "",
             benchlib.markdown_table(ROW_HEADERS, [row_cells(r) for r in result["rows"]]),
             f"## Learning-rate grid (setting {plan['tune_setting']}, seed {plan['seeds'][0]})",
             "",
             benchlib.markdown_table(
                 ["policy", "lr", "epochs to target", "final acc", "seconds", "chosen"],
                 [[t["variant"], f"{t['lr']:g}", cell(t["epochs_to_target"], ".1f"),
                   cell(t["accuracy"], ".4f"), cell(t["seconds"], ".2f"),
                   "yes" if result["best_lr"].get(t["variant"]) == t["lr"] else ""]
                  for t in result["tuning"]])]
    if result["throughput"]:
        lines += ["## Throughput: aau / dpsgd samples per second, model against measurement", "",
                  benchlib.markdown_table(
                      ["setting", "slowdown", "tau", "predicted", "measured"],
                      [[c["setting"], f"{c['slowdown']:g}", c["tau"], f"{c['predicted']:.2f}",
                        f"{c['measured']:.2f}"] for c in result["throughput"]])]
    if result["targets"]:
        lines += ["## Targets", "",
                  benchlib.markdown_table(["target", "measured", "met"],
                                          [[c["target"], f"{c['measured']:+.3f}",
                                            "yes" if c["met"] else "**no**"]
                                           for c in result["targets"]])]
    return "\n".join(lines)


def plot(result, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = [s for s in result["plan"]["settings"]
                if any(r["setting"] == s for r in result["runs"])]
    variants = result["plan"]["variants"] + ["ddp"]
    figure = Figure(figsize=(4.2 * len(settings), 3.8))
    panels = figure.subplots(1, len(settings), squeeze=False, sharey=True)[0]
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    for setting, axes in zip(settings, panels):
        for variant in variants:
            runs = [r for r in result["runs"]
                    if r["setting"] == setting and r["variant"] == variant]
            for n, run in enumerate(runs):  # every seed, one colour per policy
                axes.plot([p[0] for p in run["curve"]], [p[2] for p in run["curve"]],
                          color=colours[variant], alpha=0.8, linewidth=1,
                          label=variant if n == 0 else None)
        axes.axhline(result["target"], color="grey", linestyle="--", linewidth=0.8)
        axes.set(title=setting, xlabel="training time (s)")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("test accuracy (averaged model)")
    panels[-1].legend(fontsize="small")
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def report(plan, policies, ddp, out):
    runs = policies["runs"] + ddp["runs"]
    variants = plan["variants"] + (["ddp"] if ddp["runs"] else [])
    rows = summarise(runs, plan["settings"], variants)
    result = {"benchmark": "stragglers", "date": benchlib.today(), "machine": benchlib.machine(),
              "mpi": benchlib.mpi_library(), "plan": plan,
              "target": next((r["target"] for r in runs), None),
              "tuning": policies["tuning"], "best_lr": policies["best_lr"],
              "rows": rows, "throughput": throughput_checks(rows, plan),
              "targets": target_checks(rows), "runs": runs}
    out = Path(out)
    paths = [benchlib.write_json(out / "stragglers.json", result), out / "stragglers.md",
             plot(result, out / "stragglers_accuracy.png")]
    paths[1].write_text(markdown(result))
    print()
    print(benchlib.text_table(ROW_HEADERS, [row_cells(r) for r in rows]))
    for c in result["targets"]:
        print(f"{'met ' if c['met'] else 'MISS'}  {c['target']}: {c['measured']:+.3f}")
    print("wrote " + ", ".join(map(str, paths)))


# ------------------------------------------------------------------ driver

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="PLAN", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="development/test size: 1 seed, settings none and fixed4, 2 rates, "
                             f"{' '.join(QUICK_OVERRIDES)}; report into the runs folder")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the problem (a job file)")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    parser.add_argument("--policies", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--lrs", type=float, nargs="+", help="the learning-rate grid")
    parser.add_argument("--tune-setting", choices=list(SETTINGS), default="none",
                        help="the setting on which each policy's rate is chosen")
    parser.add_argument("--tau", type=int, default=4, help="aau's staleness bound")
    parser.add_argument("--gamma", type=float, default=0.0, help="aau's extra-wait budget")
    parser.add_argument("--no-ddp", action="store_true", help="skip the DDP reference")
    parser.add_argument("--runs", help="folder for the run folders (default runs/bench-stragglers-<time>)")
    parser.add_argument("--out", help="folder for the report (default bench/results; "
                                      "with --quick, <runs>/report)")
    parser.add_argument("--timeout", type=float, help="seconds each launched job may take")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="applied to every run, e.g. budget.epochs=40")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    runs_dir = Path(args.runs or f"runs/bench-stragglers-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out or (runs_dir / "report" if args.quick else benchlib.RESULTS))
    plan = {"config": args.config, "ranks": args.ranks,
            "overrides": [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides],
            "settings": args.settings or (["none", "fixed4"] if args.quick else list(SETTINGS)),
            "variants": args.policies,
            "seeds": args.seeds or ([0] if args.quick else [0, 1, 2]),
            "lrs": args.lrs or ([0.05, 0.1] if args.quick else list(DEFAULT_LRS)),
            "tune_setting": args.tune_setting, "tau": args.tau, "gamma": args.gamma,
            "runs_dir": str(runs_dir.resolve())}
    if "allreduce" not in plan["variants"] and not args.no_ddp:
        raise SystemExit("error: DDP takes allreduce's tuned rate: keep allreduce in "
                         "--policies, or pass --no-ddp")
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan_path = benchlib.write_json(runs_dir / "plan.json", plan)
    benchlib.launch([benchlib.MPIEXEC, "-n", args.ranks, sys.executable, __file__,
                     "--worker", plan_path], args.timeout)
    policies = json.loads((runs_dir / "policies.json").read_text())
    ddp = {"runs": []}
    if not args.no_ddp:
        benchlib.launch([benchlib.TORCHRUN, "--standalone", "--nproc_per_node", args.ranks,
                         benchlib.BENCH / "ddp_reference.py", plan_path,
                         "--lr", policies["best_lr"]["allreduce"]], args.timeout)
        ddp = json.loads((runs_dir / "ddp.json").read_text())
    report(plan, policies, ddp, out)


if __name__ == "__main__":
    main()
