"""Plain torch DistributedDataParallel (gloo): the outside reference for synchronous training.

    torchrun --standalone --nproc_per_node 4 bench/ddp_reference.py PLAN

Launched the way DDP's users launch it, by bench/stragglers.py with the plan
it wrote (PLAN), at allreduce's tuned learning rate of each partition (from
the plan's policies.json: DDP is the same algorithm, SGD on the gradient
averaged over the ranks). For every partition and seed of the plan, on the
straggler-free setting, it trains what the trainer would: the same model and
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
from aau_mpi.training import evaluation
from aau_mpi.training.config_loading import load_config
from aau_mpi.training.datasets import load_dataset
from aau_mpi.training.partitions import partition, shard_loader
from aau_mpi.training.models import build_model
from aau_mpi.algorithms.stragglers import build_straggler, slow_down
from stragglers import DDP_SETTING, PARTITIONS, straggler_section


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
    schedule = config.schedule(train_size)  # the trainer's stop and evaluation points
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
    samples, evals, excluded = 0, 0, 0.0
    dist.barrier()
    started = time.perf_counter()

    def clock():
        return time.perf_counter() - started - excluded

    def agree(flag):
        """Every rank's answer when the points are in samples; any rank's yes when
        they are in seconds (the ranks' clocks differ a little)."""
        if budget.seconds is None and config.eval.every_seconds is None:
            return flag
        flag = torch.tensor([int(flag)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def evaluate():
        loss, correct = evaluation.loss_and_correct(model, x_test, y_test,
                                                  config.data.eval_batch_size)
        return loss / len(y_test), correct / len(y_test)

    while True:
        if agree(schedule.finished(samples, clock())):
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
        if agree(schedule.eval_due(evals + 1, samples, clock())):
            evals += 1
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
            "consensus_distance": 0.0,  # one model, the same on every rank
            **benchlib.rank_accuracies(config, model, size)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="the plan.json that bench/stragglers.py wrote")
    args = parser.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    # As the trainer does: the node's cores shared out among its ranks.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    config = load_config(plan["config"], plan["overrides"])
    data = load_dataset(config.data.name, config.data.params)
    best_lr = json.loads((Path(plan["runs_dir"]) / "policies.json").read_text())["best_lr"]
    runs = []
    for part in plan["partitions"]:
        lr = best_lr[part]["allreduce"]
        for seed in plan["seeds"]:
            config = load_config(plan["config"], [
                *plan["overrides"], f"seed={seed}", f"optim.lr={lr}",
                f"data.partition={json.dumps(PARTITIONS[part])}",
                f"stragglers={json.dumps(straggler_section(DDP_SETTING, seed))}"])
            record = train(config, data, rank, size)
            if rank == 0:
                runs.append({"phase": "run", "partition": part, "setting": DDP_SETTING,
                             "seed": seed, "variant": "ddp", "lr": lr, **record})
                print(f"ddp   {part:11} {DDP_SETTING:9} seed {seed} lr {lr:<6g} accuracy "
                      f"{record['accuracy']:.4f} in {record['seconds']:.2f} s", flush=True)
    if rank == 0:
        benchlib.write_json(Path(plan["runs_dir"]) / "ddp.json", {"runs": runs})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
