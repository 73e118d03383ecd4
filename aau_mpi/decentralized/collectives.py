"""Collectives over the flat parameter vector, each waited for without blocking.

A rank blocked in a collective stops depositing and stops serving the job's
events; so every collective here is started non-blocking and completed by
`wait_for`, which calls the caller's `idle` (serve events, watch for a lost
rank, feed the watchdog) between polls. They run at set-up (the same model
everywhere, x0 from rank 0), inside an evaluation (`averaged()`) and in
`finish()` (the global average, the counters, a diverged model's rescue).
"""

import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from aau_mpi.base.errors import UserError
from aau_mpi.comm.mailbox import Backoff

# Every microsecond between a deposit (or a collective's completion) and
# this rank noticing it adds to the iteration: poll at least every 0.1 ms
# (a 1 ms cap made LeNet iterations on digits 1.6x slower, for every policy,
# 4 ranks on 2 cores). Ranks oversubscribed beyond 2 per core poll less
# often, with the square of the excess (poll_cap): there, a waiting rank's
# polls take the core that the neighbour it waits for needs, and every one
# of its many neighbours polls too. 64 ranks on 2 cores (32 per core) spent
# 94 % of their time waiting with a 1.6 ms cap, most of the cores' time in
# polls (~40 us each); an iteration there takes over 100 ms anyway.
POLL_CAP = 1e-4


def poll_cap(world):
    """This rank's longest sleep between polls (POLL_CAP, longer when oversubscribed)."""
    return POLL_CAP * max(1.0, world.local_size / (2 * world.cores_per_node)) ** 2


def wait_for(request, idle=None, cap=POLL_CAP):
    """Complete a non-blocking MPI request, calling `idle` while it is pending.

    Waiting in Test rather than in a blocking call lets the caller serve
    events and watch for a rank that never arrives.
    """
    backoff = Backoff(cap=cap)
    while not request.Test():
        backoff.wait()
        if idle:
            idle()


# ---- at set-up: one model, one set of settings, one x0 ---------------------------

def check_agreement(comm, params, policy, graph, batch_size, checksum):
    """Collective, one allgather: every rank must train the same architecture, with
    the same parameters frozen (the mailbox holds what each rank trains), and
    the same settings. A rank with another policy reads misaligned slots, one
    with another topology deposits where nobody reads, and neither ends before
    the watchdog does: refuse at once, naming the first setting that differs."""
    shapes = tuple((tuple(p.shape), p.requires_grad) for p in params.params)
    mine = {"model": (params.numel, params.shared_numel, hash(shapes)),
            "policy": describe_policy(policy),
            "mailbox slots per neighbour": policy.slots_per_neighbour,
            # (name, digest of the edges): O(1) per rank, where the mailbox's own
            # check gathers neighbour lists
            "topology": (graph.name, zlib.crc32(repr((graph.directed, graph.edges)).encode())),
            "batch size": batch_size,
            "checksum": bool(checksum)}
    everyone = comm.allgather(mine)
    models = {theirs["model"] for theirs in everyone}
    if len(models) > 1:
        numels = sorted({(n, shared) for n, shared, _ in models})
        raise UserError(f"ranks built different models ({len(models)} kinds; "
                        f"(values, communicated values) {numels}): build the same model, "
                        f"with the same parameters frozen, on every rank")
    for setting in mine:
        values = [theirs[setting] for theirs in everyone]
        if len(set(values)) > 1:
            raise UserError(f"ranks disagree on {setting}: {_who_passes(values)}: "
                            f"pass the same settings on every rank")


def describe_policy(policy):
    """A policy as the user named it: "aau", "aau(tau=8)", or a Policy's class name."""
    if not hasattr(policy, "spec"):
        return type(policy).__name__
    name, params = policy.spec
    if not params:
        return name
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in sorted(params.items()))})"


def _rank_list(ranks):
    """[0, 2, 3, 4, 5] -> "0,2-5": runs of three or more ranks as a range."""
    runs = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}"
                    for a, b in runs)


def _who_passes(values):
    """"rank 0,2,3 aau, rank 1 dpsgd": which ranks pass which value (rank i passed
    values[i]). A (name, digest) value reads as its name, with the digest where
    two values share a name."""
    ranks = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    names = [value[0] if isinstance(value, tuple) else value for value in ranks]
    if len(set(names)) < len(names):
        names = [" #".join(map(str, value)) if isinstance(value, tuple) else value
                 for value in ranks]
    return ", ".join(f"rank {_rank_list(who)} {name}" for who, name in zip(ranks.values(), names))


