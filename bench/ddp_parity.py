"""Plain torch DistributedDataParallel at parity with the trainer, inside the benchmark's MPI job.

bench/emulated.py trains DDP (gloo) in the same MPI job as the policies, in
turn with them, on the same emulated accelerator: the same model and initial
weights, shards and per-rank batch order, budget, momentum and learning-rate
schedule, straggler model and jitter.

Parity, and why each choice:
- The emulated step. DDP overlaps its gradient Allreduce with the backward
  pass, so the modelled compute cannot be slept after backward() (the
  Allreduce, and the wait for a straggler, would count as compute). A
  communication hook (DDP's extension point, as for PowerSGD) sleeps out the
  modelled step when the gradients are ready, then reduces them, as an
  accelerator would after its backward kernels; the model here is small
  enough for one bucket.
- The transport. The hook reduces over MPI (a non-blocking Allreduce,
  polled with the trainer's sleeping back-off), the trainer's own transport:
  DDP's gloo over TCP loopback took 60 ms a step against allreduce's 40 ms
  here (8 ranks, 25 ms emulated step; 4,262 against 6,335 samples/s), a
  cost of gloo on 8 processes sharing 2 cores that NCCL on a cluster does
  not have. gloo only builds the DDP module (its initial broadcast).
- No blocking collective per step beyond the gradients'. Every `check_every`
  steps (half an evaluation interval) rank 0 broadcasts its training clock
  and whether to stop or to evaluate; the learning rate follows that
  broadcast clock, so every rank applies the same update.
- An evaluation stops the clock on every rank: rank 0 evaluates the model
  (the same on every rank), then a broadcast ends the pause.
"""

import time

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from aau_mpi.algorithms.emulation import EmulatedAccelerator
from aau_mpi.algorithms.stragglers import build_straggler
from aau_mpi.decentralized.collectives import wait_for
from aau_mpi.training import evaluation
from aau_mpi.training.models import build_model
from aau_mpi.training.partitions import partition, shard_loader


def init_gloo(comm):
    """Collective over the MPI communicator: one gloo process group for the job's DDP runs."""
    import socket
    port = None
    if comm.rank == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=comm.rank, world_size=comm.size)


class _Pacer:
    """DDP's communication hook: sleeps out the emulated step, then averages the
    bucket's gradients over MPI."""

    def __init__(self, comm, cap, accelerator, straggler, clock):
        self.comm, self.cap = comm, cap
        self.accelerator, self.straggler, self.clock = accelerator, straggler, clock
        self.started = clock()  # when the current step's compute began
        self.sleep = 0.0

    def hook(self, _state, bucket):
        now = self.clock()
        self.sleep += self.accelerator.pace(now - self.started, self.straggler, now)[0]
        grads = bucket.buffer()
        wait_for(self.comm.Iallreduce(MPI.IN_PLACE, grads.numpy()), cap=self.cap)
        grads.div_(self.comm.size)
        done = torch.futures.Future()
        done.set_result(grads)
        return done


def _bcast(comm, cap, array):
    """Rank 0's `array` on every rank, waiting without spinning."""
    wait_for(comm.Ibcast(array, root=0), cap=cap)
    return array


def train(config, data, comm, cap):
    """One DDP run over `comm` (every rank of the gloo group; `cap`: the longest sleep
    between polls); rank 0 returns its record (the trainer's summary fields)."""
    rank, size = comm.rank, comm.size
    b = config.data.batch_size
    parts = partition(data.y_train.numpy(), size, config.data.partition.name,
                      seed=config.seed, **config.data.partition.params)
    batches = shard_loader(data.x_train, data.y_train, parts[rank], b,
                           seed=config.seed * 1000 + rank)
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, data.input_shape, data.num_classes,
                        config.model.params)
    ddp = DistributedDataParallel(model)
    optim = config.optim
    optimizer = torch.optim.SGD(ddp.parameters(), lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    lr = optim.learning_rate(size * b, b)
    budget, every = config.budget.seconds, config.eval.every_seconds
    check_every = max(1, round(every / 2 / config.emulate.step_seconds))
    test = slice(0, config.eval.max_samples)
    x_test, y_test = data.x_test[test], data.y_test[test]
    accelerator = EmulatedAccelerator(config.emulate.step_seconds, config.emulate.jitter,
                                      config.seed, rank)
    straggler = build_straggler(config.stragglers.name, rank, size, config.stragglers.params)

    excluded = 0.0
    _bcast(comm, cap, np.zeros(1))  # every rank starts its clock together
    started = time.perf_counter()

    def clock():
        return time.perf_counter() - started - excluded

    pacer = _Pacer(comm, cap, accelerator, straggler, clock)
    ddp.register_comm_hook(None, pacer.hook)
    cpu = time.process_time()
    curve, iterations, at, evaluations = [], 0, 0.0, 0
    while True:
        if iterations % check_every == 0:
            # [clock, stop, evaluate] as rank 0 sees them: every rank acts on the same
            flags = np.array([clock(), 0.0, 0.0])
            if rank == 0:
                flags[1] = flags[0] >= budget
                flags[2] = flags[0] >= (evaluations + 1) * every
            _bcast(comm, cap, flags)
            at = float(flags[0])
            if flags[2]:
                evaluations += 1
                paused = time.perf_counter()
                if rank == 0:
                    loss, correct = evaluation.loss_and_correct(model, x_test, y_test,
                                                                config.data.eval_batch_size)
                    curve.append([at, iterations * b * size, correct / len(y_test),
                                  loss / len(y_test)])
                _bcast(comm, cap, np.zeros(1))
                excluded += time.perf_counter() - paused
            if flags[1]:
                break
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()  # the hook paces, then DDP averages
        for group in optimizer.param_groups:
            group["lr"] = lr(min(at / budget, 1.0))
        optimizer.step()
        iterations += 1
        pacer.started = clock()
    seconds = clock()
    shares = [seconds and pacer.sleep / seconds, accelerator.overrun_share,
              (time.process_time() - cpu) / max(time.perf_counter() - started, 1e-9)]
    gathered = comm.gather(shares, root=0)
    if rank != 0:
        return None
    loss, correct = evaluation.loss_and_correct(model, x_test, y_test, config.data.eval_batch_size)
    samples = iterations * b * size
    return {"accuracy": correct / len(y_test), "loss": loss / len(y_test),
            "seconds": seconds, "samples": samples, "samples_per_second": samples / seconds,
            "iterations": [iterations] * size, "wait_share": [None] * size,
            "sleep_share": [g[0] for g in gathered], "overrun_share": [g[1] for g in gathered],
            "cpu_share": [g[2] for g in gathered], "curve": curve}
