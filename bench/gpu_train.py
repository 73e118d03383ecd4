"""One GPU-check run: ResNet-18 on CIFAR-10-shaped synthetic data through the library API.

    mpiexec -n 4 python bench/gpu_train.py --policy aau --device cuda --out run.json

Every rank trains its own ResNet-18 (BatchNorm by default, whose running
statistics the loop's forward passes rewrite while deposits are in flight;
11.2 M parameters) on random 3x32x32 images of 10 classes, generated on its device, with torch SGD wrapped
in DecentralizedOptimizer on a ring. Ranks sharing one GPU is what
bench/gpu_check.sh measures (4 ranks on 1 GPU). After `--warmup` steps it
times `--steps` steps and writes rank 0's figures: samples/s of the job and
the median per-iteration split from the optimizer's Iteration records:
compute (forward + backward, with a device synchronise so that the GPU work
is counted where it happens), copies (device-to-host staging of the deposit
plus host-to-device copies of neighbours' payloads), deposit (the RMA
deposit itself, on the communication thread), mix, wait (for neighbours or
in the gradient Allreduce) and step (the torch optimizer). On a GPU it also
records the GPUs on which each rank's process holds a CUDA context
(nvidia-smi): its own only, the communication thread included.
"""

import argparse
import json
import os
import shutil
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

import aau_mpi
from aau_mpi.training.models import build_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="aau")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--width", type=int, default=32, help="image height and width")
    parser.add_argument("--model", default="resnet18",
                        help="resnet18 (the check); lenet for the CPU dry run")
    parser.add_argument("--norm", default="batch", choices=["batch", "group"],
                        help="resnet18's normalisation layers")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    ctx = aau_mpi.init(device=args.device)
    torch.manual_seed(ctx.rank)
    images = torch.randn(8 * args.batch, 3, args.width, args.width, device=ctx.device)
    labels = torch.randint(0, 10, (8 * args.batch,), device=ctx.device)
    torch.manual_seed(0)
    params = {"norm": args.norm} if args.model == "resnet18" else None
    model = build_model(args.model, (3, args.width, args.width), 10, params).to(ctx.device)
    records = []
    opt = aau_mpi.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model,
        policy=args.policy, topology="ring", batch_size=args.batch, watchdog=120,
        on_iteration=records.append, handle_signals=False)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    started = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            ctx.comm.Barrier()
            started, first = time.perf_counter(), len(records)
        index = torch.randint(0, len(labels), (args.batch,), device=ctx.device)
        opt.zero_grad()
        F.cross_entropy(model(images[index]), labels[index]).backward()
        sync()  # the GPU work of this iteration counts as compute, not as the next wait
        opt.step()
    sync()
    seconds = time.perf_counter() - started
    timed = records[first:]
    deposits = opt.deposit_mode()
    contexts = ctx.comm.gather({"rank": ctx.rank, "device": str(ctx.device),
                                "context_gpus": gpus_with_a_context()}, root=0)
    opt.finish()
    total = ctx.comm.allreduce(args.steps * args.batch)
    seconds = ctx.comm.allreduce(seconds, op=MPI.MAX)
    split = {name: 1e3 * float(np.median([getattr(r, field) for r in timed]))
             for name, field in (("compute_ms", "compute_seconds"), ("copies_ms", "copy_seconds"),
                                 ("deposit_ms", "deposit_seconds"), ("mix_ms", "mix_seconds"),
                                 ("wait_ms", "wait_seconds"), ("step_ms", "step_seconds"))}
    if ctx.rank == 0:
        record = {"model": args.model, "norm": args.norm if args.model == "resnet18" else None,
                  "policy": args.policy, "ranks": ctx.size, "device": str(ctx.device),
                  "gpu": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
                  else None, "batch": args.batch, "steps": args.steps,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "deposits": deposits, "samples_per_second": total / seconds,
                  "iteration_ms": 1e3 * seconds / args.steps, **split}
        if ctx.device.type == "cuda":
            record["contexts"] = contexts
            record["contexts_on_own_gpu_only"] = all(
                c["context_gpus"] == [int(c["device"].split(":")[1])] for c in contexts)
        with open(args.out, "w") as out:
            json.dump(record, out, indent=1)


def gpus_with_a_context():
    """Indices (as torch numbers them) of the GPUs on which this process holds a CUDA
    context; None where nvidia-smi is missing. A thread that never selects its
    rank's GPU opens a context on GPU 0 at its first CUDA call."""
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None

    def query(what):
        lines = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True).stdout
        return [[field.strip() for field in line.split(",")] for line in lines.splitlines()]

    index = {str(torch.cuda.get_device_properties(d).uuid): d
             for d in range(torch.cuda.device_count())}
    index = {(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"): d for uuid, d in index.items()}
    mine = {uuid for pid, uuid in query("compute-apps=pid,gpu_uuid") if pid == str(os.getpid())}
    return sorted(index[uuid] for uuid in mine if uuid in index)


if __name__ == "__main__":
    main()
