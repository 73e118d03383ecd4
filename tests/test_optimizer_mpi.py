"""Every policy through the real DecentralizedOptimizer, mailbox and windows (spec sections 3, 4).

A least-squares problem with non-IID shards, as a torch module trained by a
plain torch loop: rank i holds rows A_i (their own scale and offset) and
targets b_i = A_i x_true + noise_i, so the shards' own optima differ and only
the average of the ranks' objectives has the global optimum x_opt.
"""

import itertools
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

import aau_mpi
from aau_mpi.decentralized import checkpoint
from aau_mpi.decentralized.events import JobEvents
from aau_mpi.algorithms.schedule import Schedule
from aau_mpi.algorithms.stragglers import Straggler
from aau_mpi.algorithms.graphs import Graph, generate
from user_models import CONTEXT, VOCAB, WIDTH, FineTuned

comm = MPI.COMM_WORLD
DIM, ROWS = 8, 40


def shard(i):
    rng = np.random.default_rng(100 + i)
    a = rng.standard_normal((ROWS, DIM)) * (1 + 0.5 * i) + 0.3 * i
    x_true = np.random.default_rng(0).standard_normal(DIM)
    b = a @ x_true + rng.standard_normal(ROWS) * (0.5 + i)
    return torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))


class LeastSquares(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(DIM))

    def loss(self, a, b):
        residual = a @ self.x - b
        return (residual * residual).sum() / (2 * ROWS)


def global_optimum(n):
    shards = [shard(i) for i in range(n)]
    a = np.vstack([s[0].numpy() for s in shards]).astype(np.float64)
    b = np.concatenate([s[1].numpy() for s in shards]).astype(np.float64)
    return np.linalg.lstsq(a, b, rcond=None)[0]


class SlowRank(Straggler):
    """`rank` sleeps (slowdown - 1) x its step, counted as at least 0.5 ms: the
    gradient takes microseconds, and the sleep must outweigh the loop's overheads."""

    def __init__(self, rank, slow_rank, slowdown):
        self.slow, self.slowdown = rank == slow_rank, slowdown

    def delay(self, step_seconds, now):
        return (self.slowdown - 1) * max(step_seconds, 0.0005) if self.slow else 0.0

    def describe(self):
        return f"rank slowed {self.slowdown:g}x"


class SleepingRank(Straggler):
    """`rank` sleeps `seconds` after every step, however long the step took."""

    def __init__(self, rank, slow_rank, seconds):
        self.seconds = seconds if rank == slow_rank else 0.0

    def delay(self, step_seconds, now):
        return self.seconds

    def describe(self):
        return f"rank sleeps {self.seconds:g} s a step"


def train(policy, lr, slow_rank=None, slowdown=1.0, topology="ring", iterations=None,
          sample_budget=None, overlap="auto", device="cpu", straggler=None, watchdog=None,
          emulate=None):
    """The user's loop on this rank's shard; returns (own x, averaged x, records).
    `straggler` replaces the SlowRank(slow_rank, slowdown) one; `watchdog`: seconds
    of waiting after which the job ends (a deadlock fails fast), None: off;
    `emulate`: the emulated accelerator's arguments."""
    world = aau_mpi.init(device=device)
    a, b = (t.to(world.device) for t in shard(comm.rank))
    model = LeastSquares().to(world.device)
    sgd = torch.optim.SGD(model.parameters(), lr=lr(0))
    opt = aau_mpi.DecentralizedOptimizer(
        sgd, model, policy=policy, topology=topology, world=world, batch_size=1,
        schedule=Schedule(sample_budget=sample_budget), watchdog=watchdog, overlap=overlap,
        stragglers=straggler or SlowRank(comm.rank, slow_rank, slowdown), emulate=emulate)
    records = []
    while not opt.should_stop() and (iterations is None or opt.iteration < iterations):
        for group in opt.param_groups:
            group["lr"] = lr(opt.iteration)
        opt.zero_grad()
        model.loss(a, b).backward()
        opt.step()
        records.append(opt.last)
    own = model.x.detach().cpu().numpy().copy()
    opt.finish()
    return own, model.x.detach().cpu().numpy().copy(), records


def metropolis(graph):
    """Metropolis-Hastings weights from the edge list alone (not mixing_row/matrix)."""
    degree = {i: 0 for i in range(graph.n)}
    for i, j in graph.edges:
        degree[i] += 1
        degree[j] += 1
    w = np.zeros((graph.n, graph.n))
    for i, j in graph.edges:
        w[i, j] = w[j, i] = 1.0 / (1 + max(degree[i], degree[j]))
    w[np.diag_indices(graph.n)] = 1 - w.sum(axis=1)
    return lambda k: w


def one_peer(n):
    """W_k of the one-peer exponential graph, from its definition."""
    hops = [2 ** h for h in range((n - 1).bit_length())]

    def weights(k):
        w = np.eye(n) * 0.5
        for i in range(n):
            w[i, (i - hops[k % len(hops)]) % n] += 0.5
        return w
    return weights


