"""The virtual-time simulator (aau_mpi.simulate): one process, no MPI, real policies.

Every run is tiny (4-5 workers of logistic regression on the digits, a few
hundred virtual steps) and times are virtual, so the assertions on time are
exact arithmetic, never wall-clock measurements.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from aau_mpi.algorithms.emulation import EmulatedAccelerator
from aau_mpi.algorithms.stragglers import build_straggler
from aau_mpi.base.errors import UserError
from aau_mpi.training.calibration import collective_waits, load_calibration
from aau_mpi.training.config_loading import config_from_dict
from aau_mpi.training.datasets import load_dataset
from aau_mpi.training.partitions import partition, shard_loader
from aau_mpi.training.models import build_model
from aau_mpi.algorithms.policies import POLICIES
from aau_mpi.simulate import Simulator, cli, main
from aau_mpi.training.simulation import StackedModel, Timing, sgd_step

STEP = 0.01          # virtual seconds per step, given: no start-up measurement
BASE = {"seed": 0, "policy": {"name": "dpsgd"}, "topology": {"name": "ring"},
        "data": {"name": "digits", "batch_size": 16},
        "model": {"name": "logreg"}, "optim": {"lr": 0.05, "momentum": 0.0},
        "budget": {"seconds": 1.0}, "output": {"progress": False}}
STRAGGLER = "stragglers={name: fixed, ranks: [1], slowdown: %g}"
RANK_KEYS = {"iteration", "time", "compute", "wait", "deposit", "averaged", "staleness",
             "step_scale", "loss", "samples", "lr"}
EVAL_KEYS = {"evaluation", "time", "samples", "epochs", "accuracy", "loss", "rank_accuracy",
             "rank_loss", "consensus_distance"}
SUMMARY_KEYS = {"policy", "topology", "world_size", "accuracy", "loss", "seconds", "samples",
                "iterations", "neighbours", "wait_share", "sleep_share", "stragglers",
                "target_accuracy", "time_to_target", "exit", "simulated", "timing"}


def simulate(tmp_path, ranks, *overrides, name="run", calibration=None):
    config = config_from_dict(BASE, overrides=list(overrides))
    simulator = Simulator(config, ranks, step_seconds=STEP, folder=tmp_path / name,
                          calibration=calibration)
    return simulator, simulator.run()


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the run folder ------------------------------------------------------------

def command(out, name, ranks=4, *extra):
    return ["--config", "jobs/compare/aau.yaml", "--ranks", str(ranks), "--step-seconds",
            "0.001", f"output.dir={out}", f"name={name}", "output.progress=false",
            "model.name=logreg", "budget.epochs=3", "eval.every_epochs=1", *extra]


def test_the_command_never_imports_mpi4py_and_leaves_the_trainers_run_folder(tmp_path):
    script = ("import sys; from aau_mpi.simulate import main; main(sys.argv[1:]); "
              "print('mpi4py imported' if 'mpi4py' in sys.modules else 'no mpi4py')")
    result = subprocess.run([sys.executable, "-c", script, *command(tmp_path, "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("no mpi4py")
    folder = tmp_path / "run"

    assert {p.name for p in folder.iterdir()} == {
        "config.yaml", "eval.jsonl", "summary.json", "model.h5",
        *(f"rank-{r:05d}.jsonl" for r in range(4))}
    for rank in range(4):
        records = read_lines(folder / f"rank-{rank:05d}.jsonl")
        assert [r["iteration"] for r in records] == list(range(len(records)))
        assert RANK_KEYS <= set(records[0])
    evals = read_lines(folder / "eval.jsonl")
    assert [e["evaluation"] for e in evals] == [1, 2], "every epoch but the last (the end)"
    assert all(set(e) == EVAL_KEYS and len(e["rank_accuracy"]) == 4 for e in evals)
    summary = json.loads((folder / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["simulated"] is True
    assert summary["timing"]["step_seconds"] == 0.001 and summary["exit"] == "finished"
    assert summary["samples"] >= 3 * 1437 and len(summary["iterations"]) == 4
    assert "simulation:" in (folder / "config.yaml").read_text()

    from aau_mpi.plot import main as plot
    plot([str(folder), "--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 0


def test_the_same_command_twice_gives_the_same_run(tmp_path):
    for name in ("first", "second"):
        main(command(tmp_path, name, 4, "stragglers={name: random, probability: 0.3, "
                                        "scale: 0.002}"))
    first, second = tmp_path / "first", tmp_path / "second"
    assert (first / "eval.jsonl").read_text() == (second / "eval.jsonl").read_text()
    assert (first / "rank-00002.jsonl").read_text() == (second / "rank-00002.jsonl").read_text()
    assert (json.loads((first / "summary.json").read_text())
            == json.loads((second / "summary.json").read_text()))


def test_beyond_64_workers_16_are_logged_and_evaluated_and_the_files_say_so(tmp_path):
    simulator, summary = simulate(tmp_path, 80, "policy.name=async", "model.name=logreg",
                                  "budget={samples: 2000}", "eval.every_epochs=1")
    logged = summary["logged_ranks"]
    assert len(logged) == 16 and logged[0] == 0 and logged[-1] == 79
    assert sorted(p.name for p in (tmp_path / "run").glob("rank-*.jsonl")) == \
        [f"rank-{r:05d}.jsonl" for r in logged]
    record = read_lines(tmp_path / "run" / "eval.jsonl")[0]
    assert record["evaluated_ranks"] == logged and len(record["rank_accuracy"]) == 16
    assert len(summary["iterations"]) == 80


def test_without_rank_models_only_the_averaged_model_is_evaluated(tmp_path):
    simulate(tmp_path, 4, "model.name=logreg", "budget={samples: 2000}", "eval.every_epochs=1",
             "eval.rank_models=false")
    evals = read_lines(tmp_path / "run" / "eval.jsonl")
    assert evals and all(set(e) == EVAL_KEYS - {"rank_accuracy", "rank_loss"} for e in evals)


@pytest.mark.parametrize("args,message", [
    (["--ranks", "0"], "--ranks must be an integer >= 1, got '0': e.g. --ranks 16"),
    (["--ranks", "four"], "--ranks must be an integer >= 1"),
    (["--ranks", "4", "--step-seconds", "-1"], "--step-seconds must be a number > 0"),
    (["--ranks", "4", "topology={file: TOPOLOGY}"], "topology has 6 nodes but the job has 4"),
    (["--ranks", "4", "stragglers={name: fixed, ranks: [9]}"], "stragglers.ranks [9] out of"),
    (["--ranks", "5000"], "into 5000 non-empty parts: use fewer ranks"),
    (["--ranks", "4", "--step-seconds", "0.01", "emulate.step_seconds=0.02"],
     "emulate.step_seconds 0.02 both set the step: drop one"),
    (["--ranks", "4", "--calibration", "MISSING"], "cannot read calibration"),
])
def test_bad_input_is_one_line_with_the_fix_and_exit_2(tmp_path, monkeypatch, capsys, args,
                                                         message):
    topology = tmp_path / "six.yaml"
    topology.write_text("nodes: 6\nedges: [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0]]\n")
    args = [a.replace("TOPOLOGY", str(topology)).replace("MISSING", str(tmp_path / "none.json"))
            for a in args]
    monkeypatch.setattr(sys, "argv", ["simulate", "--config", "jobs/demo.yaml",
                                      f"output.dir={tmp_path}", *args])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and message in error


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.9, False, 0.0),
                                                                (0.9, True, 1e-3), (0.0, False, 0.0)])
def test_a_workers_step_is_torchs_sgd_to_the_bit(momentum, nesterov, weight_decay):
    optim = config_from_dict(BASE, overrides=[f"optim.momentum={momentum}",
                                              f"optim.nesterov={str(nesterov).lower()}",
                                              f"optim.weight_decay={weight_decay}"]).optim
    generator = torch.Generator().manual_seed(0)
    ours = torch.randn(1000, generator=generator)
    theirs = torch.nn.Parameter(ours.clone())
    sgd = torch.optim.SGD([theirs], lr=1.0, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay)
    buffer = None
    for lr in (0.1, 0.05, 0.2, 0.01):
        gradient = torch.randn(1000, generator=generator)
        theirs.grad = gradient.clone()
        sgd.param_groups[0]["lr"] = lr
        sgd.step()
        buffer = sgd_step(ours, gradient, buffer, lr, optim)
        assert torch.equal(ours, theirs.detach())


@pytest.mark.parametrize("name, params", [("logreg", None), ("mlp", {"hidden": [64, 32]}),
                                          ("cnn1d", None)])
def test_each_workers_gradient_and_loss_are_its_own_models_on_its_own_batch(name, params):
    """The batched paths (dense layers as matrix products, other models by vmap)
    give what torch's autograd gives each worker's model alone."""
    torch.manual_seed(0)
    model = build_model(name, (1, 40), 10, params)
    stacked = StackedModel(model)
    assert (stacked.layers is None) == (name == "cnn1d")
    flats = torch.randn(5, sum(stacked.sizes)) * 0.3
    x, y = torch.randn(5, 16, 1, 40), torch.randint(0, 10, (5, 16))
    # Workers 4, 0, 2 of the 5, in that order, into their rows; the others' stay NaN.
    rows = torch.tensor([4, 0, 2])
    gradients = torch.full_like(flats, float("nan"))
    losses = stacked.gradients(flats, rows, x[rows], y[rows], out=gradients)
    assert gradients[[1, 3]].isnan().all()
    losses = dict(zip(rows.tolist(), losses))
    summed, correct = stacked.loss_and_correct(flats, x[0], y[0], batch_size=7)
    for w in range(5):
        torch.nn.utils.vector_to_parameters(flats[w], model.parameters())
        model.zero_grad()
        logits = model(x[w])
        loss = torch.nn.functional.cross_entropy(logits, y[w])
        loss.backward()
        alone = torch.cat([p.grad.flatten() for p in model.parameters()])
        if w in losses:
            assert torch.allclose(gradients[w], alone, atol=1e-6), w
            assert losses[w].item() == pytest.approx(loss.item(), rel=1e-5)
        with torch.no_grad():
            on_first = model(x[0])
        expected = torch.nn.functional.cross_entropy(on_first, y[0], reduction="sum").item()
        assert summed[w].item() == pytest.approx(expected, rel=1e-5)
        assert correct[w].item() == (on_first.argmax(1) == y[0]).sum().item()


# ---- the emulated accelerator, the calibration, the allreduce model --------------------

def test_an_emulated_job_runs_on_the_trainers_modelled_steps_with_its_jitter(tmp_path):
    config = config_from_dict(BASE, overrides=["policy.name=async", STRAGGLER % 4,
                                               "emulate={step_seconds: 0.02, jitter: 0.1}"])
    Simulator(config, 4, folder=tmp_path / "run").run()
    for rank in range(4):
        device = EmulatedAccelerator(0.02, 0.1, seed=0, rank=rank)  # as the trainer's
        straggler = build_straggler("fixed", rank, 4, {"ranks": [1], "slowdown": 4})
        computes = [r["compute"] for r in read_lines(tmp_path / "run" / f"rank-{rank:05d}.jsonl")]
        assert computes == pytest.approx([device.modelled_seconds(straggler, 0.0)
                                          for _ in computes])
        assert len(set(computes)) > 1, "jitter"


def write_calibration(path):
    path.write_text(json.dumps({"groups": [
        {"policy": "async", "ranks": 2, "runs": 1, "overhead_seconds": {"mean": 0.5}},
        {"policy": "async", "ranks": 8, "runs": 1, "overhead_seconds": {"mean": 0.003}},
        {"policy": "allreduce", "ranks": 4, "runs": 1, "overhead_seconds": {"mean": 0.002},
         "collective_seconds": {"mean": 0.004}}]}))
    return path


def test_a_calibration_adds_its_overhead_to_every_iteration_and_its_collective(tmp_path):
    calibration = write_calibration(tmp_path / "calibration.json")
    for policy, ranks, iteration in (("async", 5, STEP + 0.003),        # never waits
                                     ("allreduce", 4, STEP + 0.004 + 0.002)):
        simulator, _ = simulate(tmp_path, ranks, f"policy.name={policy}", name=policy,
                                calibration=calibration)
        if policy == "async":  # 2 and 8 ranks are as near to 5: the larger is taken
            assert "(async, 8 ranks, every setting, 1 runs)" in \
                simulator.timing.calibration_from
        for rank in range(ranks):
            times = [r["time"] for r in read_lines(tmp_path / policy / f"rank-{rank:05d}.jsonl")]
            assert np.diff(times) == pytest.approx(iteration)


def test_with_another_payload_the_calibrated_collective_gives_way_to_the_bandwidth_model(
        tmp_path):
    config = config_from_dict(BASE, overrides=["policy.name=allreduce"])
    simulator = Simulator(config, 4, step_seconds=STEP, payload_bytes=100e6, bandwidth_gbs=25,
                          latency_us=5, folder=tmp_path / "run",
                          calibration=write_calibration(tmp_path / "calibration.json"))
    assert simulator.timing.overhead_seconds == 0.002, "the overhead is still the calibration's"
    assert simulator.timing.collective_seconds is None
    assert simulator.timing.allreduce_seconds(4) == pytest.approx(1.5 * 0.004 + 6 * 5e-6)


def test_a_calibration_group_of_the_jobs_straggler_setting_is_taken_where_there_is_one(
        tmp_path):
    path = tmp_path / "calibration.json"
    one_4x = {"name": "fixed", "ranks": [1], "slowdown": 4.0}
    path.write_text(json.dumps({"groups": [
        {"policy": "allreduce", "ranks": 16, "stragglers": None, "runs": 3,
         "overhead_seconds": {"mean": 0.010}},
        {"policy": "allreduce", "ranks": 16, "stragglers": {"name": "none"}, "runs": 1,
         "overhead_seconds": {"mean": 0.012}},
        {"policy": "allreduce", "ranks": 16, "stragglers": one_4x, "runs": 2,
         "overhead_seconds": {"mean": 0.007}}]}))
    for stragglers, mean, which in (({"name": "none"}, 0.012, "this setting"),
                                    ({**one_4x, "seed": 3}, 0.007, "this setting"),
                                    ({"name": "fixed", "ranks": [2]}, 0.010, "every setting"),
                                    (None, 0.010, "every setting")):
        group, where = load_calibration(path, "allreduce", 14, stragglers)
        assert group["overhead_seconds"]["mean"] == mean and which in where, stragglers


def test_a_calibration_without_the_jobs_policy_is_refused_naming_what_it_has(tmp_path):
    calibration = write_calibration(tmp_path / "calibration.json")
    with pytest.raises(UserError, match="has no dpsgd runs .it has allreduce, async.: "
                                        "calibrate from runs of policy dpsgd too"):
        load_calibration(calibration, "dpsgd", 4)


def test_the_collective_is_the_allreduces_wait_beyond_the_slowest_compute():
    def record(iteration, compute, wait):
        return {"iteration": iteration, "compute": compute, "wait": wait}
    logs = {0: [record(0, 0.01, 0.1), record(1, 0.01, 0.025), record(2, 0.02, 0.006)],
            1: [record(0, 0.01, 0.1), record(1, 0.03, 0.005), record(2, 0.01, 0.016)]}
    assert collective_waits(logs) == pytest.approx([0.005, 0.005, 0.006, 0.006])


def test_the_allreduce_model_takes_the_faster_of_a_ring_and_a_tree():
    timing = Timing(0.03, "given", 25.0, "given", 5.0, int(100e6))  # 4 ms through a link
    ring4, tree1024 = 1.5 * 0.004 + 6 * 5e-6, 2 * 0.004 + 20 * 5e-6
    assert timing.allreduce_seconds(4) == pytest.approx(ring4)          # tree: 8.02 ms
    assert timing.allreduce_seconds(1024) == pytest.approx(tree1024)    # ring: 18.2 ms
    assert Timing(0.03, "", 25.0, "", 5.0, 100, collective_seconds=0.5).allreduce_seconds(8) == 0.5


# ---- dpsgd is the synchronous recursion -------------------------------------------

def metropolis_ring(n):
    w = np.eye(n) / 3
    for i in range(n):
        w[i, (i - 1) % n] = w[i, (i + 1) % n] = 1 / 3
    return lambda k: w


def one_peer(n):
    """W_k of the one-peer exponential graph, from its definition: (I + P_k) / 2."""
    hops = [2 ** h for h in range((n - 1).bit_length())]

    def weights(k):
        w = np.eye(n) / 2
        for i in range(n):
            w[i, (i - hops[k % len(hops)]) % n] += 0.5
        return w
    return weights


def recursion(n, iterations, lr, weights, batch_size=16, seed=0, mean_gradient=False):
    """x_{k+1} = W_k x_k - lr G_k for softmax regression, in float64 numpy, with the
    trainer's partition, loader seeds and initial model; with `mean_gradient` every
    row of G_k is the mean of the workers' gradients (allreduce)."""
    data = load_dataset("digits", {})
    parts = partition(data.y_train.numpy(), n, "iid", seed=seed)
    loaders = [shard_loader(data.x_train, data.y_train, parts[i], batch_size,
                            seed=seed * 1000 + i) for i in range(n)]
    torch.manual_seed(seed)
    model = build_model("logreg", data.input_shape, data.num_classes)
    w0, b0 = (p.detach().numpy().astype(np.float64) for p in model.parameters())
    x = np.tile(np.concatenate([w0.ravel(), b0]), (n, 1))
    for k in range(iterations):
        g = np.empty_like(x)
        for i, loader in enumerate(loaders):
            a, y = (t.numpy() for t in next(loader))
            a = a.reshape(len(a), -1).astype(np.float64)
            w, b = x[i, :w0.size].reshape(w0.shape), x[i, w0.size:]
            logits = a @ w.T + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y] -= 1
            g[i] = np.concatenate([(p.T @ a).ravel(), p.sum(0)]) / len(y)
        if mean_gradient:
            g[:] = g.mean(0)
        x = weights(k) @ x - lr * g
    return x


