"""Decentralized training in your own PyTorch loop, in about 60 lines.

    mpiexec -n 4 python examples/train_digits.py [--epochs 20] [--policy aau]

Each rank trains a small MLP on its own non-IID shard of the handwritten digits
shipped with aau_mpi; DecentralizedOptimizer wraps a plain torch SGD and does the
rest: deposits into the ring neighbours' windows, waits for fresh neighbours
(DSGD-AAU), mixes, steps. The loop, the model and the data are the user's.
The learning rate warms up and follows a cosine over the job's global budget
(ProgressLR): ranks take different numbers of steps, so a schedule over a
rank's own step count would end early on some and never on others.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import aau_mpi
from aau_mpi.training.datasets import load_dataset
from aau_mpi.training.partitions import partition

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=float, default=20, help="passes over the data, all ranks together")
parser.add_argument("--policy", default="aau")
parser.add_argument("--topology", default="ring")
args = parser.parse_args()

ctx = aau_mpi.init()                                   # MPI, this rank's device and torch threads
data = load_dataset("digits")
shard = partition(data.y_train.numpy(), ctx.size, "dirichlet", seed=0, alpha=0.5)[ctx.rank]
x, y = data.x_train[shard].to(ctx.device), data.y_train[shard].to(ctx.device)

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(ctx.device)
batch = 32
opt = aau_mpi.DecentralizedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
    policy=args.policy, topology=args.topology, batch_size=batch,
    schedule=aau_mpi.Schedule(sample_budget=int(args.epochs * len(data.y_train))))
scheduler = aau_mpi.ProgressLR(opt, schedule="cosine", warmup=0.05)   # over global progress

shuffle = torch.Generator().manual_seed(ctx.rank)
while not opt.should_stop():                           # the global budget, time limit, preemption
    for index in torch.randperm(len(y), generator=shuffle).split(batch):
        opt.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()
        scheduler.step()
        if opt.should_stop():
            break

model = opt.finish()                                   # collective: now the average of all ranks
with torch.no_grad():
    correct = (model(data.x_test.to(ctx.device)).argmax(1) == data.y_test.to(ctx.device)).sum()
if ctx.rank == 0:
    print(f"{ctx.size} ranks, {args.policy} on {args.topology}: {opt.iteration} iterations on rank 0, "
          f"test accuracy {int(correct) / len(data.y_test):.4f}")