def simulate_dpsgd(n, iterations, lr, weights):
    """One process: x_{k+1} = W_k x_k - lr G_k, with the same torch operations
    (float32 gradient by autograd, mix by weight, SGD step) in the same order."""
    models = [LeastSquares() for _ in range(n)]
    sgds = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    shards = [shard(i) for i in range(n)]
    for k in range(iterations):
        for m, s, (a, b) in zip(models, sgds, shards):
            s.zero_grad()
            m.loss(a, b).backward()
        xs = [m.x.detach().clone() for m in models]
        w = weights(k)
        with torch.no_grad():
            for i, m in enumerate(models):
                mixed = xs[i] * w[i, i]
                for j in np.flatnonzero(w[i]):
                    if j != i:
                        mixed += xs[j] * w[i, j]
                m.x.copy_(mixed)
        for s in sgds:
            s.step()
    return [m.x.detach().numpy() for m in models]


def uniform_directed(graph):
    """The directed graph's uniform weights from the edge list alone: rank i gives
    itself and each in-neighbour 1/(in-degree + 1) (row-stochastic)."""
    w = np.eye(graph.n)
    for i, j in graph.edges:
        w[j, i] = 1.0
    w /= w.sum(axis=1, keepdims=True)
    return lambda k: w


def unequal_degrees(n):
    """A connected graph whose degrees differ (1 to n-1): Metropolis weights are not uniform."""
    edges = [(0, j) for j in range(1, n)] + [(1, 2)] + ([(2, 3)] if n > 4 else [])
    return Graph(n, edges, name=f"star_plus(n={n})")


GRAPHS = {"ring": lambda n: (generate("ring", n), metropolis(generate("ring", n))),
          "unequal": lambda n: (unequal_degrees(n), metropolis(unequal_degrees(n))),
          "one_peer": lambda n: (generate("exponential_one_peer", n), one_peer(n))}


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("graph_name,slow_rank,overlap", [
    ("ring", None, "inline"), ("ring", 2, "thread"), ("unequal", None, "thread"),
    ("unequal", 2, "inline"), ("one_peer", None, "inline"), ("one_peer", 2, "thread")])
def test_dpsgd_equals_the_synchronous_recursion(graph_name, slow_rank, overlap):
    graph, weights = GRAPHS[graph_name](comm.size)
    x, _, records = train("dpsgd", lambda k: 0.02, slow_rank=slow_rank, slowdown=5.0,
                          topology=graph, iterations=40, overlap=overlap, watchdog=60.0)
    check_the_recursion(graph, weights, x, records, 40)


def check_the_recursion(graph, weights, x, records, iterations):
    """Every active neighbour mixed at its iteration k, and x is the recursion's."""
    expected = simulate_dpsgd(comm.size, iterations, 0.02, weights)[comm.rank]
    assert len(records) == iterations
    for record in records:
        assert sorted(record.averaged) == sorted(graph.active_in(comm.rank, record.iteration)), \
            "dpsgd must average every active neighbour every iteration"
    assert all(s == 0 for r in records for s in r.staleness)
    relative = np.linalg.norm(x - expected) / np.linalg.norm(expected)
    assert relative <= 1e-6, f"rank {comm.rank}: {relative:.2e} from the simulation"


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("overlap", ["inline", "thread"])
def test_dpsgd_on_a_directed_graph_waits_out_a_sleeping_rank(overlap):
    """Issue 20: on the directed exponential graph of 4 ranks rank 3 deposits into
    rank 0 but hears from it only over two hops (0 -> 2 -> 3), so it can deposit
    its iteration 2 while rank 0, asleep, has not read its iteration 0. With two
    slots by parity, x_2 replaced x_0 and rank 0 waited for ever (the watchdog
    ends that job here); with a slot per iteration in flight, the run is the
    synchronous recursion x_{k+1} = W x_k - lr G_k, W the graph's uniform weights."""
    graph = generate("exponential", comm.size, {"directed": True})
    x, _, records = train("dpsgd", lambda k: 0.02, topology=graph, iterations=8,
                          overlap=overlap, straggler=SleepingRank(comm.rank, 0, 0.2),
                          watchdog=20.0)
    check_the_recursion(graph, uniform_directed(graph), x, records, 8)


@pytest.mark.mpi(min_size=2)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU visible here)")
@pytest.mark.parametrize("policy", ["dpsgd", "allreduce"])
def test_the_device_path_equals_the_cpu_path(policy):
    """Parameters on the GPU (staging, device-side mix and step) give the CPU's
    result, to 1e-5 over 20 iterations (deterministic policies only)."""
    x_cpu, _, _ = train(policy, lambda k: 0.02, iterations=20)
    x_gpu, _, records = train(policy, lambda k: 0.02, iterations=20, device="cuda",
                              overlap="thread")
    assert np.linalg.norm(x_gpu - x_cpu) <= 1e-5 * np.linalg.norm(x_cpu)
    if policy == "dpsgd":
        assert all(r.copy_seconds > 0 for r in records[1:]), "device copies were made"


@pytest.mark.mpi(min_size=2)
def test_allreduce_equals_sgd_on_the_averaged_gradient():
    x, average, _ = train("allreduce", lambda k: 0.02, iterations=30)
    shards = [shard(i) for i in range(comm.size)]
    expected = np.zeros(DIM, np.float64)
    for _ in range(30):
        g = sum(a.numpy().T.astype(np.float64) @ (a.numpy() @ expected - b.numpy()) / ROWS
                for a, b in shards) / comm.size
        expected = expected - 0.02 * g
    assert np.allclose(x, expected, rtol=1e-4, atol=1e-5)
    assert np.allclose(average, x, rtol=1e-6), "all ranks hold the same model"


