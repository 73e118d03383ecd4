"""The emulated benchmark's statistics, tables and plots (bench/emulated.py calls `write`).

    python bench/emulated_report.py [--out bench/results/emulated]

rebuilds n<N>.md and n<N>_curves.png from each n<N>.json there, and the
summary across rank counts (summary.md, summary_ratios.png).

Definitions (docs/benchmarks.md quotes them):
- time (samples) to target: the evaluation curve's first crossing of the
  target accuracy, interpolated linearly between the two evaluations around
  it; None when the run never reaches it.
- collapsed: a run whose final accuracy is below COLLAPSE (twice chance);
  failed: a run that ended its job (a non-finite loss, or a stall past the
  watchdog; the job's log says which), so without a final model.
- per cell (partition, setting, policy): over the evaluation seeds whose run
  was not refused, the mean and the worst seed of each figure, how many
  reached the target, how many collapsed.
- paired ratio, aau against a baseline: per seed, aau's time to target over
  the baseline's, on the seeds where both reached it; their geometric mean
  with a bootstrap 95 % interval (resampling seeds, BOOTSTRAP draws). A
  verdict ("aau faster", "aau slower") only where the interval excludes 1
  and at least MIN_PAIRS seeds pair up; otherwise "no verdict".
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np

import benchlib
from benchlib import cell

COLLAPSE = 0.2
BOOTSTRAP = 10000
MIN_PAIRS = 3
BASELINES = ("allreduce", "ddp", "dpsgd", "async", "fixed_k")
RATIO_TICKS = (0.25, 0.5, 0.7, 1, 1.4, 2, 4)
COLOURS = {"allreduce": "tab:blue", "ddp": "tab:cyan", "dpsgd": "tab:orange",
           "async": "tab:green", "fixed_k": "tab:purple", "aau": "tab:red"}


def crossing(curve, target, column=0):
    """Interpolated `column` (0: training seconds, 1: samples) where the curve first
    reaches `target` accuracy; None if it never does."""
    previous = None
    for point in curve:
        if point[2] >= target:
            if previous is None or point[2] == previous[2]:
                return float(point[column])
            share = (target - previous[2]) / (point[2] - previous[2])
            return float(previous[column] + share * (point[column] - previous[column]))
        previous = point
    return None


def time_to_target(record):
    return crossing(record["curve"], record["target"]) if record.get("target") else None


def tuning_key(record):
    """Shortest time to target first, then the higher final accuracy; a refused run last."""
    reached = time_to_target(record)
    return (record.get("refused", False) or record.get("failed", False),
            math.inf if reached is None else reached, -(record["accuracy"] or 0.0))


def best_rates(records):
    best = {}
    for record in sorted(records, key=tuning_key):
        best.setdefault(record["policy"], record["lr"])
    return best


def run_line(record):
    reached = time_to_target(record)
    return (f"{record['phase']:4} {record['partition']:10} {record['setting']:10} "
            f"seed {record['seed']:<3} {record['policy']:9} lr {record['lr']:<6g} accuracy "
            f"{cell(record['accuracy'], '.3f')}  target at {cell(reached, '.2f')} s  "
            f"{cell(record['samples_per_second'], ',.0f')} samples/s  "
            f"overrun {cell(record['overrun'], '.1%')}"
            + ("  REFUSED (over 5 % of steps overran)" if record["refused"] else "")
            + ("  FAILED (ended its job: diverged or stalled)" if record.get("failed") else ""))


# ------------------------------------------------------------------ statistics

def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def cell_stats(runs):
    """One policy's figures over the seeds of a (partition, setting)."""
    kept = [r for r in runs if not r["refused"]]
    times = [time_to_target(r) for r in kept]
    samples = [crossing(r["curve"], r["target"], 1) for r in kept]
    accuracy = [r["accuracy"] for r in kept if not r.get("failed")]
    reached = [t for t in times if t is not None]
    return {"seeds": len(kept), "refused": len(runs) - len(kept),
            "reached": len(reached),
            "time_to_target_mean": _mean(times) if len(reached) == len(kept) else None,
            "time_to_target_reached_mean": _mean(times),
            "time_to_target_worst": (max(reached) if len(reached) == len(kept) and reached
                                     else None),
            "samples_to_target_mean": _mean(samples),
            "samples_per_second_mean": _mean([r["samples_per_second"] for r in kept]),
            "accuracy_mean": _mean(accuracy),
            "accuracy_worst": min(accuracy) if accuracy else None,
            "collapsed": sum(a < COLLAPSE for a in accuracy),
            "failed": sum(bool(r.get("failed")) for r in kept),
            "overrun_max": max((r["overrun"] for r in runs), default=None),
            "cpu_cores_mean": _mean([sum(r["cpu_share"]) for r in kept
                                     if not r.get("failed")])}


