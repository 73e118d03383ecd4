"""Plain torch DistributedDataParallel (gloo): the outside reference for synchronous training.

    torchrun --standalone --nproc_per_node 4 bench/ddp_reference.py PLAN --lr 0.05

Launched the way DDP's users launch it, by bench/stragglers.py with the plan
it wrote (PLAN) and allreduce's tuned learning rate (DDP is the same
algorithm: SGD on the gradient averaged over the ranks). For every setting
and seed of the plan it trains what the trainer would: the same model and
initial weights (torch.manual_seed(seed) before building it; DDP broadcasts
rank 0's), the same shards and per-rank batch order, the same sample budget,
momentum and learning-rate schedule on global progress, and the same
straggler model: the slow rank sleeps after its forward and backward pass.
The trainer scales a fixed straggler's sleep by the step's compute time,
gradient exchange excluded; DDP's backward overlaps the Allreduce, so the
compute time here is the median of forward and backward passes of the bare
module timed before training (all ranks at once, as loaded as in training).
Rank 0 evaluates the model, the
same on every rank, every eval.every_epochs with the training clock stopped.
Writes <the plan's runs folder>/ddp.json in the records' format of
bench/stragglers.py.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import benchlib
from aau_mpi import evaluation
from aau_mpi.config import load_config
from aau_mpi.datasets import load_dataset, partition, shard_loader
from aau_mpi.models import build_model
from aau_mpi.schedule import Schedule
from aau_mpi.stragglers import build_straggler, slow_down
from stragglers import straggler_section


def _seconds(action):
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def train(config, data, rank, size):
    """One DDP run; rank 0 returns its record, the others None."""
    b = config.data.batch_size
    train_size = len(data.y_train)
    parts = partition(data.y_train.numpy(), size, config.data.partition.name,
                      seed=config.seed, **config.data.partition.params)
    batches = shard_loader(data.x_train, data.y_train, parts[rank], b,
                           seed=config.seed * 1000 + rank)
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, data.input_shape, data.num_classes,
                        config.model.params)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config.optim.lr,
                                momentum=config.optim.momentum,
                                weight_decay=config.optim.weight_decay,
                                nesterov=config.optim.nesterov)
    lr = config.optim.learning_rate()
    budget = config.budget
    schedule = Schedule(sample_budget=budget.samples or (round(budget.epochs * train_size)
                                                         if budget.epochs else None),
                        time_budget=budget.seconds)
    eval_every = round(config.eval.every_epochs * train_size)
    straggler = build_straggler(config.stragglers.name, rank, size, config.stragglers.params)
    test = slice(0, config.eval.max_samples)
    x_test, y_test = data.x_test[test], data.y_test[test]
    target = config.eval.target_accuracy

    def compute():
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()

    compute_seconds = float(np.median([_seconds(compute) for _ in range(20)]))
    optimizer.zero_grad()
    batches = shard_loader(data.x_train, data.y_train, parts[rank], b,
                           seed=config.seed * 1000 + rank)  # the trainer's batch order
    curve, iterations, sleep = [], 0, 0.0
    samples, next_eval, excluded = 0, eval_every, 0.0
    dist.barrier()
    started = time.perf_counter()

    def clock():
        return time.perf_counter() - started - excluded

    def evaluate():
        loss, correct = evaluation.loss_and_correct(model, x_test, y_test,
                                                  config.data.eval_batch_size)
        return loss / len(y_test), correct / len(y_test)

    while True:
        stop = schedule.finished(samples, clock())
        if budget.seconds is not None:  # ranks' clocks differ: agree on the stop
            flag = torch.tensor([int(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            break
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()  # DDP averages the gradients here
        iterations += 1
        sleep += slow_down(straggler, compute_seconds, clock())
        for group in optimizer.param_groups:
            group["lr"] = lr(schedule.progress(samples, clock()))
        optimizer.step()
        samples += b * size
        if eval_every and samples >= next_eval:
            next_eval += eval_every
            dist.barrier()
            paused = time.perf_counter()
            at = clock()
            if rank == 0:
                loss, accuracy = evaluate()
                curve.append([at, samples, accuracy, loss])
            dist.barrier()
            excluded += time.perf_counter() - paused
    seconds = clock()
    if rank != 0:
        return None
    loss, accuracy = evaluate()
    reached = next((p for p in curve if target is not None and p[2] >= target), None)
    return {"accuracy": accuracy, "loss": loss, "seconds": seconds, "samples": samples,
            "samples_per_second": samples / seconds, "target": target,
            "time_to_target": reached[0] if reached else None,
            "epochs_to_target": reached[1] / train_size if reached else None,
            "iterations": [iterations] * size,
            # DDP averages every gradient over all ranks and does not time its waits.
            "neighbours": [None] * size, "wait_share": [None] * size,
            "sleep_share": [sleep / seconds] + [None] * (size - 1),
            "step_seconds": compute_seconds,
            "curve": curve,
            "shard_accuracy": [evaluation.loss_and_correct(
                model, data.x_train[torch.as_tensor(p)], data.y_train[torch.as_tensor(p)],
                config.data.eval_batch_size)[1] / len(p) for p in parts]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="the plan.json that bench/stragglers.py wrote")
    parser.add_argument("--lr", type=float, required=True)
    args = parser.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    # As the trainer does: the node's cores shared out among its ranks.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    config = load_config(plan["config"], plan["overrides"])
    if config.eval.every_epochs is None:
        raise SystemExit("error: the DDP reference evaluates by eval.every_epochs: set it")
    data = load_dataset(config.data.name, config.data.params)
    runs = []
    for setting in plan["settings"]:
        for seed in plan["seeds"]:
            config = load_config(plan["config"], [
                *plan["overrides"], f"seed={seed}", f"optim.lr={args.lr}",
                f"stragglers={json.dumps(straggler_section(setting, seed))}"])
            record = train(config, data, rank, size)
            if rank == 0:
                runs.append({"phase": "run", "setting": setting, "seed": seed,
                             "variant": "ddp", "lr": args.lr, **record})
                print(f"ddp   {setting:9} seed {seed} lr {args.lr:<6g} accuracy "
                      f"{record['accuracy']:.4f} in {record['seconds']:.2f} s", flush=True)
    if rank == 0:
        benchlib.write_json(Path(plan["runs_dir"]) / "ddp.json", {"runs": runs})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