def decaying(k):
    return 0.05 / (1 + k / 100)


# How far from the optimum each policy's averaged model may end. Wait-free
# gossip never waits for the straggler, so its shard is under-represented and
# the average leans towards the fast ranks' data (spec section 4): measured
# 0.15-0.16 of |x_opt| with a 10x straggler, against 0.02-0.06 for fixed_k and
# aau, which bound how long the straggler's information can be skipped.
LEAN_BOUND = {"async": 0.25, "async_one": 0.25, "fixed_k": 0.1, "aau": 0.1}


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("policy", [
    "async", {"name": "async_one", "seed": 1}, {"name": "fixed_k", "k": 1},
    "aau", {"name": "aau", "rate_scaled": False}, {"name": "aau", "tau": 2, "gamma": 0.5},
], ids=["async", "async_one", "fixed_k", "aau", "aau-noscale", "aau-tau2-gamma"])
@pytest.mark.parametrize("slowdown", [1.0, 10.0])
def test_asynchronous_policies_reach_consensus_near_the_optimum(policy, slowdown):
    name = policy if isinstance(policy, str) else policy["name"]
    x_opt = global_optimum(comm.size)
    x, average, records = train(policy, decaying, slow_rank=1, slowdown=slowdown,
                                sample_budget=6000)
    consensus = np.linalg.norm(x - average) / np.linalg.norm(x_opt)
    error = np.linalg.norm(average - x_opt) / np.linalg.norm(x_opt)
    iterations = comm.gather(len(records), root=0)
    if comm.rank == 0:
        print(f"\n{policy} slowdown {slowdown}: iterations {iterations}, "
              f"error of the average {error:.3f}")
    assert consensus < 0.05, f"rank {comm.rank} is {consensus:.3f} from the others' average"
    assert error < LEAN_BOUND[name], f"the averaged model is {error:.3f} from the optimum"


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("policy", ["dpsgd", "allreduce", "async", "async_one",
                                    {"name": "fixed_k", "k": 2}, "aau"],
                         ids=["dpsgd", "allreduce", "async", "async_one", "fixed_k", "aau"])
@pytest.mark.parametrize("topology", ["ring", "exponential_one_peer"])
def test_every_policy_finishes_with_a_50x_straggler(policy, topology):
    """A shared sample budget ends training; nobody waits for a finished rank."""
    _, average, records = train(policy, lambda k: 0.01, slow_rank=3, slowdown=50.0,
                                topology=topology, sample_budget=400)
    steps = comm.gather(len(records), root=0)
    if comm.rank == 0:
        assert sum(steps) >= 400, "the budget counts every rank's steps"
    assert np.isfinite(average).all()
    used = {j for r in records for j in r.averaged}
    if policy != "allreduce":
        assert used, f"rank {comm.rank} never mixed a neighbour"


class WriteConstant(torch.optim.Optimizer):
    """A 'step' that sets every parameter to one constant: a deposit of a whole x
    is constant, one that overlapped a step is not."""

    def __init__(self, params, value):
        super().__init__(params, {})
        self.value = value

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(self.value())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("policy", ["async", "allreduce"])
def test_an_emulated_step_lasts_the_modelled_time_and_the_slow_ranks_four_times_it(policy):
    """Each step's compute phase (the loop's real work plus the sleep) is the modelled
    step, 4x on the straggler, unless the real work overran it; either way the
    step's record says which."""
    step = 0.01
    straggler = aau_mpi.build_straggler("fixed", comm.rank, comm.size,
                                        {"ranks": [1], "slowdown": 4.0})
    _, _, records = train(policy, lambda k: 0.01, iterations=20, straggler=straggler,
                          emulate={"step_seconds": step})
    modelled = step * (4 if comm.rank == 1 else 1)
    assert len(records) == 20
    for record in records:
        if record.overran:
            assert record.delay == 0.0 and record.compute_seconds > modelled
        else:
            assert record.compute_seconds == pytest.approx(modelled)
            assert record.delay > 0
    assert not all(r.overran for r in records)


def evaluations_seen(straggler, emulate, seconds=0.6, every=0.05):
    """async, evaluations every `every` training seconds: for each evaluation on
    this rank, whether x was still the step's x_k (the step had not updated it)."""
    world = aau_mpi.init(device="cpu")
    a, b = shard(comm.rank)
    model = LeastSquares()
    before_step, seen = [None], []

    def on_evaluation(number):
        seen.append(bool(torch.equal(model.x.detach(), before_step[0])))
    opt = aau_mpi.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), model, policy="async", world=world,
        schedule=Schedule(time_budget=seconds, eval_seconds=every), watchdog=None,
        on_evaluation=on_evaluation, stragglers=straggler, emulate=emulate)
    while not opt.should_stop():
        opt.zero_grad()
        model.loss(a, b).backward()
        before_step[0] = model.x.detach().clone()
        opt.step()
    opt.finish()
    return seen


@pytest.mark.mpi(min_size=2)
def test_a_straggler_on_an_emulated_device_joins_evaluations_while_it_computes():
    """Its host is idle while the device computes: it serves the evaluations that the
    others announce then, at the step's x_k, instead of keeping them at the barrier
    until its 0.25 s step ends (every 0.05 s of training, that was most of their time)."""
    straggler = aau_mpi.build_straggler("fixed", comm.rank, comm.size,
                                        {"ranks": [1], "slowdown": 25.0})
    seen = evaluations_seen(straggler, {"step_seconds": 0.01})
    if comm.rank == 1:
        assert any(seen), f"every evaluation waited for the end of a step: {seen}"