def directed_exponential(n):
    """The directed exponential graph's uniform weights: i reads i - 1 and i - 2."""
    w = np.eye(n) / 3
    for i in range(n):
        w[i, (i - 1) % n] = w[i, (i - 2) % n] = 1 / 3
    return lambda k: w


DIRECTED = "topology={name: exponential, directed: true}"


@pytest.mark.parametrize("ranks,weights,overrides", [
    (5, metropolis_ring, ["topology.name=ring"]),
    (4, one_peer, ["topology.name=exponential_one_peer"]),
    (4, directed_exponential, [DIRECTED])], ids=["ring", "one_peer", "directed_exponential"])
def test_dpsgd_equals_the_synchronous_recursion(tmp_path, ranks, weights, overrides):
    iterations = 30
    # The stop is taken after a step: a budget crossed by the first step of the
    # last round lets every worker finish that round, and no more.
    simulator, summary = simulate(tmp_path, ranks, *overrides,
                                  f"budget={{samples: {ranks * 16 * (iterations - 1) + 1}}}")
    assert summary["iterations"] == [iterations] * ranks
    expected = recursion(ranks, iterations, 0.05, weights(ranks))
    assert np.abs(simulator.parameters.numpy() - expected).max() <= 1e-5


# ---- stragglers and policies ----------------------------------------------------

