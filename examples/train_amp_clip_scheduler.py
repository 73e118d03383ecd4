"""A user's loop with mixed precision, gradient clipping and a torch LR scheduler, unchanged.

    mpiexec -n 4 python examples/train_amp_clip_scheduler.py [--steps 300]

torch.autocast runs the forward pass in bfloat16 on the CPU (float16 with a
GradScaler on a GPU); clip_grad_norm_ and a OneCycleLR scheduler work on the
DecentralizedOptimizer as on any torch optimizer, and GradScaler.step() calls
its step(). Each rank stops after its own --steps (no global budget here):
finish() waits for everyone, serving the others meanwhile.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import aau_mpi
from aau_mpi.training.datasets import load_dataset
from aau_mpi.training.partitions import partition

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300, help="iterations per rank")
parser.add_argument("--policy", default="aau")
args = parser.parse_args()

ctx = aau_mpi.init()
cuda = ctx.device.type == "cuda"
data = load_dataset("digits")
shard = partition(data.y_train.numpy(), ctx.size, "iid", seed=0)[ctx.rank]
x, y = data.x_train[shard].to(ctx.device), data.y_train[shard].to(ctx.device)

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10)).to(ctx.device)
opt = aau_mpi.DecentralizedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4),
                                     model, policy=args.policy, topology="ring", batch_size=64)
scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=args.steps)
scaler = torch.amp.GradScaler(ctx.device.type, enabled=cuda)   # fp16 needs loss scaling
precision = torch.float16 if cuda else torch.bfloat16

shuffle = torch.Generator().manual_seed(ctx.rank)
for step in range(args.steps):
    index = torch.randint(len(y), (64,), generator=shuffle)
    opt.zero_grad()
    with torch.autocast(ctx.device.type, dtype=precision):
        loss = F.cross_entropy(model(x[index]), y[index])
    scaler.scale(loss).backward()
    scaler.unscale_(opt)                                        # clip the true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    scaler.step(opt)
    scaler.update()
    scheduler.step()

model = opt.finish()
with torch.no_grad():
    correct = (model(data.x_test.to(ctx.device)).argmax(1) == data.y_test.to(ctx.device)).sum()
if ctx.rank == 0:
    print(f"{ctx.size} ranks, {args.policy}, autocast {str(precision).split('.')[-1]}: "
          f"test accuracy {int(correct) / len(data.y_test):.4f}")