@pytest.mark.mpi(min_size=2)
def test_waiting_at_an_evaluations_barrier_is_not_training_time():
    """The others announce an evaluation at 0.5 s of training and wait at its barrier
    while rank 1 computes until 0.95 s (short of the next evaluation's 1 s);
    their training clocks leave the wait out, also inside the evaluation (the time
    an evaluation's record carries: it included the wait, so that a long wait at
    one evaluation put it after the next one)."""
    started = time.monotonic()
    during = []
    events = JobEvents(comm, Schedule(eval_seconds=0.5), time.monotonic,
                       on_evaluation=lambda number: during.append(events.training_seconds()))
    time.sleep(0.52 if comm.rank != 1 else 0.95)
    events.count(1)  # every rank serves evaluation 1
    training, wall = events.training_seconds(), time.monotonic() - started
    events.close()
    assert events.completed == 1
    if comm.rank == 0:
        assert wall >= 0.95 and training < 0.75 and during[0] < 0.75, (training, during, wall)


@pytest.mark.mpi(min_size=2)
def test_an_overlapped_deposit_never_carries_a_half_updated_x():
    """Contract 2 with the communication thread: step k+1 rewrites x as soon as the
    user's loop calls it while deposit k, 32 MB, may still be in flight; every
    payload a neighbour reads must be one whole x (without `depositor.wait()`
    before the mix, this fails with hundreds of mixed payloads)."""
    floats = 8 << 20
    world = aau_mpi.init(device="cpu")
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.zeros(floats))
    counter = itertools.count(1)
    inner = WriteConstant(model.parameters(), lambda: float(comm.rank * 100_000 + next(counter)))
    opt = aau_mpi.DecentralizedOptimizer(inner, model, policy="async", topology="ring",
                                         world=world, watchdog=None, overlap="thread")
    assert opt.depositor.threaded, "this MPI gives MPI_THREAD_MULTIPLE: deposits overlap"
    checked = mixed = 0
    buffer = np.empty(floats, np.float32)
    for _ in range(60):
        opt.step()  # no compute at all: the next step follows the deposit at once
        for j in range(len(opt.mailbox.in_neighbours)):
            got = opt.mailbox.read(j, out=buffer)
            if got is None or got[0]["seq"] == 0:
                continue
            checked += 1
            if buffer[0] != buffer[-1] or not np.all(buffer == buffer[0]):
                mixed += 1
    opt.finish()
    assert comm.allreduce(checked) > 20, "too few payloads read to exercise the race"
    assert comm.allreduce(mixed) == 0, "a deposit carried a half-updated x"


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class SetRunningStatistics(torch.optim.Optimizer):
    """A 'step' that sets a BatchNorm's running statistics to a new positive constant."""

    def __init__(self, params, batchnorm, value):
        super().__init__(params, {})
        self.batchnorm, self.value = batchnorm, value

    @torch.no_grad()
    def step(self, closure=None):
        value = self.value()
        self.batchnorm.running_mean.fill_(value)
        self.batchnorm.running_var.fill_(value)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("device", DEVICES)
def test_a_forward_pass_between_steps_never_reaches_a_deposit_in_flight(device):
    """A deposit is x as of the end of step(), whatever the loop does next. Each
    step ends with the running statistics of a BatchNorm at a positive constant;
    right after it, while that step's deposit may still be in flight on the
    communication thread, a forward pass in train mode (momentum 1, a constant
    negative input) rewrites them in place: mean negative, variance 0. The
    communication thread starts each deposit only once that forward is done (as
    on a busy node, where it waits for a core), so the race always goes the bad
    way. Every payload a neighbour reads must hold one positive constant there
    (before deposits took a snapshot of x, they carried the forward's
    statistics)."""
    features = 1 << 20
    world = aau_mpi.init(device=device)
    model = torch.nn.BatchNorm1d(features, momentum=1.0, affine=False)
    model.unused = torch.nn.Parameter(torch.zeros(1))  # x: this, the running mean, the variance
    model.running_mean.fill_(0.5)  # x_0, the first deposit
    model.running_var.fill_(0.5)
    model = model.to(world.device)
    counter = itertools.count(1)
    inner = SetRunningStatistics(model.parameters(), model,
                           lambda: float(comm.rank * 100_000 + next(counter)))
    opt = aau_mpi.DecentralizedOptimizer(inner, model, policy="async", topology="ring",
                                         world=world, watchdog=None, overlap="thread")
    assert opt.depositor.threaded, "this MPI gives MPI_THREAD_MULTIPLE: deposits overlap"
    deposit, forwarded = opt.mailbox.deposit, threading.Event()

    def deposit_after_the_forward(*args, **kwargs):
        forwarded.wait(timeout=30)
        forwarded.clear()
        deposit(*args, **kwargs)
    opt.mailbox.deposit = deposit_after_the_forward
    statistics = slice(1, 1 + 2 * features)
    checked = wrong = 0
    buffer = np.empty(opt.params.numel, np.float32)
    inputs = torch.full((2, features), -1.0 - comm.rank, device=world.device)
    for _ in range(40):
        opt.step()
        model(inputs)
        forwarded.set()
        for j in range(len(opt.mailbox.in_neighbours)):
            got = opt.mailbox.read(j, out=buffer)
            if got is None or got[0]["seq"] == 0 or got[0]["done"]:
                continue  # (finish()'s deposit carries x as of finish(), after a forward)
            checked += 1
            wrong += int(buffer[1] <= 0 or not np.all(buffer[statistics] == buffer[1]))
    opt.mailbox.deposit = deposit
    opt.finish()
    assert comm.allreduce(checked) > 20, "too few payloads read to exercise the race"
    assert comm.allreduce(wrong) == 0, "a deposit carried what the loop wrote after step()"


