"""Statistical efficiency: test loss against total samples for 1, 2, 4 and 8 ranks.

    python bench/scaling.py [--quick] [--ranks 1 2 4 8] [--policies aau dpsgd allreduce]

The linear-speedup claim of decentralized SGD is that convergence per sample
holds as ranks are added: with the per-rank batch fixed and the same total
sample budget, the loss-against-samples curves of N ranks should lie on top
of each other. For each rank count this launches one
`mpiexec -n N python bench/scaling.py --worker PLAN` job that trains every
policy and seed on bench/digits.yaml's problem without stragglers,
then writes scaling.json, scaling.md and scaling.png (loss against samples,
one panel per policy, one line per rank count) into --out. On a machine with
fewer cores than ranks the samples per second say nothing about speed-up;
the per-sample curves are what this measures.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import benchlib
from benchlib import cell, median

DEFAULT_CONFIG = benchlib.BENCH / "digits.yaml"
FRACTIONS = (0.25, 0.5, 1.0)  # of the sample budget, where the table reads the loss


def worker(plan_path):
    from aau_mpi.decentralized.device import init

    plan = json.loads(Path(plan_path).read_text())
    world = init(device="cpu")
    runs = []
    for seed in plan["seeds"]:
        for policy in plan["policies"]:
            # On one rank every policy is plain SGD; the mailbox policies cannot
            # run there (a deposit to no out-neighbour fails in mailbox.py), so
            # the gradient-averaging policy, which needs no mailbox, stands in.
            ran = "allreduce" if world.size == 1 else policy
            config = benchlib.train_run(world, plan["config"], [
                *plan["overrides"], f"name=ranks{world.size}-{policy}-seed{seed}",
                f"output.dir={plan['runs_dir']}", f"seed={seed}", f"optim.lr={plan['lr']}",
                f"policy={{name: {ran}}}", "stragglers={name: none}"])
            if world.rank == 0:
                record = benchlib.read_run(config)
                runs.append({"ranks": world.size, "policy": policy, "ran": ran, "seed": seed,
                             **record})
                print(f"{world.size} ranks {policy:9} seed {seed} loss {record['loss']:.4f} "
                      f"accuracy {record['accuracy']:.4f}", flush=True)
    if world.rank == 0:
        benchlib.write_json(Path(plan["runs_dir"]) / f"ranks-{world.size}.json", {"runs": runs})


def loss_at(run, samples):
    """Test loss of the last evaluation at or before `samples` total samples."""
    passed = [point[3] for point in run["curve"] if point[1] <= samples]
    return passed[-1] if passed else None


def summarise(runs, ranks, policies):
    budget = max(r["samples"] for r in runs)
    rows = []
    for policy in policies:
        for n in ranks:
            mine = [r for r in runs if r["ranks"] == n and r["policy"] == policy]
            if mine:
                rows.append({"policy": policy, "ranks": n, "seeds": len(mine),
                             "loss_at": [median(loss_at(r, f * budget) if f < 1 else r["loss"]
                                                for r in mine) for f in FRACTIONS],
                             "accuracy": median(r["accuracy"] for r in mine),
                             "samples_per_second": median(r["samples_per_second"]
                                                          for r in mine)})
    return rows, budget


def plot(runs, policies, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(policies), 3.8))
    panels = figure.subplots(1, len(policies), squeeze=False, sharey=True)[0]
    for policy, axes in zip(policies, panels):
        ranks = sorted({r["ranks"] for r in runs})
        for i, n in enumerate(ranks):
            for k, run in enumerate(r for r in runs if r["ranks"] == n and r["policy"] == policy):
                axes.plot([p[1] for p in run["curve"]], [p[3] for p in run["curve"]],
                          color=f"C{i}", linewidth=1, label=f"{n} ranks" if k == 0 else None)
        axes.set(title=policy, xlabel="samples, all ranks together", yscale="log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    panels[0].set_ylabel("test loss (averaged model)")
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="PLAN", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="development/test size: 1 and 2 ranks, 1 seed, budget.epochs=3")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--ranks", type=int, nargs="+")
    parser.add_argument("--policies", nargs="+", default=["aau", "dpsgd", "allreduce"])
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="one learning rate for every rank count (per-rank batch fixed)")
    parser.add_argument("--runs", help="folder for the run folders (default runs/bench-scaling-<time>)")
    parser.add_argument("--out", help="folder for the report (default bench/results; "
                                      "with --quick, <runs>/report)")
    parser.add_argument("--timeout", type=float, help="seconds each launched job may take")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    runs_dir = Path(args.runs or f"runs/bench-scaling-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out or (runs_dir / "report" if args.quick else benchlib.RESULTS))
    plan = {"config": args.config, "policies": args.policies, "lr": args.lr,
            "ranks": args.ranks or ([1, 2] if args.quick else [1, 2, 4, 8]),
            "seeds": args.seeds or ([0] if args.quick else [0, 1, 2]),
            "overrides": [*(["budget.epochs=3", "eval.every_epochs=1"] if args.quick else []),
                          *args.overrides],
            "runs_dir": str(runs_dir.resolve())}
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan_path = benchlib.write_json(runs_dir / "plan.json", plan)
    runs = []
    for n in plan["ranks"]:
        benchlib.launch([benchlib.MPIEXEC, "-n", n, sys.executable, __file__, "--worker",
                         plan_path], args.timeout)
        runs += json.loads((runs_dir / f"ranks-{n}.json").read_text())["runs"]

    rows, budget = summarise(runs, plan["ranks"], plan["policies"])
    headers = ["policy", "ranks", "seeds"] + [f"loss @ {f:.0%} of samples" for f in FRACTIONS] \
        + ["final acc", "samples/s"]
    cells = [[r["policy"], r["ranks"], r["seeds"], *(cell(v, ".4f") for v in r["loss_at"]),
              cell(r["accuracy"], ".4f"), cell(r["samples_per_second"], ".0f")] for r in rows]
    result = {"benchmark": "scaling", "date": benchlib.today(), "machine": benchlib.machine(),
              "mpi": benchlib.mpi_library(), "plan": plan, "sample_budget": budget,
              "rows": rows, "runs": runs}
    paths = [benchlib.write_json(out / "scaling.json", result), out / "scaling.md",
             plot(runs, plan["policies"], out / "scaling.png")]
    paths[1].write_text(
        f"# Statistical efficiency ({result['date']})\n\nMachine: {result['machine']}; "
        f"{result['mpi']}.  \nProblem: `{plan['config']}` "
        f"{' '.join(plan['overrides'])}, no stragglers, lr {plan['lr']:g}, per-rank batch "
        f"fixed, {budget} samples in all; medians over seeds {plan['seeds']}.\n\n"
        + benchlib.markdown_table(headers, cells))
    print()
    print(benchlib.text_table(headers, cells))
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