def geometric_mean_interval(ratios, rng):
    """The ratios' geometric mean and its bootstrap 95 % interval (seeds resampled)."""
    logs = np.log(ratios)
    draws = logs[rng.integers(0, len(logs), size=(BOOTSTRAP, len(logs)))].mean(axis=1)
    low, high = np.exp(np.percentile(draws, [2.5, 97.5]))
    return float(np.exp(logs.mean())), float(low), float(high)


def paired_ratio(aau_runs, base_runs, rng):
    """aau's time to target over the baseline's, paired by seed (see the module docstring)."""
    theirs = {r["seed"]: r for r in base_runs if not r["refused"]}
    ratios, only_aau, only_base = [], 0, 0
    for mine in aau_runs:
        other = theirs.get(mine["seed"])
        if mine["refused"] or other is None:
            continue
        a, b = time_to_target(mine), time_to_target(other)
        if a is not None and b is not None:
            ratios.append(a / b)
        only_aau += a is not None and b is None
        only_base += a is None and b is not None
    result = {"pairs": len(ratios), "only_aau_reached": only_aau,
              "only_baseline_reached": only_base, "ratios": ratios,
              "geometric_mean": None, "low": None, "high": None, "verdict": "no verdict"}
    if not ratios:
        return result
    mean, low, high = geometric_mean_interval(ratios, rng)
    result.update(geometric_mean=mean, low=low, high=high)
    if len(ratios) >= MIN_PAIRS and (high < 1 or low > 1):
        result["verdict"] = "aau faster" if high < 1 else "aau slower"
    return result


def analyse(result):
    """Cells and paired ratios of one rank count's result, keyed as the docs cite them."""
    runs = [r for r in result["runs"] if r["phase"] == "run"]
    plan = result["plan"]
    rng = np.random.default_rng(0)
    cells, ratios = {}, {}
    for part in plan["partitions"]:
        for setting in plan["settings"]:
            key = f"{part}/{setting}"
            mine = {p: [r for r in runs if (r["partition"], r["setting"], r["policy"])
                        == (part, setting, p)] for p in plan["policies"]}
            cells[key] = {p: cell_stats(rs) for p, rs in mine.items() if rs}
            if "aau" in mine:
                ratios[key] = {b: paired_ratio(mine["aau"], mine[b], rng)
                               for b in BASELINES if mine.get(b)}
    ddp = {}
    for key, policies in cells.items():
        if "ddp" in policies and "allreduce" in policies:
            mine, theirs = (policies[p]["samples_per_second_mean"] for p in ("ddp", "allreduce"))
            ddp[key] = mine / theirs if mine and theirs else None
    return {"cells": cells, "ratios": ratios, "ddp_over_allreduce_samples_per_second": ddp}


# ------------------------------------------------------------------ tables