@pytest.mark.mpi(min_size=2)
def test_api_misuse_is_a_user_error_on_every_rank():
    world = aau_mpi.init(device="cpu")
    model = LeastSquares()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    # Ranks that build different models are refused on every rank, collectively.
    wrong = LeastSquares() if comm.rank else torch.nn.Linear(DIM, 2)
    with pytest.raises(aau_mpi.UserError, match="ranks built different models"):
        aau_mpi.DecentralizedOptimizer(torch.optim.SGD(wrong.parameters(), lr=0.1), wrong,
                                       world=world)
    opt = aau_mpi.DecentralizedOptimizer(sgd, model, world=world, watchdog=None)
    with pytest.raises(aau_mpi.UserError, match="wraps a torch.optim optimizer"):
        aau_mpi.DecentralizedOptimizer(object(), model, world=world)
    model.double().float()
    with pytest.raises(aau_mpi.UserError, match="moved or replaced"):
        opt.step()
    for p, _, offset in opt.params._places:  # views back (LeastSquares has no buffers)
        p.data = opt.params.flat[offset:offset + p.numel()].view_as(p)
    opt.finish()
    with pytest.raises(aau_mpi.UserError, match="is closed"):
        opt.step()


@pytest.mark.mpi(min_size=4)
def test_batchnorm_statistics_are_averaged_with_the_weights():
    """Each rank's inputs carry their own offset (-3 to 3), so alone each rank's
    BatchNorm would learn its own running mean. The buffers are in the flat
    vector, so they are mixed with the weights every step: every rank's mean
    stays near the ranks' average (0), and the final model holds exactly the
    average (before, buffers were never mixed and the final model carried
    rank 0's, about -3). (An accuracy comparison on everyone's test data was
    tried and dropped: with per-rank offsets no single set of statistics
    serves the pooled data, and both scored near chance.)"""
    world = aau_mpi.init(device="cpu")
    generator = torch.Generator().manual_seed(comm.rank)
    offsets = torch.linspace(-3, 3, comm.size)

    def data(rank, n, gen):
        z = torch.randn(n, 4, generator=gen)
        return z + offsets[rank], (z[:, 0] + z[:, 1] > 0).long()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                         policy="dpsgd", world=world, watchdog=None)
    for _ in range(150):
        x, y = data(comm.rank, 32, generator)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    own_mean = model[0].running_mean.clone()
    opt.finish()
    means = comm.allgather(own_mean)
    assert torch.allclose(model[0].running_mean, torch.stack(means).mean(0), atol=1e-6)
    for rank, mean in enumerate(means):  # mixed: far from the rank's own offset
        assert mean.abs().max() < 1.0, f"rank {rank} (offset {offsets[rank]:.1f}): {mean}"


@contextmanager
def shared_folder():
    """A temporary folder that every rank of the job writes in (one node)."""
    folder = Path(comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None, root=0))
    try:
        yield folder
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(folder)


def fine_tune(policy, iterations, checkpoints=None):
    """The user's loop on its own token stream; returns (model, opt, x_0's state, mask)."""
    world = aau_mpi.init(device="cpu")
    torch.manual_seed(comm.rank)  # different on every rank: the wrapper broadcasts rank 0's
    model = FineTuned()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    opt = aau_mpi.DecentralizedOptimizer(sgd, model, policy=policy, topology="ring",
                                         world=world, watchdog=None, checkpoints=checkpoints)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    mask = model.blocks[0].mask.clone()
    generator = torch.Generator().manual_seed(comm.rank)
    while opt.iteration < iterations:
        tokens = torch.randint(0, VOCAB, (16, CONTEXT), generator=generator)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1),
                                          tokens[:, 1:].flatten()).backward()
        opt.step()
    return model, opt, start, mask


FROZEN = ("backbone.weight", "backbone.bias")
# What is communicated: the trainable parameters (the tied weight once) and
# BatchNorm's running mean and variance.
SHARED = VOCAB * WIDTH + 2 * WIDTH + 3 + 2 * WIDTH


@pytest.mark.mpi(min_size=4)
def test_frozen_parameters_and_a_causal_mask_are_neither_sent_nor_changed():
    """Only trainable parameters and persistent floating buffers are deposited and
    mixed: the frozen backbone stays bit-identical (mixing equal values drifted it
    by rounding), and a causal mask of -inf neither trips the divergence checks of
    the periodic checkpoints and of finish() nor changes."""
    with shared_folder() as folder:
        checkpoints = aau_mpi.Checkpointer(folder, every_iterations=5)
        model, opt, start, mask = fine_tune("aau", 30, checkpoints)
        for name in FROZEN:
            assert torch.equal(model.state_dict()[name], start[name]), f"{name} moved"
        assert opt.mailbox.payload_size == SHARED, "only what training changes is sent"
        opt.finish()
        assert checkpoint.find_checkpoint(folder).is_file()
    for name in FROZEN:
        assert torch.equal(model.state_dict()[name], start[name]), f"{name} moved"
    assert torch.equal(model.blocks[0].mask, mask)
    assert not torch.equal(model.embed.weight, start["embed.weight"]), "it trained"


