"""What a rank pays per iteration as the job grows: N = 8, 16, 32, 64 ranks on this machine.

    python bench/scale.py [--quick] [--ranks 8 16 32 64] [--before /path/to/old/checkout]

One MPI job per N (`mpiexec -n N python bench/scale.py --worker PLAN`); inside
it, for each topology (ring, torus, exponential, exponential_one_peer), every
rank trains MNIST-1D's 1-D CNN on random (1, 40) inputs for a fixed number of
iterations through the DecentralizedOptimizer (aau), then reports:

  compute, deposit, control, wait   median seconds per iteration (Iteration records)
  bytes per iteration               payload bytes x targets of each deposit
  control round trips per step      JobControl round trips to rank 0 after steps / iterations
  polls per step                    round trips made while waiting (to see evaluations and the
                                    stop in time) / iterations: they grow with the waiting
  set-up seconds                    building the optimizer (windows, checks)
  resident MB                       RSS and PSS (shared pages divided among the
                                    processes sharing them: what 64 ranks add up to)

and the job's start-up seconds (launch to every rank ready: MPI, Python,
torch). Oversubscribed (up to 32 ranks per core), so figures are per rank,
not speed-ups. `--before DIR` runs the same measurements with the checkout of
an older aau_mpi in DIR (its Engine: deposit, compute, select, mix; one
sample-counter round trip per step), for the static graphs it has.

Prints a table, writes bench/results/scale.json and scale.png (per-iteration
bytes and control round trips per step against N, per topology).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import benchlib

TOPOLOGIES = ("ring", "torus", "exponential", "exponential_one_peer")
STATIC = ("ring", "torus", "exponential")


def memory_mb():
    """(RSS, PSS) of this process in MB, from /proc/self/smaps_rollup."""
    values = {}
    with open("/proc/self/smaps_rollup") as smaps:
        for line in smaps:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0]) / 1024
    return values["Rss"], values["Pss"]


def median(values):
    import numpy as np
    return float(np.median(values)) if len(values) else 0.0


def train_new(world, topology, iterations, batch):
    """The current library: DecentralizedOptimizer, aau."""
    import torch
    import torch.nn.functional as F
    import aau_mpi
    from aau_mpi.training.models import build_model

    torch.manual_seed(world.rank)
    x, y = torch.randn(8 * batch, 1, 40), torch.randint(0, 10, (8 * batch,))
    torch.manual_seed(0)
    model = build_model("cnn1d", (1, 40), 10)
    started = time.perf_counter()
    records = []
    opt = aau_mpi.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, policy="aau",
        topology=topology, world=world, batch_size=batch, watchdog=None,
        handle_signals=False, on_iteration=records.append)
    setup = time.perf_counter() - started
    targets = []
    for k in range(iterations):
        index = torch.randint(0, len(y), (batch,))
        targets.append(len(opt.graph.active_out(world.rank, opt.iteration)))
        opt.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()
    waiting = opt.events.waiting_round_trips
    trips = opt.events.control.round_trips - waiting
    payload = 4 * opt.params.numel
    opt.finish()
    return {"compute": median([r.compute_seconds for r in records]),
            "deposit": median([r.deposit_seconds + r.deposit_wait_seconds for r in records]),
            "control": median([r.control_seconds for r in records]),
            "wait": median([r.wait_seconds for r in records]),
            "bytes": payload * sum(targets) / len(targets),
            "control_per_step": trips / iterations, "waiting_polls_per_step": waiting / iterations,
            "setup": setup}


def train_old(world, topology, iterations, batch):
    """An older checkout's Engine, as its trainer drove it (importable from PYTHONPATH)."""
    import torch
    import torch.nn.functional as F
    from aau_mpi.comm.control import JobControl
    from aau_mpi.engine import Engine
    from aau_mpi.training.models import FlatParameters, build_model
    from aau_mpi.algorithms.policies import build_policy
    from aau_mpi.algorithms.graphs import generate

    torch.manual_seed(world.rank)
    xs, ys = torch.randn(8 * batch, 1, 40), torch.randint(0, 10, (8 * batch,))
    torch.manual_seed(0)
    started = time.perf_counter()
    graph = generate(topology, world.size)
    model = build_model("mlp", (1, 40), 10, {"hidden": [128, 25]})  # (no cnn1d there)
    params = FlatParameters(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = params.host_view()
    world.comm.Bcast(x, root=0)
    engine = Engine(world.comm, graph, build_policy("aau", graph, world.rank), x, world.clock)
    control = JobControl(world.comm)
    setup = time.perf_counter() - started

    def compute():
        index = torch.randint(0, len(ys), (batch,))
        params.zero_grad()
        F.cross_entropy(model(xs[index]), ys[index]).backward()
        return params.flat_grad.numpy()

    def apply_step(g, scale):
        sgd.step()

    records, trips, control_seconds = [], 0, []
    for _ in range(iterations):
        records.append(engine.step(compute, apply_step))
        counted = time.perf_counter()
        control.add_samples(batch)  # the old trainer: one round trip after every step
        control_seconds.append(time.perf_counter() - counted)
        trips += 1
    engine.finish()
    control.close()
    degree = len(graph.out_neighbours(world.rank))
    return {"compute": median([r.compute_seconds for r in records]),
            "deposit": median([r.deposit_seconds for r in records]),
            "control": median(control_seconds), "wait": median([r.wait_seconds for r in records]),
            "bytes": 4 * x.size * degree, "control_per_step": trips / iterations,
            "setup": setup, "model": "mlp [128, 25] (the old tree has no cnn1d)"}


def worker(plan):
    launched = plan["launched"]
    import numpy as np
    from mpi4py import MPI
    if plan["before"]:
        from aau_mpi.comm.world import init_world
        from aau_mpi.decentralized.device import set_torch_threads
        world = init_world()
        set_torch_threads(world)
        train = train_old
    else:
        import aau_mpi
        world = aau_mpi.init(device="cpu")
        train = train_new
    ready = world.comm.allreduce(time.time(), op=MPI.MAX)
    rows = []
    for topology in plan["topologies"]:
        if topology not in TOPOLOGIES:
            continue
        result = train(world, topology, plan["iterations"], plan["batch"])
        rss, pss = memory_mb()
        result.update(rss=rss, pss=pss)
        everyone = world.comm.gather(result, root=0)
        if world.rank == 0:
            keys = [k for k in everyone[0] if isinstance(everyone[0][k], (int, float))
                    and not isinstance(everyone[0][k], bool)]
            row = {"ranks": world.size, "topology": topology, "before": plan["before"],
                   "startup": ready - launched, "model": everyone[0].get("model", "cnn1d")}
            row.update({k: float(np.median([r[k] for r in everyone])) for k in keys})
            row["wait_max"] = max(r["wait"] for r in everyone)
            rows.append(row)
            print(f"{world.size} ranks {topology}: {row}", flush=True)
    if world.rank == 0:
        benchlib.write_json(plan["out"], {"rows": rows})


def run(args, ranks, before):
    plan = {"launched": time.time(), "iterations": args.iterations, "batch": 32,
            "topologies": list(STATIC if before else args.topologies), "before": bool(before),
            "out": str(Path(args.runs) / f"{'before' if before else 'after'}-{ranks}.json")}
    plan_path = Path(args.runs) / f"plan-{ranks}-{int(bool(before))}.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ)
    if before:
        env["PYTHONPATH"] = str(Path(before).resolve())
    benchlib.launch([benchlib.MPIEXEC, "-n", ranks, sys.executable, __file__, "--worker",
                     plan_path], timeout=args.timeout, env=env)
    return json.loads(Path(plan["out"]).read_text())["rows"]


def plot(rows, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    for n, (key, label) in enumerate((("bytes", "bytes deposited per iteration"),
                                      ("control_per_step", "control round trips per step"))):
        axes = figure.add_subplot(1, 2, n + 1)
        for topology in TOPOLOGIES:
            for before in (False, True):
                points = sorted((r["ranks"], r[key]) for r in rows
                                if r["topology"] == topology and r["before"] == before)
                if points:
                    axes.plot(*zip(*points), marker="o", linestyle="--" if before else "-",
                              label=f"{topology}{' (before)' if before else ''}")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("ranks")
        axes.set_title(label)
        if key == "bytes":
            axes.set_yscale("log")
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 and 4 ranks, a few iterations")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--before", help="checkout of an older aau_mpi to measure too")
    parser.add_argument("--runs", default="runs/scale")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--from-runs", action="store_true",
                        help="tabulate the per-N results already in --runs instead of measuring")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker.read_text()))
    if args.quick:
        args.ranks, args.iterations = [2, 4], 8
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    rows = []
    for ranks in args.ranks:
        for before in (None, args.before) if args.before else (None,):
            if args.from_runs:
                name = f"{'before' if before else 'after'}-{ranks}.json"
                rows += json.loads((Path(args.runs) / name).read_text())["rows"]
            else:
                rows += run(args, ranks, before)
    report(args, rows)


def report(args, rows):
    headers = ["ranks", "topology", "code", "startup s", "setup s", "compute ms", "deposit ms",
               "control ms", "wait ms", "bytes/iteration", "control/step", "polls/step",
               "RSS MB", "PSS MB"]
    table = [[r["ranks"], r["topology"], "before" if r["before"] else "now",
              f"{r['startup']:.0f}", f"{r['setup']:.2f}", f"{1e3 * r['compute']:.2f}",
              f"{1e3 * r['deposit']:.3f}", f"{1e3 * r['control']:.3f}", f"{1e3 * r['wait']:.2f}",
              f"{r['bytes']:,.0f}", f"{r['control_per_step']:.2f}",
              f"{r.get('waiting_polls_per_step', 0):.2f}", f"{r['rss']:.0f}",
              f"{r['pss']:.0f}"] for r in rows]
    print(benchlib.text_table(headers, table))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "scale_quick" if args.quick else "scale"
    benchlib.write_json(args.out / f"{name}.json", {
        "date": benchlib.today(), "machine": benchlib.machine(), "mpi": benchlib.mpi_library(),
        "iterations": args.iterations, "rows": rows,
        "markdown": benchlib.markdown_table(headers, table)})
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()
