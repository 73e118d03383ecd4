"""Every policy through the real engine and mailbox (spec sections 3 and 4).

A least-squares problem with non-IID shards: rank i holds rows A_i (their own
scale and offset) and targets b_i = A_i x_true + noise_i, so the shards' own
optima differ and only the average of the ranks' objectives has the global
optimum x_opt.
"""

import time

import numpy as np
import pytest
from mpi4py import MPI

from aau_mpi.control import JobControl
from aau_mpi.engine import Engine
from aau_mpi.policies import build_policy
from aau_mpi.stragglers import build_straggler, slow_down
from aau_mpi.topology import generate

comm = MPI.COMM_WORLD
DIM, ROWS = 8, 40


def shard(i):
    rng = np.random.default_rng(100 + i)
    a = rng.standard_normal((ROWS, DIM)) * (1 + 0.5 * i) + 0.3 * i
    x_true = np.random.default_rng(0).standard_normal(DIM)
    b = a @ x_true + rng.standard_normal(ROWS) * (0.5 + i)
    return a.astype(np.float32), b.astype(np.float32)


def gradient(a, b, x):
    return (a.T @ (a @ x - b) / ROWS).astype(np.float32)


def global_optimum(n):
    shards = [shard(i) for i in range(n)]
    # The minimiser of (1/n) sum_i ||A_i x - b_i||^2 / ROWS.
    a = np.vstack([s[0] for s in shards]).astype(np.float64)
    b = np.concatenate([s[1] for s in shards]).astype(np.float64)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def run_until(engine, compute, apply_step, iterations=None, sample_budget=None):
    """Step until this rank's iterations or the shared sample budget (one per step) end."""
    control = JobControl(comm)
    records = []
    while True:
        records.append(engine.step(compute, apply_step))
        used, _ = control.add_samples(1)
        done = ((iterations is not None and engine.k >= iterations)
                or (sample_budget is not None and used >= sample_budget))
        if not engine.mailbox:  # lock-step ranks stop together
            done = comm.allreduce(done, op=MPI.LOR)
        if done:
            average = engine.finish()
            control.close()
            return average, records


def train(policy_name, lr, params=None, slow_rank=None, slowdown=1.0, topology="ring",
          iterations=None, sample_budget=None):
    """Run the engine on this rank's shard; returns (x, averaged x, records)."""
    graph = generate(topology, comm.size)
    a, b = shard(comm.rank)
    x = np.zeros(DIM, np.float32)
    policy = build_policy(policy_name, graph, comm.rank, params)
    engine = Engine(comm, graph, policy, x)
    straggler = build_straggler("fixed" if slow_rank is not None else "none", comm.rank,
                                comm.size, {"ranks": [slow_rank], "slowdown": slowdown}
                                if slow_rank is not None else None)

    def compute():
        started = time.perf_counter()
        g = gradient(a, b, x)
        # The gradient takes microseconds; count a step as at least 0.5 ms so
        # that the straggler's sleep outweighs the loop's own overheads.
        slow_down(straggler, max(time.perf_counter() - started, 0.0005), MPI.Wtime())
        return g

    def apply_step(g, scale):
        x[:] -= lr(engine.k) * scale * g

    average, records = run_until(engine, compute, apply_step, iterations, sample_budget)
    return x, average, records


def simulate_dpsgd(n, iterations, lr):
    """Single process: x_{k+1} = W x_k - lr G_k, in the engine's float32 operation order."""
    graph = generate("ring", n)
    w = graph.mixing_matrix("metropolis")
    shards = [shard(i) for i in range(n)]
    xs = [np.zeros(DIM, np.float32) for _ in range(n)]
    for _ in range(iterations):
        grads = [gradient(*shards[i], xs[i]) for i in range(n)]
        mixed = []
        for i in range(n):
            neighbours = graph.in_neighbours(i)
            weights = [float(w[i, j]) for j in neighbours]
            m = xs[i] * np.float32(1.0 - sum(weights))
            for j, wj in zip(neighbours, weights):
                m += xs[j] * np.float32(wj)
            mixed.append(m)
        xs = [mixed[i] - np.float32(lr) * grads[i] for i in range(n)]
    return xs


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("slow_rank", [None, 2])
def test_dpsgd_equals_the_synchronous_recursion(slow_rank):
    x, _, records = train("dpsgd", lambda k: 0.02, slow_rank=slow_rank, slowdown=5.0,
                          iterations=50)
    expected = simulate_dpsgd(comm.size, 50, 0.02)[comm.rank]
    assert len(records) == 50
    assert all(sorted(r.averaged) == generate("ring", comm.size).in_neighbours(comm.rank)
               for r in records), "dpsgd must average every neighbour every iteration"
    assert all(s == 0 for r in records for s in r.staleness)
    relative = np.linalg.norm(x - expected) / np.linalg.norm(expected)
    assert relative <= 1e-6, f"rank {comm.rank}: {relative:.2e} from the simulation"


@pytest.mark.mpi(min_size=2)
def test_allreduce_equals_sgd_on_the_averaged_gradient():
    x, average, _ = train("allreduce", lambda k: 0.02, iterations=30)
    shards = [shard(i) for i in range(comm.size)]
    expected = np.zeros(DIM, np.float32)
    for _ in range(30):
        g = sum(gradient(*s, expected) for s in shards) / comm.size
        expected = expected - np.float32(0.02) * g
    assert np.allclose(x, expected, rtol=1e-5, atol=1e-6)
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
@pytest.mark.parametrize("policy,params", [
    ("async", {}), ("async_one", {"seed": 1}), ("fixed_k", {"k": 1}),
    ("aau", {}), ("aau", {"rate_scaled": False}), ("aau", {"tau": 2, "gamma": 0.5}),
])
@pytest.mark.parametrize("slowdown", [1.0, 10.0])
def test_asynchronous_policies_reach_consensus_near_the_optimum(policy, params, slowdown):
    x_opt = global_optimum(comm.size)
    x, average, records = train(policy, decaying, params, slow_rank=1, slowdown=slowdown,
                                sample_budget=6000)
    consensus = np.linalg.norm(x - average) / np.linalg.norm(x_opt)
    error = np.linalg.norm(average - x_opt) / np.linalg.norm(x_opt)
    iterations = comm.gather(len(records), root=0)
    if comm.rank == 0:
        print(f"\n{policy} {params} slowdown {slowdown}: iterations {iterations}, "
              f"error of the average {error:.3f}")
    assert consensus < 0.05, f"rank {comm.rank} is {consensus:.3f} from the others' average"
    assert error < LEAN_BOUND[policy], f"the averaged model is {error:.3f} from the optimum"


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("policy,params", [
    ("dpsgd", {}), ("allreduce", {}), ("async", {}), ("async_one", {}),
    ("fixed_k", {"k": 2}), ("aau", {}),
])
def test_every_policy_finishes_with_a_50x_straggler(policy, params):
    """A shared sample budget ends training; nobody waits for a finished rank."""
    _, average, records = train(policy, lambda k: 0.01, params, slow_rank=3, slowdown=50.0,
                                sample_budget=400)
    steps = comm.gather(len(records), root=0)
    if comm.rank == 0:
        assert sum(steps) >= 400, "the budget counts every rank's steps"
    assert np.isfinite(average).all()
