"""The straggler benchmark: every policy, and plain DDP, on one problem under stragglers.

    python bench/stragglers.py [--quick] [--partitions ...] [--settings ...] [--seeds 0 1 2]
                               [--ranks 4] [--rates-from RESULT.json] [key=value ...]

Runs, then merges, two jobs on the same problem (bench/stragglers.yaml, or
--config), seeds, topology and ranks:

1. `mpiexec -n RANKS python bench/stragglers.py --worker PLAN`: every run
   inside one job (a rank's start-up costs more than a run here). For each
   partition of the data over the ranks: first the learning-rate grid for
   each policy on the tuning setting (--tune-setting, first seed): a
   policy's best rate is the one that reaches the target accuracy in the
   fewest epochs (ties: higher final accuracy); --rates-from takes them from
   an earlier result instead. Then every setting x seed x policy at its best
   rate; after each run rank 0 judges the final averaged model (model.h5)
   from each rank's side (its training shard, the test set in its class mix).
2. `torchrun --nproc_per_node RANKS bench/ddp_reference.py PLAN`: plain
   DistributedDataParallel (gloo) on the same model, data, shards, budget and
   straggler sleeps, at allreduce's best rate (it is the same algorithm), on
   the straggler-free setting of each partition.

Writes into --out: stragglers.json (plan, grid, every run, medians, the
issue's targets against the measurements), stragglers.md (the tables) and
stragglers_accuracy.png (accuracy against training time, one panel per
straggler setting). The run folders stay under --runs.
"""

import argparse
import itertools
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
# How the training set is split over the ranks (data.partition).
PARTITIONS = {
    "dirichlet": {"name": "dirichlet", "alpha": 0.3},
    # Sorted by label, cut into 2 x ranks shards, two dealt to each rank.
    "two_classes": {"name": "shards", "classes_per_part": 2},
}
DEFAULT_SETTINGS = ("none", "fixed4", "pareto")
# aau_scaled: aau with the rate-scaled step, its default before this benchmark.
VARIANTS = ("allreduce", "dpsgd", "async", "fixed_k", "aau", "aau_scaled")
DEFAULT_VARIANTS = ("allreduce", "dpsgd", "async", "fixed_k", "aau")
DEFAULT_LRS = (0.05, 0.1, 0.2)
DDP_SETTING = "none"  # DDP is the outside reference for allreduce, without stragglers
QUICK_OVERRIDES = ("budget.seconds=1", "eval.every_seconds=0.25")
TOLERANCE = 0.01  # "within 1 point" of accuracy


def policy_section(variant, tau, gamma):
    """The config's policy section for a benchmark variant."""
    if variant == "fixed_k":
        return {"name": "fixed_k", "k": 1}
    if variant in ("aau", "aau_scaled"):
        return {"name": "aau", "tau": tau, "gamma": gamma, "rate_scaled": variant == "aau_scaled"}
    return {"name": variant}


def straggler_section(setting, seed):
    section = dict(SETTINGS[setting])
    if section["name"] in ("random", "shifting"):
        section["seed"] = seed  # a different draw of delays / slow sets per seed
    return section


def run_overrides(plan, phase, part, setting, seed, variant, lr):
    name = f"{phase}-{part}-{setting}-{variant}-seed{seed}-lr{lr:g}"
    return [*plan["overrides"], f"name={name}", f"output.dir={plan['runs_dir']}",
            f"seed={seed}", f"optim.lr={lr}", f"data.partition={json.dumps(PARTITIONS[part])}",
            f"policy={json.dumps(policy_section(variant, plan['tau'], plan['gamma']))}",
            f"stragglers={json.dumps(straggler_section(setting, seed))}"]


def tuning_key(record):
    """Fewest epochs to the target first, then the higher final accuracy."""
    epochs = record["epochs_to_target"]
    return (math.inf if epochs is None else epochs, -(record["accuracy"] or 0.0))


def best_rates(tuning):
    best = {}
    for record in sorted(tuning, key=tuning_key):
        best.setdefault(record["variant"], record["lr"])
    return best


# ------------------------------------------------------------------ worker