def check_own_state(comm, state):
    """Collective: every rank loads its own state_dict (the same rank of a job of the
    same size); one rank's state loaded everywhere holds that rank's policy state
    (its neighbours) and sample count: refused on every rank."""
    rank, size = comm.Get_rank(), comm.Get_size()
    origin = (state.get("rank", rank), state.get("world_size", size))
    foreign = comm.allreduce(int(origin != (rank, size)))
    if foreign:
        raise UserError(f"load_state_dict: {foreign} of {size} ranks got another "
                        f"rank's state_dict() (one rank's state loaded on every rank?): "
                        f"each rank loads its own, or a Checkpointer restores them; to "
                        f"start every rank from one saved model, load it into the model "
                        f"before wrapping it")


def broadcast_initial_model(comm, params):
    """Spec section 3: x_0 identical on every rank (rank 0's)."""
    host = params.host_copy()
    comm.Bcast(host, root=0)
    if params.device.type != "cpu":
        params.load_(host)


# ---- the global average ------------------------------------------------------------

def global_average(comm, params, idle, cap):
    """(this rank's communicated vector, the average of every rank's), in float64 sums."""
    own = params.shared.detach().clone()
    mine = own.cpu().numpy().astype(np.float64)
    total = np.empty_like(mine)
    wait_for(comm.Iallreduce(mine, total), idle, cap)
    return own, torch.from_numpy((total / comm.Get_size()).astype(np.float32))


def equal_counters(comm, params, idle, cap):
    """Every integer buffer (BatchNorm's num_batches_tracked) takes the largest count
    of any rank. They count steps, so they are not averaged, but ranks take
    different numbers of steps and the final models must be one model."""
    counters = [owner._buffers[name] for owner, name in params.counters]
    if not counters:
        return
    mine = np.concatenate([c.detach().cpu().numpy().astype(np.int64).ravel()
                           for c in counters])
    largest = np.empty_like(mine)
    wait_for(comm.Iallreduce(mine, largest, op=MPI.MAX), idle, cap)
    offset = 0
    for counter in counters:
        counter.copy_(torch.from_numpy(largest[offset:offset + counter.numel()])
                      .view_as(counter))
        offset += counter.numel()


def save_diverged(comm, model, params, original_rank, base):
    """Collective, when the average holds NaN or inf: every rank saves its own last
    model (its state_dict, torch.save) as rank-NNNNN.pt (its original rank) in
    a new folder diverged-<time>-<random> of `base`; nothing there is
    overwritten. Returns the error's line."""
    folder = None
    if comm.Get_rank() == 0:
        try:
            base.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(
                prefix=f"diverged-{time.strftime('%Y%m%d-%H%M%S')}-", dir=base))
        except OSError as error:
            folder = " ".join(str(error).split())
    folder = comm.bcast(folder, root=0)
    problem = None
    if isinstance(folder, Path):
        try:
            torch.save({name: value.detach().cpu() for name, value in model.state_dict().items()},
                       folder / f"rank-{original_rank:05d}.pt")
        except OSError as error:
            problem = " ".join(str(error).split())
    else:
        problem = folder
    finite = bool(torch.isfinite(params.shared).all())
    reports = comm.allgather((original_rank, finite, problem))
    bad = [rank for rank, finite, _ in reports if not finite]
    problems = [f"rank {rank}: {problem}" for rank, _, problem in reports if problem]
    saved = (f"each rank's last model is saved as {folder}/rank-NNNNN.pt "
             f"(model.load_state_dict(torch.load(path)))" if not problems else
             f"the ranks' last models could not be saved under {base} "
             f"({'; '.join(problems)})")
    return (f"training diverged: rank(s) {bad} hold NaN or inf in their parameters, and so "
            f"does their average: {saved}; lower the learning rate")


class Averaged:
    """`with opt.averaged() as averaged:` the model holds the global average x_bar, and
    `averaged.own` this rank's x_i, put back at the end of the block.

    run(action): the optimizer's survival (a lost rank: averaged again over the
    survivors); average(): (own, average) by global_average, over the members now.
    """

    def __init__(self, run, params, average):
        self.run, self.params, self.average = run, params, average
        self.own = None

    def __enter__(self):
        result = {}

        def average():
            result["own"], result["average"] = self.average()
        while not self.run(average):
            pass
        self.own = result["own"]
        self.params.shared.copy_(result["average"])
        return self

    def __exit__(self, *exc):
        self.params.shared.copy_(self.own)