def test_dpsgd_on_a_directed_graph_waits_out_a_straggler(tmp_path):
    """Issue 20: rank 3 hears from the slow rank 1 only over 1 -> 2 -> 3, so its
    iteration k + 2 comes before rank 1 has read k. With two slots by parity it
    replaced k and the run ended in a simulated deadlock; now every iteration
    of every rank mixes both in-neighbours' deposits of that iteration."""
    simulator, summary = simulate(tmp_path, 4, DIRECTED, STRAGGLER % 4)
    assert min(summary["iterations"]) >= 20  # a virtual second of 4 x 0.01 s steps
    for rank in range(4):
        records = read_lines(tmp_path / "run" / f"rank-{rank:05d}.jsonl")
        assert len(records) == summary["iterations"][rank]
        for record in records:
            assert sorted(record["averaged"]) == simulator.graph.in_neighbours(rank)
            assert record["staleness"] == [0, 0]

def test_a_4x_straggler_does_a_quarter_of_the_iterations_under_async(tmp_path):
    _, summary = simulate(tmp_path, 4, "policy.name=async", STRAGGLER % 4)
    slow, fast = summary["iterations"][1], np.median(np.delete(summary["iterations"], 1))
    assert slow / fast == pytest.approx(0.25, abs=0.02)


def test_a_4x_straggler_makes_every_dpsgd_iteration_4x_longer(tmp_path):
    for slowdown in (1, 4):
        simulate(tmp_path, 4, STRAGGLER % slowdown, name=f"x{slowdown}")
        for rank in range(4):
            times = [r["time"] for r in read_lines(tmp_path / f"x{slowdown}" /
                                                   f"rank-{rank:05d}.jsonl")]
            assert np.median(np.diff(times)) == pytest.approx(slowdown * STEP, rel=1e-6)


