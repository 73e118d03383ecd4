"""Weak scaling in the simulator: 16 to 1024 workers on two hardware profiles.

    python bench/projection.py [--ranks 16 64 256 1024] [--seeds 0 1 2]
                               [--reduce-from 1024] [--reduced-seeds 1] [--reduced-settings ...]
                               [--tune-ranks 16 64 256] [--iterations 1000]
                               [--profiles accelerator ethernet]
                               [--settings none slow_tenth pareto] [--policies ...]
                               [--calibration F] [--jobs 2] [--quick] [--runs DIR] [--out DIR]

Weak scaling: every worker holds 2,000 training samples of MNIST-1D (the
data are generated for each N, so they grow with it) and the budget is
--iterations steps a worker (N x iterations x batch samples of all workers
together; the schedule's warm-up is a share of it). With a linear speed-up
the samples to the target do not grow with N, and the virtual time to it
stays flat. The job is bench/projection.yaml (the emulated benchmark's
model and optimizer, two shards of sorted labels per worker, the one-peer
exponential graph).

Compute is the emulated benchmark's accelerator as is: a step of
STEP_SECONDS x (1 +- jitter) x the straggler's slowdown. Communication is a
profile's links (PROFILES) carrying PAYLOAD_BYTES, ResNet-50's parameters,
while the small model trains for its statistics; each iteration's overhead
(mixing, the local step, control) is the emulated benchmark's calibration
at its largest N (--calibration; the allreduce's collective comes from the
link model, as the calibrated one never carried 100 MB).

Settings: none; slow_tenth (a tenth of the workers, spread over the ranks,
2-8x slower, the factors log-spaced); pareto (bench/emulated.py's: every
step delayed with probability 0.1 by Pareto(1.5) steps, at most 20).

1. Tuning, per (policy, N) for N in --tune-ranks, on --tune-seed,
   accelerator profile, no stragglers: the grid extended until the best
   rate has a tried rate on both sides (bench/emulated.py's next_rate,
   tuning_key). By default the largest N is not tuned (at 1024 workers a
   grid costs more than all its evaluations) and takes the rates of the
   largest tuned N; the JSON's plan says which.
2. Evaluation: every profile, setting, policy and N on --seeds; from N =
   --reduce-from up (default: the largest N) only the first --reduced-seeds
   seeds and the --reduced-settings (default: every setting), said in the
   JSON's plan, as a run at 1024 workers costs as much as 64 at 16.
   At an N that was not tuned, a policy with a run that diverged at the
   inherited rate runs again, every run of it at that N, at half the rate
   (at most MAX_HALVINGS times): the rows show the rate the policy ran at
   in the end, the JSON's superseded_runs the runs before.

Writes simulation_projection.json (plan, tuning, every run, and per
profile, setting, policy and N the seeds' samples and virtual seconds to
the target: mean, lowest and highest, how many reached it, collapsed or
diverged), .md and .png. The run folders stay under --runs; a relaunch
simulates only what is missing.
"""

import argparse
import collections
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

import benchlib
import emulated
import emulated_report as report
import simulation

CONFIG = benchlib.BENCH / "projection.yaml"
RANKS = (16, 64, 256, 1024)
POLICIES = ("allreduce", "dpsgd", "async", "fixed_k", "aau")
SETTINGS = ("none", "slow_tenth", "pareto")
STEP_SECONDS = 0.03
PAYLOAD_BYTES = 100e6
PROFILES = {"accelerator": {"bandwidth_gbs": 25.0, "latency_us": 5.0},  # NVLink/IB-class
            "ethernet": {"bandwidth_gbs": 1.25, "latency_us": 50.0}}   # 10 Gb/s
SAMPLES_PER_WORKER = 2500   # 2,000 train + 500 test
LRS = (0.1, 0.2, 0.4)
MAX_HALVINGS = 2
QUICK = {"ranks": [4], "seeds": [0], "reduced_seeds": 1, "iterations": 30,
         "settings": ["slow_tenth"], "lrs": [0.2, 0.4], "overrides": ["eval.every_epochs=0.05"]}