def worker(plan_path):
    """One rank of the MPI job: train every run of the plan."""
    from aau_mpi.checkpoint import load_model
    from aau_mpi.training.config_loading import load_config
    from aau_mpi.decentralized.device import init

    plan = json.loads(Path(plan_path).read_text())
    world = init(device="cpu")

    def train(phase, part, setting, seed, variant, lr):
        overrides = run_overrides(plan, phase, part, setting, seed, variant, lr)
        config = load_config(plan["config"], overrides)
        folder = benchlib.run_folder(config)
        # A relaunched job keeps what the last one finished and does not retry
        # the run that ended it (see main).
        state = world.comm.bcast(benchlib.run_state(folder) if world.rank == 0 else None, root=0)
        if state == "new":
            benchlib.train_run(world, plan["config"], overrides)
        if world.rank != 0:
            return None
        record = {"phase": phase, "partition": part, "setting": setting, "seed": seed,
                  "variant": variant, "lr": lr}
        if state == "failed":
            record.update(benchlib.read_failed_run(config))
        else:
            record.update(benchlib.read_run(config))
            model = load_model(folder / "model.h5")
            record.update(benchlib.rank_accuracies(config, model, world.size))
        print(f"{phase:5} {part:11} {setting:9} seed {seed} {variant:11} lr {lr:<6g} "
              f"accuracy {cell(record['accuracy'], '.4f')} in {record['seconds']:.2f} s, "
              f"target at {cell(record['time_to_target'], '.2f')} s"
              + (" (FAILED: ended the job)" if state == "failed" else ""), flush=True)
        return record

    tuning, best, runs = [], {}, []
    for part in plan["partitions"]:
        if part in plan["best_lr"]:
            best[part] = plan["best_lr"][part]
        else:
            grid = [train("tune", part, plan["tune_setting"], plan["seeds"][0], variant, lr)
                    for variant in plan["variants"] for lr in plan["lrs"]]
            best[part] = world.comm.bcast(best_rates(grid) if world.rank == 0 else None, root=0)
            tuning += grid
        # Variants interleaved within each seed, so drifting load on the machine
        # touches every policy alike.
        runs += [train("run", part, setting, seed, variant, best[part][variant])
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


def time_to(curve, accuracy):
    """Training seconds of the first evaluation at or above `accuracy` (None if none is)."""
    return next((point[0] for point in curve if point[2] >= accuracy), None)


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


def slow_class_accuracy(record, slow):
    """Test accuracy in the slow ranks' class mix (None without a slow set)."""
    return float(np.mean([record["class_accuracy"][r] for r in slow])) if slow else None


def spread(values):
    """(max - min) / median of the finite values: the seeds' run-to-run spread."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return (max(values) - min(values)) / float(np.median(values)) if len(values) > 1 else None


def summarise(runs, partitions, settings, variants):
    """Medians over seeds, one row per (partition, setting, variant) that has runs."""
    rows = []
    for part, setting in itertools.product(partitions, settings):
        in_cell = [r for r in runs if r["partition"] == part and r["setting"] == setting]
        if not in_cell:
            continue
        # Accuracy at a fixed time: when the quickest run of this cell ended.
        fixed_time = min((r["seconds"] for r in in_cell if not r.get("failed")), default=0.0)
        slow = slow_ranks(setting)
        for variant in variants:
            mine = [r for r in in_cell if r["variant"] == variant]
            if not mine:
                continue
            to_target = [math.inf if r["time_to_target"] is None else r["time_to_target"]
                         for r in mine]
            finished = [r for r in mine if not r.get("failed")]
            iterations = [r["iterations"] for r in finished]
            rows.append({
                "partition": part, "setting": setting, "variant": variant,
                "seeds": len(mine), "lr": mine[0]["lr"],
                "time_to_target": float(np.median(to_target)),
                "time_to_target_range": [min(to_target), max(to_target)],
                "time_to_target_spread": spread(to_target),
                "fixed_time": fixed_time,
                "accuracy_at_fixed_time": median(accuracy_at(r["curve"], fixed_time)
                                                 for r in mine),
                "accuracy": median(r["accuracy"] for r in mine),
                "loss": median(r["loss"] for r in mine),
                "samples_per_second": median(r["samples_per_second"] for r in finished),
                "samples_per_second_spread": spread([r["samples_per_second"] for r in finished]),
                "iterations": [median(min(i) for i in iterations),
                               median(float(np.median(i)) for i in iterations),
                               median(max(i) for i in iterations)],
                "neighbours": median(median(r["neighbours"]) for r in finished),
                "wait_share": median(median(r["wait_share"]) for r in finished),
                "slow_class_accuracy": median(slow_class_accuracy(r, slow) for r in finished),
                "slow_shard_gap": median(shard_gap(r, slow) for r in finished),
                "shard_spread": median(max(r["shard_accuracy"]) - min(r["shard_accuracy"])
                                       for r in finished),
                "failed": len(mine) - len(finished),
                "consensus_distance": median(r["consensus_distance"] for r in mine),
                "step_seconds": median(r["step_seconds"] for r in mine),
            })
    return rows


def noise(rows):
    """The seeds' spread, median over cells: of samples/s (timing noise alone: the
    seed changes no step's cost) and of time to target (timing plus the seed's
    data order and initial weights)."""
    return {"samples_per_second": median(r["samples_per_second_spread"] for r in rows),
            "time_to_target": median(r["time_to_target_spread"] for r in rows)}


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
    """aau's samples/s over dpsgd's in each fixed-straggler cell: the model's and measured.

    Synchronous dpsgd runs every rank at the straggler's pace (N / slowdown).
    """
    from aau_mpi.training.config_loading import load_config
    from aau_mpi.algorithms.topology import load_topology

    config = load_config(plan["config"], plan["overrides"])
    topology = config.topology
    graph = load_topology(Path(topology.file) if topology.file else
                          {"generator": topology.name, "params": topology.params}, plan["ranks"])
    by = {(r["partition"], r["setting"], r["variant"]): r for r in rows}
    checks = []
    for part, setting in itertools.product(plan["partitions"], plan["settings"]):
        section = SETTINGS[setting]
        aau, dpsgd = by.get((part, setting, "aau")), by.get((part, setting, "dpsgd"))
        if section["name"] != "fixed" or not aau or not dpsgd:
            continue
        rates = predicted_rates(graph, section["ranks"], section["slowdown"], plan["tau"])
        checks.append({"partition": part, "setting": setting, "slowdown": section["slowdown"],
                       "tau": plan["tau"],
                       "predicted": sum(rates) / (graph.n / section["slowdown"]),
                       "measured": aau["samples_per_second"] / dpsgd["samples_per_second"]})
    return checks


def verdict(aau, other, noise_share):
    """Does aau beat `other` in one cell? On time to target when either reached it
    (a difference within the measured run-to-run spread is a tie), else on final
    accuracy (within TOLERANCE is a tie)."""
    mine, theirs = aau["time_to_target"], other["time_to_target"]
    if math.isfinite(mine) or math.isfinite(theirs):
        ratio = mine / theirs if math.isfinite(theirs) else 0.0
        margin = 1 + (noise_share or 0.0)
        return ratio, "win" if ratio * margin < 1 else "loss" if ratio > margin else "tie"
    delta = aau["accuracy"] - other["accuracy"]
    return None, "win" if delta > TOLERANCE else "loss" if delta < -TOLERANCE else "tie"


def comparisons(rows, noise_share):
    """aau against every other policy in every cell: time-to-target ratio, final
    accuracy difference, the verdict."""
    by = {(r["partition"], r["setting"], r["variant"]): r for r in rows}
    found = []
    for (part, setting, variant), aau in by.items():
        if variant != "aau":
            continue
        for (p, s, other), base in by.items():
            if (p, s) != (part, setting) or other == "aau":
                continue
            ratio, outcome = verdict(aau, base, noise_share)
            found.append({"partition": part, "setting": setting, "baseline": other,
                          "time_ratio": ratio, "accuracy_delta": aau["accuracy"] - base["accuracy"],
                          "verdict": outcome})
    return found


def iterations_cell(row):
    low, mid, high = row["iterations"]
    return "-" if low is None else f"{low:g}/{mid:g}/{high:g}"


def target_cell(row):
    low, high = row["time_to_target_range"]
    if not math.isfinite(row["time_to_target"]):
        return "not reached" if math.isinf(low) else f"not reached ({low:.1f}-)"
    return f"{row['time_to_target']:.1f} ({low:.1f}-{cell(high, '.1f')})"


ROW_HEADERS = ["partition", "setting", "policy", "lr", "seeds", "time to target (s, range)",
               "acc @ fixed time", "final acc", "final loss", "samples/s",
               "iterations min/med/max", "neighbours", "wait share", "slow rank's classes",
               "slow shard - others", "consensus distance"]


def row_cells(row):
    seeds = f"{row['seeds']} ({row['failed']} failed)" if row["failed"] else row["seeds"]
    return [row["partition"], row["setting"], row["variant"], f"{row['lr']:g}", seeds,
            target_cell(row),
            f"{cell(row['accuracy_at_fixed_time'], '.4f')} ({row['fixed_time']:.1f} s)",
            cell(row["accuracy"], ".4f"), cell(row["loss"], ".4f"),
            cell(row["samples_per_second"], ".0f"), iterations_cell(row),
            cell(row["neighbours"], ".2f"), cell(row["wait_share"], ".3f"),
            cell(row["slow_class_accuracy"], ".4f"), cell(row["slow_shard_gap"], "+.4f"),
            cell(row["consensus_distance"], ".2e")]


def markdown(result):
    plan = result["plan"]
    partitions = ", ".join(f"{p} ({json.dumps(PARTITIONS[p])})" for p in plan["partitions"])
    lines = [f"# Straggler benchmark ({result['date']})", "",
             f"Machine: {result['machine']}; {result['mpi']}.  ",
             f"Problem: `{Path(plan['config']).name}` with "
             f"{' '.join(plan['overrides']) or 'no overrides'}; {plan['ranks']} ranks, "
             f"partitions {partitions}; seeds {plan['seeds']}; aau tau={plan['tau']}, "
             f"gamma={plan['gamma']}. Medians over seeds (range in brackets); times are "
             f"training seconds (evaluation excluded); target accuracy {result['target']}.  ",
             f"Run-to-run spread ((max - min) / median over seeds, median over cells): "
             f"samples/s {cell(result['noise']['samples_per_second'], '.1%')}, time to target "
             f"{cell(result['noise']['time_to_target'], '.1%')}.", "",
             "## Results", "",
             benchlib.markdown_table(ROW_HEADERS, [row_cells(r) for r in result["rows"]]),
             "## aau against each baseline", "",
             "Time ratio: aau's median time to target over the baseline's (0: only aau "
             "reached it); a difference within the run-to-run spread of time to target "
             "is a tie; where neither reached the target, final accuracy decides (within "
             f"{TOLERANCE} is a tie).", "",
             benchlib.markdown_table(
                 ["partition", "setting", "baseline", "time ratio", "final acc aau - baseline",
                  "verdict"],
                 [[c["partition"], c["setting"], c["baseline"], cell(c["time_ratio"], ".2f"),
                   f"{c['accuracy_delta']:+.4f}", c["verdict"]] for c in result["comparisons"]])]
    if result["tuning"]:
        lines += [f"## Learning-rate grid (setting {plan['tune_setting']}, seed {plan['seeds'][0]})",
                  "", benchlib.markdown_table(
                      ["partition", "policy", "lr", "epochs to target", "final acc", "seconds",
                       "chosen"],
                      [[t["partition"], t["variant"], f"{t['lr']:g}",
                        cell(t["epochs_to_target"], ".1f"), cell(t["accuracy"], ".4f"),
                        cell(t["seconds"], ".2f"),
                        "yes" if result["best_lr"][t["partition"]].get(t["variant"]) == t["lr"]
                        else ""] for t in result["tuning"]])]
    else:
        lines += [f"Learning rates from {plan['rates_from']}: {json.dumps(result['best_lr'])}", ""]
    if result["throughput"]:
        lines += ["## Throughput: aau / dpsgd samples per second, model against measurement", "",
                  benchlib.markdown_table(
                      ["partition", "setting", "slowdown", "tau", "predicted", "measured"],
                      [[c["partition"], c["setting"], f"{c['slowdown']:g}", c["tau"],
                        f"{c['predicted']:.2f}", f"{c['measured']:.2f}"]
                       for c in result["throughput"]])]
    return "\n".join(lines)


def plot(result, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plan = result["plan"]
    cells = sorted({(r["partition"], r["setting"]) for r in result["runs"]},
                   key=lambda c: (plan["partitions"].index(c[0]), plan["settings"].index(c[1])))
    partitions = [p for p in plan["partitions"] if any(c[0] == p for c in cells)]
    settings = [s for s in plan["settings"] if any(c[1] == s for c in cells)]
    variants = plan["variants"] + ["ddp"]
    figure = Figure(figsize=(4.2 * len(settings), 3.6 * len(partitions)), layout="constrained")
    panels = figure.subplots(len(partitions), len(settings), squeeze=False, sharey=True)
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    for (row, part), (col, setting) in itertools.product(enumerate(partitions),
                                                         enumerate(settings)):
        axes = panels[row][col]
        for variant in variants:
            runs = [r for r in result["runs"] if (r["partition"], r["setting"], r["variant"])
                    == (part, setting, variant)]
            for n, run in enumerate(runs):  # every seed, one colour per policy
                axes.plot([p[0] for p in run["curve"]], [p[2] for p in run["curve"]],
                          color=colours[variant], alpha=0.8, linewidth=1,
                          label=variant if n == 0 else None)
        axes.axhline(result["target"], color="grey", linestyle="--", linewidth=0.8)
        axes.set(title=f"{part}, {setting}")
        axes.grid(alpha=0.3)
        if col == 0:
            axes.set_ylabel("test accuracy (averaged model)")
        if row == len(partitions) - 1:
            axes.set_xlabel("training time (s)")
    labelled = {}  # every policy once, wherever it ran (DDP only without stragglers)
    for axes in panels.flat:
        for line in axes.get_lines():
            if not line.get_label().startswith("_"):
                labelled.setdefault(line.get_label(), line)
    figure.legend(list(labelled.values()), list(labelled), loc="outside right upper",
                  fontsize="small")
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def report(plan, policies, ddp, out):
    runs = policies["runs"] + ddp["runs"]
    variants = plan["variants"] + (["ddp"] if ddp["runs"] else [])
    rows = summarise(runs, plan["partitions"], plan["settings"], variants)
    spread_now = noise(rows)
    result = {"benchmark": "stragglers", "date": benchlib.today(), "machine": benchlib.machine(),
              "mpi": benchlib.mpi_library(), "plan": plan,
              "target": next((r["target"] for r in runs), None),
              "tuning": policies["tuning"], "best_lr": policies["best_lr"],
              "noise": spread_now, "rows": rows, "throughput": throughput_checks(rows, plan),
              "comparisons": comparisons(rows, spread_now["time_to_target"]), "runs": runs}
    out = Path(out)
    paths = [benchlib.write_json(out / "stragglers.json", result), out / "stragglers.md",
             plot(result, out / "stragglers_accuracy.png")]
    paths[1].write_text(markdown(result))
    print()
    print(benchlib.text_table(ROW_HEADERS, [row_cells(r) for r in rows]))
    print()
    for c in result["comparisons"]:
        print(f"aau vs {c['baseline']:10} {c['partition']:11} {c['setting']:9} "
              f"time ratio {cell(c['time_ratio'], '.2f'):>5}  "
              f"accuracy {c['accuracy_delta']:+.4f}  {c['verdict']}")
    print("wrote " + ", ".join(map(str, paths)))


# ------------------------------------------------------------------ driver

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="PLAN", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="development/test size: 1 seed, settings none and fixed4, 2 rates, "
                             f"{' '.join(QUICK_OVERRIDES)}; report into the runs folder")
    parser.add_argument("--partitions", nargs="+", choices=list(PARTITIONS),
                        default=list(PARTITIONS))
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the problem (a job file)")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    parser.add_argument("--policies", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--lrs", type=float, nargs="+", help="the learning-rate grid")
    parser.add_argument("--tune-setting", choices=list(SETTINGS), default="none",
                        help="the setting on which each policy's rate is chosen")
    parser.add_argument("--rates-from", metavar="RESULT",
                        help="take each partition's tuned rates from an earlier stragglers.json "
                             "instead of tuning (e.g. the 4-rank result for an 8-rank cell)")
    parser.add_argument("--merge", nargs="+", metavar="RESULT",
                        help="train nothing: one report of the runs of these stragglers.json "
                             "(same problem and ranks; e.g. a re-run of one policy and the rest)")
    parser.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW",
                        help="with --merge: relabel variants (e.g. aau=aau_scaled)")
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


def tuned_rates(args):
    """{partition: {policy: lr}} from --rates-from ({} without it); a gap is an error."""
    if not args.rates_from:
        return {}
    best = json.loads(Path(args.rates_from).read_text())["best_lr"]
    missing = [f"{part}/{variant}" for part in args.partitions for variant in args.policies
               if variant not in best.get(part, {})]
    if missing:
        raise SystemExit(f"error: {args.rates_from} has no tuned rate for {', '.join(missing)}: "
                         "leave those out, or tune (drop --rates-from)")
    return {part: best[part] for part in args.partitions}


def merge(paths, out, renames=()):
    """One report of several results' runs (a policy run on its own, and the others).
    `renames` ("old=new") relabel variants, e.g. after a default changed."""
    renamed = dict(rename.split("=", 1) for rename in renames)

    def relabel(record):
        return {**record, "variant": renamed.get(record["variant"], record["variant"])}

    results = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        result["plan"]["variants"] = [renamed.get(v, v) for v in result["plan"]["variants"]]
        result["runs"] = [relabel(r) for r in result["runs"]]
        result["tuning"] = [relabel(t) for t in result["tuning"]]
        result["best_lr"] = {part: {renamed.get(v, v): lr for v, lr in rates.items()}
                             for part, rates in result["best_lr"].items()}
        results.append(result)
    plan = dict(results[0]["plan"])
    for key in ("variants", "partitions", "settings"):
        plan[key] = list(dict.fromkeys(v for r in results for v in r["plan"][key]))
    if len({(r["plan"]["config"], r["plan"]["ranks"]) for r in results}) > 1:
        raise SystemExit("error: --merge takes results of one problem and number of ranks")
    best = {}
    for result in results:
        for part, rates in result["best_lr"].items():
            best.setdefault(part, {}).update(rates)
    runs = [run for r in results for run in r["runs"]]
    plan["merged"] = [str(path) for path in paths]
    plan["renamed"] = renamed
    report(plan, {"tuning": [t for r in results for t in r["tuning"]], "best_lr": best,
                  "runs": [run for run in runs if run["variant"] != "ddp"]},
           {"runs": [run for run in runs if run["variant"] == "ddp"]}, out)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.merge:
        return merge(args.merge, Path(args.out or benchlib.RESULTS), args.rename)
    runs_dir = Path(args.runs or f"runs/bench-stragglers-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out or (runs_dir / "report" if args.quick else benchlib.RESULTS))
    plan = {"config": args.config, "ranks": args.ranks, "partitions": args.partitions,
            "overrides": [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides],
            "settings": args.settings or (["none", "fixed4"] if args.quick
                                          else list(DEFAULT_SETTINGS)),
            "variants": args.policies,
            "seeds": args.seeds or ([0] if args.quick else [0, 1, 2]),
            "lrs": args.lrs or ([0.05, 0.1] if args.quick else list(DEFAULT_LRS)),
            "tune_setting": args.tune_setting, "tau": args.tau, "gamma": args.gamma,
            "rates_from": args.rates_from, "best_lr": tuned_rates(args),
            "runs_dir": str(runs_dir.resolve())}
    if "allreduce" not in plan["variants"] and not args.no_ddp:
        raise SystemExit("error: DDP takes allreduce's tuned rate: keep allreduce in "
                         "--policies, or pass --no-ddp")
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan_path = benchlib.write_json(runs_dir / "plan.json", plan)
    # A folder without a summary is a failed run here (this older benchmark
    # does not tell a stopped benchmark's unfinished run from one that ended it).
    benchlib.launch_until_done([benchlib.MPIEXEC, "-n", args.ranks, sys.executable, __file__,
                                "--worker", plan_path], runs_dir, args.timeout)
    policies = json.loads((runs_dir / "policies.json").read_text())
    ddp = {"runs": []}
    if not args.no_ddp and DDP_SETTING in plan["settings"]:
        benchlib.launch([benchlib.TORCHRUN, "--standalone", "--nproc_per_node", args.ranks,
                         benchlib.BENCH / "ddp_reference.py", plan_path], args.timeout)
        ddp = json.loads((runs_dir / "ddp.json").read_text())
    report(plan, policies, ddp, out)


if __name__ == "__main__":
    main()
