"""Does the deposit overlap the computation? Iteration time against compute alone and deposit alone.

    mpiexec -n 2 python bench/overlap.py [--quick] [--out bench/results/overlap.json]

Rank 0 trains an MLP of about 1 M, 11 M (ResNet-18's size) and 50 M parameters
through the real DecentralizedOptimizer and deposits its model into rank 1's
window every iteration (topology: the one edge 0 -> 1). Rank 1 only hosts the
window and sleeps, so a core is free for rank 0's communication thread: the
setting the overlap is for (a GPU rank's idle CPU, or a rank with a spare core).
Per model, rank 0 times (medians over the iterations):

  compute   forward + backward + the torch step alone (no optimizer around it)
  deposit   one seqlocked deposit of the model alone (Mailbox.deposit)
  inline    an iteration with the deposit made by this thread (the old engine:
            the deposit blocks the computation: about compute + deposit)
  thread    an iteration with the deposit on the communication thread
            (target: at most 1.1 x max(compute, deposit))

The batch size per model is chosen so that compute is about 1-2 x the
deposit, where overlapping matters most. Prints a table, writes JSON.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import benchlib

import aau_mpi
from aau_mpi.algorithms.graphs import Graph

# (label, hidden width, layers, batch): 784 inputs, 10 outputs.
# Batches so small that compute and deposit are of one size on this machine's
# cores (the setting where overlapping matters; a GPU step is short too).
MODELS = [("1M", 1024, 1, 4), ("11M", 2304, 3, 4), ("50M", 4096, 4, 2)]
QUICK_MODELS = [("0.1M", 128, 1, 64), ("1M", 1024, 1, 128)]


def mlp(hidden, layers):
    blocks = [nn.Linear(784, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, 10))


def median_ms(samples):
    return 1e3 * float(np.median(samples))


def rank0(world, hidden, layers, batch, iterations):
    torch.manual_seed(0)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    results = {}
    model = mlp(hidden, layers)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    compute = []
    for _ in range(iterations):
        started = time.perf_counter()
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        compute.append(time.perf_counter() - started)
    results["compute_ms"] = median_ms(compute)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    for mode in ("inline", "thread"):
        opt = aau_mpi.DecentralizedOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-3), model, policy="async",
            topology=ONE_EDGE, world=world, watchdog=None, overlap=mode, handle_signals=False)
        step = []
        for _ in range(iterations):
            started = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step.append(time.perf_counter() - started)
        if mode == "inline":
            payload = opt.params.flat.detach().numpy()
            deposit = []
            for k in range(iterations):
                started = time.perf_counter()
                opt.mailbox.deposit(payload, iteration=k, targets=[1])
                deposit.append(time.perf_counter() - started)
            results["deposit_ms"] = median_ms(deposit)
        results[f"{mode}_ms"] = median_ms(step)
        world.comm.Ibarrier().Wait()  # rank 1 sleeps until here
        opt.finish()
    return results


def rank1(world, model_args, iterations):
    """Host the window; sleep (not spin) until rank 0 is done, then finish."""
    model = mlp(*model_args)
    for mode in ("inline", "thread"):
        opt = aau_mpi.DecentralizedOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-3), model, policy="async",
            topology=ONE_EDGE, world=world, watchdog=None, overlap=mode, handle_signals=False)
        done = world.comm.Ibarrier()
        while not done.Test():
            time.sleep(0.01)
        opt.finish()


ONE_EDGE = Graph(2, [(0, 1)], directed=True, name="one edge 0 -> 1")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few iterations")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "overlap.json")
    args = parser.parse_args()
    world = aau_mpi.init(device="cpu")
    benchlib.require_two_ranks(world.comm, "overlap.py")
    models = QUICK_MODELS if args.quick else MODELS
    iterations = args.iterations or (5 if args.quick else 30)
    rows = []
    for label, hidden, layers, batch in models:
        if world.rank == 0:
            result = rank0(world, hidden, layers, batch, iterations)
        else:
            rank1(world, (hidden, layers), iterations)
            result = None
        if world.rank == 0:
            result.update(model=label, batch=batch, iterations=iterations)
            bound = max(result["compute_ms"], result["deposit_ms"])
            result["thread_over_max"] = result["thread_ms"] / bound
            result["inline_over_max"] = result["inline_ms"] / bound
            rows.append(result)
    if world.rank == 0:
        headers = ["model", "parameters", "batch", "compute ms", "deposit ms", "inline ms",
                   "thread ms", "inline/max", "thread/max"]
        table = [[r["model"], f"{r['parameters']:,}", r["batch"], f"{r['compute_ms']:.1f}",
                  f"{r['deposit_ms']:.1f}", f"{r['inline_ms']:.1f}", f"{r['thread_ms']:.1f}",
                  f"{r['inline_over_max']:.2f}", f"{r['thread_over_max']:.2f}"] for r in rows]
        print(benchlib.text_table(headers, table))
        record = {"date": benchlib.today(), "machine": benchlib.machine(),
                  "mpi": benchlib.mpi_library(), "ranks": 2, "quick": args.quick,
                  "torch_threads": torch.get_num_threads(), "rows": rows,
                  "markdown": benchlib.markdown_table(headers, table)}
        benchlib.write_json(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