def straggler_section(setting, ranks, seed):
    if setting == "slow_tenth":
        count = max(1, round(ranks / 10))
        slow = [int(r) for r in np.linspace(0, ranks, count, endpoint=False) + ranks // (2 * count)]
        return {"name": "fixed", "ranks": slow,
                "slowdown": [round(float(f), 3) for f in np.geomspace(2, 8, count)]}
    return emulated.straggler_section(setting, ranks, seed)


def task(plan, phase, ranks, profile, setting, seed, policy, lr):
    iterations = plan["iterations"]
    name = f"{phase}-n{ranks}-{profile}-{setting}-seed{seed}-{policy}-lr{lr:g}"
    overrides = [*plan["overrides"], f"name={name}", f"output.dir={plan['runs_dir']}",
                 f"seed={seed}", f"optim.lr={lr}",
                 f"data.num_samples={SAMPLES_PER_WORKER * ranks}",
                 f"budget.samples={ranks * iterations * plan['batch_size']}",
                 f"emulate.step_seconds={STEP_SECONDS}",
                 f"policy={json.dumps(emulated.policy_section(policy))}",
                 f"stragglers={json.dumps(straggler_section(setting, ranks, seed))}",
                 "output.progress=false"]
    return {"config": plan["config"], "ranks": ranks, "overrides": overrides,
            "options": {"payload_bytes": PAYLOAD_BYTES, "calibration": plan["calibration"],
                        **PROFILES[profile]},
            "key": {"phase": phase, "profile": profile, "setting": setting, "seed": seed,
                    "policy": policy, "lr": lr}}


def tune(plan, processes):
    """Per tuned N, each policy's rate: the grid, then rates off its edge, all policies at
    once; an N above the largest tuned one takes that one's rates."""
    tuned = plan["tune_ranks"]
    records = simulation.run_all([task(plan, "tune", n, "accelerator", "none",
                                       plan["tune_seed"], policy, lr)
                                  for n in tuned for policy in plan["policies"]
                                  for lr in plan["lrs"]], processes)
    while True:
        more = []
        for n, policy in itertools.product(tuned, plan["policies"]):
            mine = [r for r in records if (r["ranks"], r["policy"]) == (n, policy)]
            lr = emulated.next_rate(plan["lrs"], [with_target(r) for r in mine], policy)
            if lr is not None:
                more.append(task(plan, "tune", n, "accelerator", "none", plan["tune_seed"],
                                 policy, lr))
        if not more:
            break
        records += simulation.run_all(more, processes)
    best = {n: report.best_rates([with_target(r) for r in records if r["ranks"] == n])
            for n in tuned}
    for n in plan["ranks"]:
        if n not in best:
            best[n] = best[max(t for t in tuned if t < n)]
    return records, best


def with_target(record):
    """A simulation's record in the shape emulated_report's helpers read."""
    return {**record, "refused": False}


def evaluation_tasks(plan, best):
    tasks = []
    for n, profile, setting in itertools.product(plan["ranks"], plan["profiles"],
                                                 plan["settings"]):
        reduced = n >= plan["reduce_from"]
        if reduced and setting not in plan["reduced_settings"]:
            continue
        seeds = plan["seeds"][:plan["reduced_seeds"]] if reduced else plan["seeds"]
        for seed, policy in itertools.product(seeds, plan["policies"]):
            tasks.append(task(plan, "run", n, profile, setting, seed, policy, best[n][policy]))
    return tasks


def policies_to_halve(plan, runs, halvings):
    """{(N, policy)} for each policy with a diverged run at an N that was not tuned,
    unless `halvings` (a Counter by (N, policy)) has reached MAX_HALVINGS for it."""
    return {(r["ranks"], r["policy"]) for r in runs
            if r.get("failed") and r["ranks"] not in plan["tune_ranks"]
            and halvings[r["ranks"], r["policy"]] < MAX_HALVINGS}


def evaluate(plan, best, processes):
    """Every evaluation run; at an N that was not tuned, a policy that diverged runs
    again at half the rate. Returns (runs, runs superseded by a halved rate)."""
    runs = simulation.run_all(evaluation_tasks(plan, best), processes)
    superseded, halvings = [], collections.Counter()
    while halved := policies_to_halve(plan, runs, halvings):
        for n, policy in halved:
            best[n] = {**best[n], policy: best[n][policy] / 2}
            halvings[n, policy] += 1
        again = [t for t in evaluation_tasks(plan, best)
                 if (t["ranks"], t["key"]["policy"]) in halved]
        superseded += [r for r in runs if (r["ranks"], r["policy"]) in halved]
        runs = [r for r in runs if (r["ranks"], r["policy"]) not in halved]
        runs += simulation.run_all(again, processes)
    return runs, superseded


# ------------------------------------------------------------------ statistics

def spread(values):
    """mean, lowest, highest of the values (None when there are none)."""
    if not values:
        return {"mean": None, "low": None, "high": None}
    return {"mean": float(np.mean(values)), "low": float(min(values)),
            "high": float(max(values))}


def cell_row(runs):
    """One (profile, setting, policy, N): its seeds' figures; a figure to the target
    only when every seed reached it (else how many did)."""
    samples = [report.crossing(r["curve"], r["target"], 1) for r in runs]
    seconds = [report.crossing(r["curve"], r["target"], 0) for r in runs]
    reached = sum(s is not None for s in samples)
    every = reached == len(runs)
    finals = [r["accuracy"] for r in runs if not r.get("failed")]
    first = runs[0]
    return {"profile": first["profile"], "setting": first["setting"],
            "policy": first["policy"], "ranks": first["ranks"], "lr": first["lr"],
            "seeds": [r["seed"] for r in runs], "reached": reached,
            "samples_to_target": spread(samples if every else []),
            "seconds_to_target": spread(seconds if every else []),
            "samples_to_target_per_worker": spread([s / first["ranks"] for s in samples]
                                                   if every else []),
            "accuracy": spread(finals),
            "collapsed": sum(a < report.COLLAPSE for a in finals),
            "diverged": sum(bool(r.get("failed")) for r in runs),
            "virtual_seconds": spread([r["seconds"] for r in runs]),
            "wait_share": spread([float(np.mean(r["wait_share"])) for r in runs
                                  if r.get("wait_share")])}


def rows_of(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["profile"], r["setting"], r["policy"], r["ranks"]), []).append(r)
    return [cell_row(group) for _, group in sorted(groups.items(), key=lambda kv: (
        kv[0][0], SETTINGS.index(kv[0][1]), POLICIES.index(kv[0][2]), kv[0][3]))]