@pytest.mark.mpi(min_size=2)
def test_allreduce_leaves_frozen_and_unused_parameters_alone():
    """Parameters without a gradient on any rank keep .grad None: zeros would let
    weight decay (0.1 here) and momentum move them."""
    model, opt, start, _ = fine_tune("allreduce", 10)
    for name in FROZEN + ("unused",):
        assert torch.equal(model.state_dict()[name], start[name]), f"{name} moved"
    assert model.backbone.weight.grad is None and model.unused.grad is None
    assert model.embed.weight.grad is not None
    model.backbone.requires_grad_(True)  # trainable is what was trainable when wrapped
    with pytest.raises(aau_mpi.UserError, match="was frozen .* when the DecentralizedOptim"):
        opt.step()
    model.backbone.requires_grad_(False)
    opt.finish()


@pytest.mark.mpi(min_size=4)
def test_every_rank_ends_with_the_same_model_batchnorm_counters_included():
    """Ranks take different numbers of steps, so BatchNorm's num_batches_tracked
    differs; finish() gives every rank the largest, and so the same state_dict."""
    world = aau_mpi.init(device="cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 2))
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                         policy="aau", world=world, watchdog=None)
    generator = torch.Generator().manual_seed(comm.rank)
    while opt.iteration < 10 + comm.rank:
        opt.zero_grad()
        model(torch.randn(16, 4, generator=generator)).square().mean().backward()
        opt.step()
    assert int(model[1].num_batches_tracked) == 10 + comm.rank
    opt.finish()
    assert int(model[1].num_batches_tracked) == 10 + comm.size - 1
    first = comm.bcast(model.state_dict(), root=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, first[name]), f"{name} differs from rank 0's"


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("with_checkpoints", [False, True], ids=["cwd", "checkpointer"])
def test_a_diverged_run_saves_every_ranks_last_model_where_the_error_says(with_checkpoints,
                                                                          monkeypatch):
    """finish() finds NaN in the average (rank 1's model holds one): every rank's own
    last model is written, in the checkpointer's folder or else the current one,
    and the one-line error names it; the complete checkpoints stay as they were.
    (allreduce: ranks step in lockstep, so the NaN, set after the last step,
    reaches no other rank's model; under aau a neighbour still training mixes
    rank 1's final deposit.)"""
    with shared_folder() as folder:
        monkeypatch.chdir(folder)
        checkpoints = (aau_mpi.Checkpointer(folder / "checkpoints", every_iterations=4)
                       if with_checkpoints else None)
        model, opt, _, _ = fine_tune("allreduce", 12, checkpoints)
        if comm.rank == 1:
            with torch.no_grad():
                model.embed.weight[0, 0] = float("nan")
        own = {name: value.clone() for name, value in model.state_dict().items()}
        comm.Barrier()  # every rank's last periodic generation is committed
        newest = checkpoint.find_checkpoint(folder) if with_checkpoints else None
        with pytest.raises(aau_mpi.UserError, match="training diverged") as error:
            opt.finish()
        message = str(error.value)
        assert "\n" not in message and "rank(s) [1]" in message
        saved = Path(re.search(r"saved as (\S+)/rank-NNNNN\.pt", message)[1])
        assert saved.parent == (folder / "checkpoints" if with_checkpoints else folder)
        state = torch.load(saved / f"rank-{comm.rank:05d}.pt")
        assert state.keys() == own.keys()
        for name, value in own.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, equal_nan=True)
        if with_checkpoints:
            assert checkpoint.find_checkpoint(folder) == newest, "no diverged generation"
            manifest = checkpoint.read_manifest(newest)
            parameters = checkpoint.read_rank_state(manifest, comm.rank)[0]["params"]
            assert np.isfinite(parameters[:SHARED]).all()
        comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_a_state_saved_before_the_layout_resumes_into_its_places():
    """A state_dict (or checkpoint) written before frozen parameters were kept local
    has no parameters_layout: its vector is every parameter, then every floating
    buffer, and each value must land in the tensor it came from."""
    world = aau_mpi.init(device="cpu")
    torch.manual_seed(0)
    model, source = FineTuned(), FineTuned()
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                         world=world, watchdog=None)
    state = opt.state_dict()
    assert state.pop("parameters_layout") == 2
    floating = [b for b in source.buffers() if b.is_floating_point()]
    state["parameters"] = torch.cat([t.detach().reshape(-1)
                                     for t in list(source.parameters()) + floating])
    opt.load_state_dict(state)
    for name, value in source.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(model.state_dict()[name], value), name
    opt.finish()


def metric(rank, number):
    """Rank `rank`'s `number`-th posted metric: a float or a small tensor, by parity.
    Integer values: their float64 sums are exact in any order."""
    if number % 2 == 0:
        return float(rank * 1000 + number)
    return torch.tensor([[rank, -number], [1.0, rank * number]])


