"""DecentralizedOptimizer's arguments, each resolved to the object it names, or refused.

A name, a dict or an object for the topology, the policy and the straggler
model; a dict or an object for the emulated accelerator; the loss mode this MPI can honour; the wrapped optimizer against the
model. Every refusal is one UserError that says what to pass instead.
"""

import sys

import torch

from aau_mpi.algorithms.policies import Policy, build_policy
from aau_mpi.algorithms.emulation import EmulatedAccelerator
from aau_mpi.algorithms.stragglers import Straggler, build_straggler
from aau_mpi.algorithms.graphs import Graph
from aau_mpi.algorithms.topology import load_topology
from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.settings import ON_RANK_LOSS
from aau_mpi.comm.survivors import unsupported_reason
from aau_mpi.comm.world import install_abort_hook


def check_wrapped(world, optimizer):
    """init() was called, and `optimizer` is a torch optimizer."""
    if world is None:
        install_abort_hook()  # so that this error is one line and ends the job
        raise UserError("aau_mpi.init() was not called: call ctx = aau_mpi.init() first, "
                        "then build the model on ctx.device and the optimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"DecentralizedOptimizer wraps a torch.optim optimizer, got "
                        f"{type(optimizer).__name__}: pass e.g. torch.optim.SGD(model."
                        f"parameters(), lr=0.1)")


def check_covers_model(optimizer, params):
    """The wrapped optimizer updates only the model's parameters."""
    wrapped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not wrapped <= {id(p) for p in params.params}:
        raise UserError("the torch optimizer updates tensors that are not the model's "
                        "parameters: build it from model.parameters() of the model you pass")


def check_model_unchanged(params):
    """Before each step: the model handed in still trains in place, as it was wrapped."""
    if not params.views_intact():
        raise UserError("the model's parameters were moved or replaced after the "
                        "DecentralizedOptimizer was built (e.g. model.to() or "
                        "load_state_dict(assign=True)): move the model to its device "
                        "before wrapping it, and load weights with copy semantics")
    if not params.frozen_unchanged():
        raise UserError("a parameter that was frozen (requires_grad=False) when the "
                        "DecentralizedOptimizer was built requires grad now: it would "
                        "train on each rank without being averaged; call finish() and "
                        "build a new DecentralizedOptimizer to change what is trained")


def rank_loss_mode(on_rank_loss, world):
    """on_rank_loss as this MPI can honour it: continue needs ULFM (else abort, said once)."""
    checks.choice("on_rank_loss", on_rank_loss, ON_RANK_LOSS)
    reason = unsupported_reason() if on_rank_loss == "continue" else None
    if reason:
        if world.rank == 0:
            print(f"warning: {reason}", file=sys.stderr, flush=True)
        return "abort"
    return on_rank_loss


def resolve_topology(topology, size):
    if isinstance(topology, Graph):
        if topology.n != size:
            raise UserError(f"topology {topology.name} has {topology.n} nodes but the job has "
                            f"{size} ranks: build it for {size} ranks")
        return topology
    return load_topology(topology, size)


def resolve_policy(policy, graph, rank, on_rank_loss):
    if isinstance(policy, Policy):
        if on_rank_loss == "continue" and not hasattr(policy, "spec"):
            raise UserError("on_rank_loss=continue rebuilds the policy for the survivors' graph: "
                            "pass policy= as a name or a dict, or build it with "
                            "aau_mpi.build_policy")
        return policy
    if isinstance(policy, dict):
        params = {key: value for key, value in policy.items() if key != "name"}
        return build_policy(policy.get("name", "aau"), graph, rank, params)
    return build_policy(policy, graph, rank)


def resolve_emulation(emulate, rank):
    """None (real compute), an EmulatedAccelerator, or a dict of its arguments."""
    if emulate is None or isinstance(emulate, EmulatedAccelerator):
        return emulate
    if not isinstance(emulate, dict):
        raise UserError(f"emulate must be a dict such as {{'step_seconds': 0.05}} or an "
                        f"EmulatedAccelerator, got {type(emulate).__name__}")
    unknown = sorted(set(emulate) - {"step_seconds", "jitter", "seed"})
    if unknown or "step_seconds" not in emulate:
        raise UserError(f"emulate takes step_seconds (required), jitter and seed, got "
                        f"{sorted(emulate)}: e.g. {{'step_seconds': 0.05, 'jitter': 0.1}}")
    return EmulatedAccelerator(rank=rank, **emulate)


def resolve_straggler(stragglers, rank, size):
    if isinstance(stragglers, Straggler):
        return stragglers
    if stragglers is None:
        return build_straggler("none", rank, size)
    if isinstance(stragglers, dict):
        params = {key: value for key, value in stragglers.items() if key != "name"}
        return build_straggler(stragglers.get("name", "none"), rank, size, params)
    return build_straggler(stragglers, rank, size)