def test_aau_lets_the_fast_workers_do_more_iterations_than_dpsgd(tmp_path):
    runs = {policy: simulate(tmp_path, 4, f"policy.name={policy}", STRAGGLER % 4,
                             name=policy)[1] for policy in ("dpsgd", "aau")}
    fast = {policy: min(np.delete(run["iterations"], 1)) for policy, run in runs.items()}
    assert fast["aau"] > 2 * fast["dpsgd"]
    assert runs["aau"]["seconds"] == pytest.approx(runs["dpsgd"]["seconds"], rel=0.05)


def test_allreduce_equals_sgd_on_the_mean_gradient(tmp_path):
    """The lock step: every worker computes its gradient on its own batch, then all
    step with their mean (the simulator steps once and copies x to every row)."""
    iterations = 30
    simulator, summary = simulate(tmp_path, 4, "policy.name=allreduce", "topology.name=ring",
                                  f"budget={{samples: {4 * 16 * (iterations - 1) + 1}}}")
    assert summary["iterations"] == [iterations] * 4
    expected = recursion(4, iterations, 0.05, lambda k: np.eye(4), mean_gradient=True)
    assert np.abs(simulator.parameters.numpy() - expected).max() <= 1e-5


def test_allreduce_keeps_every_worker_identical(tmp_path):
    simulator, summary = simulate(tmp_path, 4, "policy.name=allreduce", STRAGGLER % 3,
                                  "optim.momentum=0.9")
    x = simulator.parameters
    assert all(torch.equal(x[0], x[i]) for i in range(1, 4))
    assert len(set(summary["iterations"])) == 1


@pytest.mark.parametrize("policy", [*POLICIES.names(), "{name: aau, gamma: 0.5, tau: 2}",
                                    "{name: fixed_k, k: 2}"])
@pytest.mark.parametrize("topology", [
    "ring", pytest.param("exponential_one_peer", marks=pytest.mark.long)])
def test_no_policy_deadlocks_with_a_50x_straggler(tmp_path, policy, topology):
    _, summary = simulate(tmp_path, 4, f"policy={policy}" if "{" in policy else
                          f"policy.name={policy}", f"topology.name={topology}",
                          STRAGGLER % 50, "budget.seconds=2.0")
    assert summary["exit"] == "finished" and summary["seconds"] >= 2.0
    assert min(summary["iterations"]) >= 1, "the straggler stepped too"