def _interval(ratio):
    if ratio["geometric_mean"] is None:
        return "-"
    return f"{ratio['geometric_mean']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def markdown(result, analysis):
    plan = result["plan"]
    target = result["runs"][0]["target"] if result["runs"] else None
    lines = [f"# Emulated accelerator, {plan['ranks']} ranks\n",
             f"`{plan['command']}` on {plan['date']} ({plan['machine']}; {plan['mpi']}), "
             f"{plan['wall_seconds']} s of wall-clock time in its last invocation (a relaunch "
             f"resumes). Emulated step {plan['step_seconds']:g} s (jitter from the config), "
             f"{plan['budget_seconds']:g} s of training a run, seeds {plan['seeds']} (tuned on seed "
             f"{plan['tune_seed']}), target accuracy {target}, overrides "
             f"{' '.join(plan['overrides']) or 'none'}.\n",
             "Times are training seconds of the emulated accelerator; `mean [worst]` over the "
             "seeds; a mean of times only where every seed reached the target. Collapsed: final "
             f"accuracy below {COLLAPSE}.\n",
             "## Tuned learning rates\n",
             benchlib.markdown_table(["partition", *plan["policies"]], [
                 [part, *(cell(result["best_lr"][part].get(p), "g") for p in plan["policies"])]
                 for part in plan["partitions"]])]
    everything = result["runs"] + result["tuning"]
    retried = sum(bool(r.get("refused_attempts")) for r in everything if not r["refused"])
    refused = [r for r in everything if r["refused"]]
    lines.append(f"Runs trained again after an attempt with over 5 % of its steps overrun, "
                 f"then kept: {retried} of {len(everything)} (`refused_attempts` in the JSON). "
                 f"Refused runs (every attempt overran): {len(refused)}"
                 + "".join(f"\n- {r['phase']} {r['partition']} {r['setting']} seed {r['seed']} "
                           f"{r['policy']}: {r['overrun']:.1%}" for r in refused) + "\n")
    for key, policies in analysis["cells"].items():
        lines.append(f"## {key}\n")
        rows = []
        for policy, s in policies.items():
            rows.append([policy, f"{s['reached']}/{s['seeds']}",
                         f"{cell(s['time_to_target_mean'], '.2f')} "
                         f"[{cell(s['time_to_target_worst'], '.2f')}]",
                         cell(s["samples_to_target_mean"], ",.0f"),
                         cell(s["samples_per_second_mean"], ",.0f"),
                         f"{cell(s['accuracy_mean'], '.3f')} [{cell(s['accuracy_worst'], '.3f')}]",
                         s["collapsed"], s["failed"], f"{s['overrun_max']:.1%}",
                         cell(s["cpu_cores_mean"], ".2f")])
        lines.append(benchlib.markdown_table(
            ["policy", "reached", "time to target s", "samples to target", "samples/s",
             "final accuracy", "collapsed", "failed", "overrun max", "CPU cores"], rows))
        if key in analysis["ratios"]:
            lines.append(benchlib.markdown_table(
                ["aau vs", "paired seeds", "time ratio [95 % CI]", "verdict",
                 "only aau reached", "only baseline reached"],
                [[b, r["pairs"], _interval(r), r["verdict"], r["only_aau_reached"],
                  r["only_baseline_reached"]] for b, r in analysis["ratios"][key].items()]))
    return "\n".join(lines)


# ------------------------------------------------------------------ plots

