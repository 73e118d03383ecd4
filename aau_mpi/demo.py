"""A small real training job: DSGD-AAU against synchronous D-PSGD, one straggler.

    mpiexec -n 4 python -m aau_mpi.demo [--policies dpsgd aau] [--slowdown 4]

An MLP learns the bundled handwritten digits. Each rank holds a non-IID shard
(Dirichlet 0.3 over classes) and trains on a ring, and rank 1 is made
`--slowdown` times slower (the `fixed` straggler model: it sleeps after
each step). Every policy gets the
same global sample budget, seed and learning rate. Rank 0 prints, per policy:
wall-clock time, the averaged model's test accuracy, iterations per rank,
neighbours averaged per iteration and the share of time spent waiting.

The full trainer, with configs, checkpoints and logs, is `aau_mpi.train`
(in progress); this demo runs the same engine on the CPU.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from aau_mpi.datasets import load_dataset, partition, shard_loader
from aau_mpi.engine import Engine, StopRule
from aau_mpi.models import FlatParameters, build_model
from aau_mpi.policies import build_policy
from aau_mpi.stragglers import build_straggler, slow_down
from aau_mpi.topology import generate
from aau_mpi.world import init_world, install_abort_hook


def train(world, policy_name, data, shard, args):
    torch.manual_seed(0)  # the same initial model on every rank
    model = build_model("mlp", data.input_shape, data.num_classes, {"hidden": [64]})
    params = FlatParameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = shard_loader(data.x_train, data.y_train, shard, args.batch, seed=world.rank)
    graph = generate("ring", world.size)
    policy = build_policy(policy_name, graph, world.rank)
    engine = Engine(world.comm, graph, policy, params.host_view(), world.clock)
    straggler = build_straggler("fixed", world.rank, world.size,
                                {"ranks": [args.slow_rank], "slowdown": args.slowdown})

    def compute():
        started = time.perf_counter()
        x, y = next(batches)
        params.zero_grad()
        F.cross_entropy(model(x), y).backward()
        slow_down(straggler, time.perf_counter() - started, world.clock())
        return params.flat_grad.numpy()

    def apply_step(g, scale):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        optimizer.step()

    records = []
    world.comm.Barrier()
    started = time.perf_counter()
    budget = StopRule(sample_budget=args.epochs * len(data.y_train), samples_per_step=args.batch)
    average = engine.run(compute, apply_step, budget, records.append)
    seconds = time.perf_counter() - started
    params.load_(average)
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    waited = sum(r.wait_seconds for r in records)
    return {"seconds": seconds, "accuracy": accuracy, "iterations": len(records),
            "neighbours": np.mean([len(r.averaged) for r in records]) if policy.uses_mailbox else 0,
            "wait_share": waited / seconds}


def main():
    parser = argparse.ArgumentParser(description="DSGD-AAU demo on the bundled digits")
    parser.add_argument("--policies", nargs="+", default=["dpsgd", "aau"])
    parser.add_argument("--slow-rank", type=int, default=1)
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    world = init_world()
    install_abort_hook(world.comm)
    world.set_torch_threads()
    data = load_dataset("digits", {"seed": 0})
    shard = partition(data.y_train.numpy(), world.size, "dirichlet", alpha=0.3, seed=0)[world.rank]
    if world.rank == 0:
        print(f"{world.size} ranks on a ring, digits (Dirichlet 0.3 shards), MLP, "
              f"{args.epochs} epochs of samples shared by all ranks, rank {args.slow_rank} "
              f"{args.slowdown:g}x slower\n")
        print(f"{'policy':>10} {'seconds':>8} {'test acc':>9} {'iterations per rank':>24} "
              f"{'neighbours':>11} {'wait share':>11}")
    for name in args.policies:
        result = train(world, name, data, shard, args)
        rows = world.comm.gather(result, root=0)
        if world.rank == 0:
            iterations = "/".join(str(r["iterations"]) for r in rows)
            print(f"{name:>10} {rows[0]['seconds']:>8.2f} {rows[0]['accuracy']:>9.3f} "
                  f"{iterations:>24} {np.mean([r['neighbours'] for r in rows]):>11.2f} "
                  f"{np.mean([r['wait_share'] for r in rows]):>11.2f}")


if __name__ == "__main__":
    main()