def check_averages(handles):
    """Every handle holds the exact average of the values posted as that number
    by the ranks that posted that many; returns every rank's post count."""
    counts = comm.allgather(len(handles))
    for number, handle in enumerate(handles):
        ranks = [r for r, count in enumerate(counts) if count > number]
        expected = sum(np.asarray(metric(r, number), np.float64) for r in ranks) / len(ranks)
        assert handle.ready() and handle.contributions == len(ranks), (number, handle)
        assert np.array_equal(handle.value, expected), (number, handle.value, expected)
        assert isinstance(handle.value, float) == (number % 2 == 0)
    return counts


@pytest.mark.mpi(min_size=2)
def test_metric_averages_pending_at_finish_complete_with_different_counts():
    """Rank r posts r + 1 metrics and never steps: finish() completes them all, and
    each average divides by the ranks that posted that metric."""
    world = aau_mpi.init(device="cpu")
    model = LeastSquares()
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                         world=world, watchdog=None)
    handles = [opt.average_metric(metric(comm.rank, n)) for n in range(comm.rank + 1)]
    assert not any(h.ready() for h in handles[1:]), "rank 0 posted one: none beyond can be"
    opt.finish()
    assert check_averages(handles) == [r + 1 for r in range(comm.size)]


@pytest.mark.mpi(min_size=4)
def test_metric_averages_complete_over_the_next_steps_with_a_straggler():
    """aau with a 10x straggler, a metric every 5 steps: posting never waits (the fast
    ranks post metrics the straggler never reaches), averages become ready during
    training, and every one is the exact average of the values posted as it."""
    world = aau_mpi.init(device="cpu")
    a, b = shard(comm.rank)
    model = LeastSquares()
    opt = aau_mpi.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), model, policy="aau", world=world,
        schedule=Schedule(sample_budget=2000), watchdog=None,
        stragglers=SlowRank(comm.rank, 1, 10.0))
    handles = []
    while not opt.should_stop():
        opt.zero_grad()
        model.loss(a, b).backward()
        opt.step()
        if opt.iteration % 5 == 0:
            handles.append(opt.average_metric(metric(comm.rank, len(handles))))
    ready_in_the_loop = sum(h.ready() for h in handles)
    opt.finish()
    counts = check_averages(handles)
    assert counts[1] < max(counts), f"the straggler posted as many metrics: {counts}"
    assert comm.allreduce(ready_in_the_loop) > 0, "no average completed during training"


# ---- the torch.optim.Optimizer face: hooks, schedulers, closures -------------------