def _range(figure, spec):
    if figure["mean"] is None:
        return "-"
    return (f"{figure['mean']:{spec}} [{figure['low']:{spec}}, {figure['high']:{spec}}]"
            if figure["low"] != figure["high"] else f"{figure['mean']:{spec}}")


HEADERS = ["profile", "setting", "policy", "N", "lr", "reached", "samples to target per worker",
           "virtual s to target", "final accuracy", "collapsed", "diverged", "wait share"]


def table_cells(row):
    return [row["profile"], row["setting"], row["policy"], row["ranks"], f"{row['lr']:g}",
            f"{row['reached']}/{len(row['seeds'])}",
            _range(row["samples_to_target_per_worker"], ",.0f"),
            _range(row["seconds_to_target"], ".1f"), _range(row["accuracy"], ".3f"),
            row["collapsed"], row["diverged"], _range(row["wait_share"], ".2f")]


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, rows = record["plan"], record["rows"]
    keys = [(p, s) for p in plan["profiles"] for s in plan["settings"]]
    figure, axes = plt.subplots(2, len(keys), sharex=True, sharey="row",
                                figsize=(3.2 * len(keys), 5.6), squeeze=False)
    for column, (profile, setting) in enumerate(keys):
        for policy in plan["policies"]:
            mine = [r for r in rows if (r["profile"], r["setting"], r["policy"])
                    == (profile, setting, policy)]
            for axis, figure_key in zip(axes[:, column], ("samples_to_target_per_worker",
                                                          "seconds_to_target")):
                shown = [r for r in mine if r[figure_key]["mean"] is not None]
                axis.errorbar([r["ranks"] for r in shown], [r[figure_key]["mean"] for r in shown],
                              yerr=[[r[figure_key]["mean"] - r[figure_key]["low"] for r in shown],
                                    [r[figure_key]["high"] - r[figure_key]["mean"]
                                     for r in shown]],
                              color=report.COLOURS[policy], marker="o", markersize=3, capsize=2,
                              label=policy)
                # Not reached on some seed, diverged or collapsed: an x at the axis' foot.
                missed = [r["ranks"] for r in mine if r[figure_key]["mean"] is None]
                axis.plot(missed, [0] * len(missed), "x", color=report.COLOURS[policy],
                          markersize=7, clip_on=False)
        axes[0, column].set_title(f"{profile}, {setting}", fontsize=9)
        axes[1, column].set_xlabel("workers N")
        for axis in axes[:, column]:
            axis.set_xscale("log", base=2)
            axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("samples to target per worker\n(flat: linear speed-up)")
    axes[1, 0].set_ylabel("virtual seconds to target")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(f"Simulated weak scaling, MNIST-1D, {plan['iterations']} iterations a "
                    f"worker, seeds {plan['seeds']} ({plan['reduced_seeds']} from N = "
                    f"{plan['reduce_from']}): mean "
                    f"and range over seeds; x: not reached on every seed", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------ main

def default_calibration():
    """The emulated benchmark's calibration at its largest N."""
    found = sorted(benchlib.RESULTS.glob("emulated/calibration-n*.json"),
                   key=lambda p: int(p.stem.split("-n")[1]))
    if not found:
        raise SystemExit("error: no bench/results/emulated/calibration-n*.json: run "
                         "bench/emulated.py first, or give --calibration")
    return str(found[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reduce-from", type=int,
                        help="the smallest N evaluated on fewer seeds and settings (default: "
                             "the largest N)")
    parser.add_argument("--reduced-seeds", type=int, default=1,
                        help="seeds from --reduce-from up (the first of --seeds)")
    parser.add_argument("--reduced-settings", nargs="+", choices=SETTINGS,
                        help="settings from --reduce-from up (default: --settings)")
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--tune-ranks", type=int, nargs="+",
                        help="the N tuned (default: every --ranks but the largest, which "
                             "takes the largest tuned N's rates)")
    parser.add_argument("--iterations", type=int, default=1000, help="steps a worker")
    parser.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--calibration", help="default: the emulated benchmark's at its "
                                              "largest N")
    parser.add_argument("--quick", action="store_true",
                        help="4 workers, 30 iterations, one seed and setting (CI)")
    parser.add_argument("--jobs", type=int, default=2, help="simulations at once")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--runs", help="run folders (default runs/projection)")
    parser.add_argument("--out", default=str(benchlib.RESULTS))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, [*value, *args.overrides] if key == "overrides" else value)
    if args.tune_seed in args.seeds:
        parser.error(f"--tune-seed {args.tune_seed} is also an evaluation seed: tune on a "
                     f"seed that is never evaluated")
    if args.tune_ranks is None:
        args.tune_ranks = sorted(args.ranks)[:-1] or list(args.ranks)
    if not set(args.tune_ranks) <= set(args.ranks) or min(args.tune_ranks) != min(args.ranks):
        parser.error(f"--tune-ranks {args.tune_ranks}: give N of --ranks {args.ranks}, the "
                     f"smallest included (an untuned N takes the rates of the largest tuned "
                     f"N below it)")
    if not 1 <= args.reduced_seeds <= len(args.seeds):
        parser.error(f"--reduced-seeds {args.reduced_seeds}: give 1 to {len(args.seeds)}")
    if args.reduce_from is None:
        args.reduce_from = max(args.ranks)
    if args.reduce_from not in args.ranks:
        parser.error(f"--reduce-from {args.reduce_from}: give one N of --ranks {args.ranks}")
    if args.reduced_settings is None:
        args.reduced_settings = list(args.settings)
    if not set(args.reduced_settings) <= set(args.settings):
        parser.error(f"--reduced-settings {args.reduced_settings}: give settings of --settings "
                     f"{args.settings}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from aau_mpi.training.config_loading import load_config

    runs_dir = Path(args.runs or benchlib.REPO / "runs" / "projection").resolve()
    plan = {"config": str(Path(args.config).resolve()), "ranks": sorted(args.ranks),
            "seeds": args.seeds, "reduce_from": args.reduce_from,
            "reduced_seeds": args.reduced_seeds, "reduced_settings": args.reduced_settings,
            "tune_seed": args.tune_seed, "tune_ranks": sorted(args.tune_ranks),
            "iterations": args.iterations,
            "profiles": args.profiles, "settings": args.settings, "policies": args.policies,
            "lrs": args.lrs, "calibration": args.calibration or default_calibration(),
            "batch_size": load_config(args.config).data.batch_size,
            "overrides": args.overrides, "runs_dir": str(runs_dir), "quick": args.quick,
            "step_seconds": STEP_SECONDS, "payload_bytes": PAYLOAD_BYTES, "profiles_links":
            {p: PROFILES[p] for p in args.profiles}, "samples_per_worker": SAMPLES_PER_WORKER}
    started = time.perf_counter()
    with simulation.pool(args.jobs) as processes:
        tuning, best = tune(plan, processes)
        runs, superseded = evaluate(plan, best, processes)
    walls = [r["wall_seconds"] for r in tuning + runs + superseded]
    # A relaunch reads runs simulated before: the simulations' own seconds add up all.
    plan.update(wall_seconds=round(time.perf_counter() - started),
                simulation_seconds=round(sum(w for w in walls if w is not None)),
                simulations_without_seconds=sum(w is None for w in walls),
                date=benchlib.today(), machine=benchlib.machine(), code=benchlib.source(),
                command=" ".join(["python bench/projection.py",
                                  *(sys.argv[1:] if argv is None else argv)]))
    rows = rows_of(runs)
    record = {"benchmark": "simulation_projection", "plan": plan,
              "best_lr": {str(n): rates for n, rates in best.items()}, "rows": rows,
              "tuning": tuning, "runs": runs, "superseded_runs": superseded}
    intro = (f"# Simulated weak scaling to {max(plan['ranks'])} workers ({plan['date']})\n\n"
             f"`{plan['command']}`: {plan['iterations']} iterations a worker, step "
             f"{STEP_SECONDS * 1e3:g} ms, payload {PAYLOAD_BYTES / 1e6:g} MB, calibration "
             f"{plan['calibration']}; seeds {plan['seeds']} (from N = {plan['reduce_from']}: "
             f"{plan['reduced_seeds']} seed(s), settings {plan['reduced_settings']}); rates "
             f"tuned at N = {plan['tune_ranks']} (a larger N takes the largest tuned N's, "
             f"halved for a policy that diverged there: {len(superseded)} runs superseded, in "
             f"the JSON); figures are the mean [lowest, highest] over the seeds, to "
             f"the target {runs[0]['target']} only where every seed reached it.")
    json_path = benchlib.write_report(args.out, "simulation_projection", record, intro, HEADERS,
                                      [table_cells(r) for r in rows])
    plot(record, Path(args.out) / "simulation_projection.png")
    print(f"wrote {json_path} ({plan['wall_seconds']} s)")


if __name__ == "__main__":
    main()
