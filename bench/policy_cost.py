"""What a policy's decision costs, against a training step and against a deposit.

    mpiexec -n 2 python bench/policy_cost.py [--quick] [--out bench/results]

Two measurements, medians over repeated calls after a warm-up:

1. `select` on header snapshots (`aau_mpi.comm.header.empty_headers`) in which
   every in-neighbour has a fresh deposit of this iteration (the usual case:
   every policy answers at once), for in-degrees 2, 4 and 16 (a complete
   graph), next to one training step of bench/digits.yaml's problem
   (LeNet on the digits, batch 32: forward, backward and the SGD step).
2. Against the model size, on 2 ranks with real windows: rank 0 reads its
   mailbox headers and runs aau's `select` (the per-iteration cost of the
   policy) and deposits the model into rank 1 (the deposit). The headers do
   not depend on the model, so only the deposit should grow.

Prints the tables and writes policy_cost.json and policy_cost.md into --out.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import benchlib
from aau_mpi.comm.header import empty_headers
from aau_mpi.comm.mailbox import Mailbox
from aau_mpi.algorithms.policies import build_policy
from aau_mpi.algorithms.topology import load_topology

POLICIES = {"dpsgd": {}, "async": {}, "fixed_k": {"k": 1}, "aau": {}}
DEGREES = (2, 4, 16)
SIZES_M = (0.1, 1.0, 11.2, 50.0)  # million parameters: ..., ResNet-18's 11.2 M, ...


def select_seconds(name, degree, repeats):
    """Median seconds of `select` (with the `mixed` bookkeeping between calls left out)."""
    graph = load_topology("complete", degree + 1)
    policy = build_policy(name, graph, 0, POLICIES[name])
    headers = empty_headers(degree, policy.slots_per_neighbour, degree + 1)
    times = []
    for k in range(repeats + 1):
        # Every neighbour deposited iteration k, one step-time apart.
        slot = k % policy.slots_per_neighbour
        headers["seq"][:, slot] += 1
        headers["iteration"][:, slot] = k
        headers["time"][:, slot] = 0.01 * k + 1e-4 * np.arange(degree)
        start = time.perf_counter()
        selection = policy.select(headers, k, 0.01 * k + 0.005)
        times.append(time.perf_counter() - start)
        assert selection is not None, f"{name} kept waiting on a snapshot where all are fresh"
        policy.mixed([(j, s, headers[j, s]) for j, s in selection.slots], k)
    return statistics.median(times[1:])


def step_seconds(repeats):
    """One training step of bench/digits.yaml's problem, in this process."""
    import torch
    import torch.nn.functional as F

    from aau_mpi.training.config_loading import load_config
    from aau_mpi.training.datasets import load_dataset
    from aau_mpi.training.models import build_model

    config = load_config(benchlib.BENCH / "digits.yaml")
    data = load_dataset(config.data.name, config.data.params)
    model = build_model(config.model.name, data.input_shape, data.num_classes,
                        config.model.params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data.x_train[:config.data.batch_size], data.y_train[:config.data.batch_size]

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return benchlib.median_seconds(step, repeats), sum(p.numel() for p in model.parameters())


def size_row(comm, millions, repeats):
    """Rank 0: headers + aau select, and a deposit, for a model of `millions` parameters."""
    floats = int(millions * 1e6)
    other = 1 - comm.rank
    graph = load_topology("ring", 2)
    policy = build_policy("aau", graph, comm.rank, {})
    row = None
    with Mailbox(comm, [other], [other], floats) as mailbox:
        payload = np.zeros(floats, np.float32)
        if comm.rank == 1:
            mailbox.deposit(payload, iteration=0)  # a fresh deposit for rank 0 to select
        comm.Barrier()
        if comm.rank == 0:
            decide = benchlib.median_seconds(lambda: policy.select(mailbox.headers(), 1, MPI.Wtime()),
                                    repeats)
            deposit = benchlib.median_seconds(lambda: mailbox.deposit(payload, iteration=0),
                                     max(3, repeats // max(1, int(millions))))
            row = {"parameters_millions": millions, "policy_seconds": decide,
                   "deposit_seconds": deposit}
        comm.Barrier()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--out", default=str(benchlib.RESULTS))
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    benchlib.require_two_ranks(comm, "policy_cost.py")
    repeats = 50 if args.quick else 1000
    sizes = SIZES_M[:2] if args.quick else SIZES_M
    rows = [size_row(comm, millions, repeats) for millions in sizes]
    if comm.rank != 0:
        return
    import torch
    torch.set_num_threads(1)  # as each of 4 ranks on this 2-core machine runs
    step, parameters = step_seconds(repeats // 5)
    decisions = [{"policy": name, "degree": degree,
                  "select_seconds": select_seconds(name, degree, repeats)}
                 for name in POLICIES for degree in DEGREES]
    for d in decisions:
        d["share_of_step"] = d["select_seconds"] / step

    decision_rows = [[d["policy"], d["degree"], f"{d['select_seconds'] * 1e6:.1f}",
                      f"{100 * d['share_of_step']:.3f} %"] for d in decisions]
    decision_headers = ["policy", "in-degree", "select (µs)", "share of a step"]
    size_rows = [[f"{r['parameters_millions']:g}", f"{r['policy_seconds'] * 1e6:.1f}",
                  f"{r['deposit_seconds'] * 1e3:.3f}"] for r in rows]
    size_headers = ["parameters (M)", "headers + aau select (µs)", "deposit (ms)"]
    print(f"one training step (LeNet, {parameters} parameters, batch 32, 1 thread): "
          f"{step * 1e3:.3f} ms")
    print(benchlib.text_table(decision_headers, decision_rows))
    print()
    print(benchlib.text_table(size_headers, size_rows))
    result = {"benchmark": "policy_cost", "date": benchlib.today(),
              "machine": benchlib.machine(),
              "mpi": MPI.Get_library_version().splitlines()[0].strip().rstrip("\0"),
              "repeats": repeats, "step_seconds": step, "step_parameters": parameters,
              "decisions": decisions, "sizes": rows}
    out = Path(args.out)
    json_path = benchlib.write_json(out / "policy_cost.json", result)
    md_path = out / "policy_cost.md"
    md_path.write_text(
        f"# Policy cost ({result['date']})\n\nMachine: {result['machine']}; {result['mpi']}. "
        f"One training step (LeNet on the digits, {parameters} parameters, batch 32, "
        f"1 torch thread): {step * 1e3:.3f} ms.\n\n## select against a step\n\n"
        + benchlib.markdown_table(decision_headers, decision_rows)
        + "\n## Against the model size (2 ranks, real windows)\n\n"
        + benchlib.markdown_table(size_headers, size_rows))
    print(f"wrote {json_path}, {md_path}")


if __name__ == "__main__":
    sys.exit(main())