@pytest.mark.mpi(min_size=2)
def test_torch_optimizer_hooks_fire_on_the_decentralized_optimizer():
    """torch's hooks, the optimizer's own and the global ones, fire around its step
    and its state dict, as on any torch optimizer."""
    world = aau_mpi.init(device="cpu")
    a, b = shard(comm.rank)
    model = LeastSquares()
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model,
                                         policy="dpsgd", world=world, watchdog=None)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.iteration)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.iteration)))
    opt.register_state_dict_pre_hook(lambda o: calls.append("state_dict pre"))
    opt.register_state_dict_post_hook(lambda o, state: calls.append("state_dict post"))
    opt.register_load_state_dict_pre_hook(lambda o, state: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    def global_hook(what):
        def hook(optimizer, args, kwargs):
            if optimizer is opt:  # the wrapped SGD's step fires them too
                calls.append(what)
        return hook
    handles = [register_optimizer_step_pre_hook(global_hook("global pre")),
               register_optimizer_step_post_hook(global_hook("global post"))]
    try:
        opt.load_state_dict(opt.state_dict())  # (before the first step: it is collective)
        for _ in range(2):
            opt.zero_grad()
            model.loss(a, b).backward()
            opt.step()
    finally:
        for handle in handles:
            handle.remove()
    opt.finish()
    assert calls == ["state_dict pre", "state_dict post", "load pre", "load post",
                     "global pre", ("pre", 0), ("post", 1), "global post",
                     "global pre", ("pre", 1), ("post", 2), "global post"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("on", ["decentralized", "wrapped"])
def test_a_torch_scheduler_on_either_optimizer_sets_the_step_lr(on):
    """StepLR on the DecentralizedOptimizer or on the optimizer it wraps: both set
    the rate the wrapped step uses (one param_groups)."""
    world = aau_mpi.init(device="cpu")
    a, b = shard(comm.rank)
    model = LeastSquares()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = aau_mpi.DecentralizedOptimizer(sgd, model, policy="dpsgd", world=world, watchdog=None)
    scheduler = torch.optim.lr_scheduler.StepLR(opt if on == "decentralized" else sgd,
                                                step_size=2, gamma=0.5)
    used = []
    sgd.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    for _ in range(6):
        opt.zero_grad()
        model.loss(a, b).backward()
        opt.step()
        scheduler.step()
    opt.finish()
    assert used == [0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025]
    assert opt.param_groups is sgd.param_groups


def mean_objective_lbfgs(n, steps, **options):
    """One process: LBFGS on the mean of the ranks' objectives, the same closure."""
    shards = [shard(i) for i in range(n)]
    model = LeastSquares()
    lbfgs = torch.optim.LBFGS(model.parameters(), **options)

    def closure():
        lbfgs.zero_grad()
        loss = sum(model.loss(a, b) for a, b in shards) / n
        loss.backward()
        return loss
    for _ in range(steps):
        lbfgs.step(closure)
    return model.x.detach().numpy()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("policy", ["allreduce", "dpsgd", "aau"])
def test_lbfgs_trains_through_closures(policy):
    """A closure optimizer: the wrapped LBFGS evaluates the closure (after the mix),
    step() returns its loss. With allreduce every evaluation averages the ranks'
    gradients and losses: LBFGS on the mean objective, as in one process. With
    gossip the mix moves x between LBFGS's steps: its curvature pairs (s, y) must
    still be secant pairs of this rank's objective (y = H s, H = A'A / rows), which
    holds only if s carries the mix's move too."""
    world = aau_mpi.init(device="cpu")
    a, b = shard(comm.rank)
    model = LeastSquares()
    options = dict(lr=0.5, max_iter=4, history_size=64)  # every pair of the 15 steps kept
    lbfgs = torch.optim.LBFGS(model.parameters(), **options)
    opt = aau_mpi.DecentralizedOptimizer(lbfgs, model, policy=policy, world=world,
                                         watchdog=None)
    evaluated = []

    def closure():
        opt.zero_grad()
        loss = model.loss(a, b)
        loss.backward()
        evaluated.append(loss.item())
        return loss
    start = model.loss(a, b).item()
    losses = [opt.step(closure) for _ in range(15)]
    own = model.x.detach().numpy().copy()
    history = lbfgs.state[model.x]
    opt.finish()
    average = model.x.detach().numpy()
    assert all(torch.is_tensor(loss) for loss in losses)
    x_opt = global_optimum(comm.size)
    if policy == "allreduce":
        expected = mean_objective_lbfgs(comm.size, 15, **options)
        assert np.allclose(own, expected, rtol=1e-4, atol=1e-5)
        assert np.allclose(average, own, rtol=1e-6)
    else:
        assert losses[0].item() == evaluated[0], "step() returns the closure's loss"
        hessian = a.T @ a / ROWS
        assert len(history["old_stps"]) > 3 * 15, "pairs across steps were kept too"
        for s, y in zip(history["old_stps"], history["old_dirs"]):
            error = float((hessian @ s - y).norm() / y.norm())
            assert error < 1e-3, f"a curvature pair is {error:.2g} off a secant pair"
        assert losses[-1].item() < start
        error = np.linalg.norm(average - x_opt) / np.linalg.norm(x_opt)
        assert error < 0.1, f"the averaged model is {error:.3f} from the optimum"


@pytest.mark.mpi(min_size=4)
def test_progress_lr_follows_global_progress_on_every_rank():
    """Ranks take different numbers of steps under one sample budget; ProgressLR's
    rate follows the job's progress, so every rank warms up and ends its cosine
    at the same point of the budget (CosineAnnealingLR(T_max=own steps) could not)."""
    from aau_mpi.algorithms.learning_rate import LearningRate
    world = aau_mpi.init(device="cpu")
    a, b = shard(comm.rank)
    model = LeastSquares()
    sgd = torch.optim.SGD(model.parameters(), lr=0.04)
    opt = aau_mpi.DecentralizedOptimizer(
        sgd, model, policy="async", world=world, watchdog=None, batch_size=1,
        schedule=Schedule(sample_budget=2000), stragglers=SlowRank(comm.rank, 1, 5.0))
    scheduler = aau_mpi.ProgressLR(opt, schedule="cosine", warmup=0.1, final=0.05)
    expected = LearningRate(0.04, "cosine", {"final": 0.05}, warmup=0.1)
    rates, progresses = [], []  # the rate of each step, and the progress it was set at
    while not opt.should_stop():
        rates.append(opt.param_groups[0]["lr"])
        progresses.append(opt.progress())
        assert rates[-1] == pytest.approx(expected(opt.progress()))
        opt.zero_grad()
        model.loss(a, b).backward()
        opt.step()
        scheduler.step()
    assert opt.progress() == 1.0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04 * 0.05), "every rank ends the cosine"
    opt.finish()
    steps = comm.allgather(len(rates))
    assert max(steps) > 2 * min(steps), f"the straggler should take fewer steps: {steps}"
    assert rates[0] == pytest.approx(0.04 / 1000), "the warm-up starts at lr / 1000"
    # Each rank steps through the warm-up's end (progress 0.1), so it rises to the base
    # rate and decays after; how near the peak its steps fall depends on its speed
    # (the straggler's can be a tenth of the budget apart on loaded cores).
    assert min(progresses) < 0.1 < max(progresses)
    peak = rates.index(max(rates))
    assert all(a <= b for a, b in zip(rates[:peak], rates[1:peak + 1])), "rising to the peak"
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:])), "decaying after it"
    if max(steps) == len(rates):
        assert max(rates) == pytest.approx(0.04, rel=0.05), "the warm-up reaches the base rate"


@pytest.mark.mpi(min_size=2)
def test_progress_lr_needs_a_budget():
    world = aau_mpi.init(device="cpu")
    model = LeastSquares()
    opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                         world=world, watchdog=None)
    with pytest.raises(aau_mpi.UserError, match="sample_budget"):
        aau_mpi.ProgressLR(opt, schedule="cosine")
    with pytest.raises(aau_mpi.UserError, match="DecentralizedOptimizer"):
        aau_mpi.ProgressLR(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.finish()
