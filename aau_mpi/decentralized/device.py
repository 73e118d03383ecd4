"""`aau_mpi.init()`: the World of comm/world.py, plus this rank's device and torch's threads.

The one call a training script makes first; it returns the process's `World`
and keeps it as the default for every optimizer built afterwards.
"""

import torch

from aau_mpi.base.errors import UserError
from aau_mpi.base.settings import DEVICES
from aau_mpi.comm.world import World, init_world, install_abort_hook

_current = None            # the World that init() made


def node_device(world):
    """`cuda:<local rank mod GPUs>` when CUDA is available, else `cpu`."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{world.local_rank % torch.cuda.device_count()}")
    return torch.device("cpu")


def select_device(device):
    """Make `device` this thread's current CUDA device (a no-op on the CPU). The
    current device is per thread: the main thread sets it in init(), the
    communication thread first thing, else it opens a context on GPU 0 (every
    rank's)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def set_torch_threads(world):
    """torch's threads: this rank's share of its node's cores (World.threads_per_rank)."""
    threads = world.threads_per_rank()
    torch.set_num_threads(threads)
    return threads


def init(comm=None, *, device="auto", abort_on_error=True):
    """Start aau_mpi in this process: collective over `comm` (default COMM_WORLD).

    Sets torch's threads to this rank's share of its node's cores, picks the
    device (`auto`: the node-local GPU `cuda:<local rank mod GPUs>` when CUDA
    is available, else the CPU) and makes it torch's current CUDA device, and,
    with `abort_on_error`, makes an uncaught exception on any rank end the
    whole job instead of leaving the others waiting. Returns the World.
    """
    global _current
    if device not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, got {device!r}: "
                        f"use device='auto'")
    world = init_world(comm)
    if abort_on_error:
        install_abort_hook(world.comm)
    set_torch_threads(world)
    if device == "cpu":
        chosen = torch.device("cpu")
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but torch sees no GPU: set device=auto "
                        "or device=cpu, or install a CUDA build of torch")
    else:
        chosen = node_device(world)
    # Anything that uses "the current device" (new tensors, NCCL, cuDNN
    # handles) must land on this rank's GPU, not on GPU 0.
    select_device(chosen)
    _current = World(**{**world.__dict__, "device": chosen})
    return _current


def current_world():
    """The World that init() made, or None before init()."""
    return _current