def plot_curves(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = result["plan"]
    runs = [r for r in result["runs"] if r["phase"] == "run" and not r["refused"]]
    keys = [(part, setting) for part in plan["partitions"] for setting in plan["settings"]]
    columns = len(plan["settings"])
    figure, axes = plt.subplots(len(plan["partitions"]), columns, sharex=True, sharey=True,
                                figsize=(3.2 * columns, 2.8 * len(plan["partitions"])),
                                squeeze=False)
    budget = max((r["seconds"] for r in runs), default=1.0)
    grid = np.linspace(0, budget, 100)
    for ax, (part, setting) in zip(axes.flat, keys):
        for policy in plan["policies"]:
            curves = [r["curve"] for r in runs
                      if (r["partition"], r["setting"], r["policy"]) == (part, setting, policy)
                      and r["curve"]]
            if not curves:
                continue
            # each seed's accuracy at the last evaluation before each time (nan before its first)
            stacked = np.array([[max((p[2] for p in c if p[0] <= t), default=np.nan)
                                 for t in grid] for c in curves])
            with np.errstate(all="ignore"):
                low, mid, high = np.nanpercentile(stacked, [25, 50, 75], axis=0)
            ax.plot(grid, mid, color=COLOURS[policy], label=policy, linewidth=1.2)
            ax.fill_between(grid, low, high, color=COLOURS[policy], alpha=0.2, linewidth=0)
        target = runs[0]["target"] if runs else None
        if target:
            ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{part}, {setting}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training seconds (emulated)")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (averaged model)")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"MNIST-1D, {plan['ranks']} ranks, emulated step {plan['step_seconds']:g} s, "
                    f"{plan['budget_seconds']:g} s a run, "
                    f"seeds {plan['seeds']}: median and interquartile band per policy",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_summary(analyses, path):
    """aau's paired time ratio against each baseline, with its interval, across N: one
    panel per (partition, setting), partitions in rows; a hollow marker is a ratio of
    fewer than MIN_PAIRS paired seeds (no verdict possible)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    keys = {key for a in analyses.values() for key in a["ratios"]}
    plans = [a["plan"] for _, a in sorted(analyses.items())]
    partitions = [p for p in dict.fromkeys(p for plan in plans for p in plan["partitions"])
                  if any(key.startswith(p + "/") for key in keys)]
    settings = [s for s in dict.fromkeys(s for plan in plans for s in plan["settings"])
                if any(key.endswith("/" + s) for key in keys)]
    figure, axes = plt.subplots(len(partitions), len(settings), sharey=True, squeeze=False,
                                figsize=(3.2 * len(settings), 2.9 * len(partitions)))
    ranks = sorted(analyses)
    for key in keys:
        part, setting = key.split("/")
        ax = axes[partitions.index(part), settings.index(setting)]
        for i, base in enumerate(BASELINES):
            for j, n in enumerate(ranks):
                ratio = analyses[n]["ratios"].get(key, {}).get(base)
                if not ratio or ratio["geometric_mean"] is None:
                    continue
                mid = ratio["geometric_mean"]
                ax.errorbar([j + (i - 2) * 0.12], [mid],
                            yerr=[[mid - ratio["low"]], [ratio["high"] - mid]], fmt="o",
                            color=COLOURS[base], markersize=4, capsize=2,
                            markerfacecolor=(COLOURS[base] if ratio["pairs"] >= MIN_PAIRS
                                             else "white"))
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(ranks)), [f"N={n}" for n in ranks])
        ax.set_xlim(-0.6, len(ranks) - 0.4)
        ax.set_yscale("log")
        ax.set_yticks(RATIO_TICKS, [f"{t:g}" for t in RATIO_TICKS])
        ax.minorticks_off()
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[:, 0]:
        ax.set_ylabel("aau time to target / baseline's\n(< 1: aau faster; 95 % CI)")
    figure.legend([Line2D([], [], marker="o", color=COLOURS[base], linestyle="")
                   for base in BASELINES], BASELINES, loc="upper right", fontsize=8, ncol=5)
    figure.suptitle(f"aau against each baseline, paired seeds, N = {', '.join(map(str, ranks))} "
                    f"(hollow: fewer than {MIN_PAIRS} pairs; none: no seed where both reached the "
                    f"target)", fontsize=10, x=0.38)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------ files

def write(result, out, stem):
    """<out>/<stem>.json (the result and its analysis), .md and _curves.png."""
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(result)
    benchlib.write_json(out / f"{stem}.json", {**result, **analysis})
    text = markdown(result, analysis)
    (out / f"{stem}.md").write_text(text)
    plot_curves(result, out / f"{stem}_curves.png")
    print(text)
    if not result["plan"].get("quick"):
        write_summary(out)


def write_summary(out):
    """summary.md and summary_ratios.png over every n<N>.json in `out`."""
    analyses = {}
    for path in sorted(out.glob("n*.json")):
        result = json.loads(path.read_text())
        if not result["plan"].get("quick"):
            analyses[result["plan"]["ranks"]] = result
    if not analyses:
        return
    rows = []
    for n, result in sorted(analyses.items()):
        for key, ratios in result["ratios"].items():
            for base, r in ratios.items():
                rows.append([n, key, base, r["pairs"], _interval(r), r["verdict"]])
    (out / "summary.md").write_text(
        "# aau against each baseline, paired time-to-target ratios across N\n\n"
        + benchlib.markdown_table(["N", "partition/setting", "baseline", "paired seeds",
                                   "ratio [95 % CI]", "verdict"], rows))
    plot_summary(analyses, out / "summary_ratios.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(benchlib.RESULTS / "emulated"))
    out = Path(parser.parse_args().out)
    for path in sorted(out.glob("n*.json")):
        result = json.loads(path.read_text())
        result = {key: result[key] for key in ("plan", "tuning", "best_lr", "runs")}
        analysis = analyse(result)
        benchlib.write_json(path, {**result, **analysis})
        (out / f"{path.stem}.md").write_text(markdown(result, analysis))
        plot_curves(result, out / f"{path.stem}_curves.png")
    write_summary(out)


if __name__ == "__main__":
    main()
