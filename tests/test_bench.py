"""The benchmarks' machinery: they run end to end and write well-formed outputs.

Each benchmark is launched as its users launch it, in its --quick size, into
a temporary folder, with a hard timeout so that a hang fails the test. No
test looks at how fast anything was: timings on a shared machine are noise.
The report's pure pieces (rates model, medians, the tuning rule) are checked
on synthetic records.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import stragglers  # noqa: E402  (bench/ is not a package)
from aau_mpi.topology import load_topology  # noqa: E402
from launcher import ENV  # noqa: E402

MPIEXEC = Path(sys.executable).with_name("mpiexec")
needs_launchers = pytest.mark.skipif(
    not MPIEXEC.exists() or not Path(sys.executable).with_name("torchrun").exists(),
    reason=f"no mpiexec/torchrun beside {sys.executable}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def run_bench(script, *args, launcher=(), timeout=240):
    result = subprocess.run([*launcher, sys.executable, f"bench/{script}", *map(str, args)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


@needs_launchers
@pytest.mark.long
def test_stragglers_quick(tmp_path):
    out = tmp_path / "out"
    run_bench("stragglers.py", "--quick", "--runs", tmp_path / "runs", "--out", out,
              "--timeout", 200)
    result = json.loads((out / "stragglers.json").read_text())
    plan = result["plan"]
    assert plan["settings"] == ["none", "fixed4"] and plan["seeds"] == [0]
    # The grid: every policy at every rate, and one chosen rate each.
    assert {(t["variant"], t["lr"]) for t in result["tuning"]} == {
        (v, lr) for v in plan["variants"] for lr in plan["lrs"]}
    assert set(result["best_lr"]) == set(plan["variants"])
    variants = plan["variants"] + ["ddp"]
    assert {(r["setting"], r["variant"]) for r in result["runs"]} == {
        (s, v) for s in plan["settings"] for v in variants}
    for run in result["runs"]:
        assert run["lr"] == result["best_lr"].get(run["variant"], result["best_lr"]["allreduce"])
        assert len(run["iterations"]) == len(run["shard_accuracy"]) == plan["ranks"]
        assert all(0 <= a <= 1 for a in run["shard_accuracy"])
        assert run["samples"] > 0 and run["seconds"] > 0 and math.isfinite(run["loss"])
        assert run["curve"] and all(len(point) == 4 for point in run["curve"])
        times = [point[0] for point in run["curve"]]
        assert times == sorted(times) and times[-1] <= run["seconds"] + 1e-6
    assert len(result["rows"]) == len(plan["settings"]) * len(variants)
    fixed4 = [r for r in result["rows"] if r["setting"] == "fixed4"]
    assert all(r["slow_shard_gap"] is not None for r in fixed4)
    assert [c["setting"] for c in result["throughput"]] == ["fixed4"]
    assert result["targets"] and all(isinstance(c["met"], bool) for c in result["targets"])
    markdown = (out / "stragglers.md").read_text()
    assert "| setting | policy |" in markdown and "## Learning-rate grid" in markdown
    assert all(f"| fixed4 | {variant} |" in markdown for variant in variants)
    assert_png(out / "stragglers_accuracy.png")
    # The run folders stay for inspection.
    assert (tmp_path / "runs" / "run-fixed4-aau-seed0-lr{:g}".format(
        result["best_lr"]["aau"]) / "model.h5").is_file()


@needs_launchers
@pytest.mark.long
def test_scaling_quick(tmp_path):
    out = tmp_path / "out"
    run_bench("scaling.py", "--quick", "--policies", "aau", "--runs", tmp_path / "runs",
              "--out", out, "--timeout", 120)
    result = json.loads((out / "scaling.json").read_text())
    assert [(r["ranks"], r["policy"]) for r in result["rows"]] == [(1, "aau"), (2, "aau")]
    for run in result["runs"]:
        samples = [point[1] for point in run["curve"]]
        assert samples == sorted(samples) and samples[-1] <= result["sample_budget"]
    for row in result["rows"]:
        assert len(row["loss_at"]) == 3 and row["loss_at"][-1] > 0
    assert "| aau | 2 |" in (out / "scaling.md").read_text()
    assert_png(out / "scaling.png")


@needs_launchers
def test_the_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --device cpu: the CUDA tests (skipped, with their
    reasons), the training runs and the JSON, as on a GPU machine."""
    out = tmp_path / "gpu.json"
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--out", str(out)],
                            cwd=REPO, env={**ENV, "PYTHON": sys.executable}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "needs CUDA" in result.stdout, "the CUDA tests say why they skip"
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["quick"] is True
    assert {(r["policy"], r["ranks"]) for r in record["runs"]} == {
        (policy, ranks) for policy in ("aau", "allreduce") for ranks in (1, 2)}
    for run in record["runs"]:
        assert run["samples_per_second"] > 0 and run["iteration_ms"] > 0
        assert run["compute_ms"] > 0 and run["iteration_ms"] >= run["compute_ms"]


@needs_launchers
def test_policy_cost_quick(tmp_path):
    run_bench("policy_cost.py", "--quick", "--out", tmp_path,
              launcher=(str(MPIEXEC), "-n", "2"), timeout=120)
    result = json.loads((tmp_path / "policy_cost.json").read_text())
    assert result["step_seconds"] > 0
    assert {d["policy"] for d in result["decisions"]} == {"dpsgd", "async", "fixed_k", "aau"}
    assert all(d["select_seconds"] > 0 and d["share_of_step"] > 0 for d in result["decisions"])
    assert [r["parameters_millions"] for r in result["sizes"]] == [0.1, 1.0]
    assert all(r["policy_seconds"] > 0 and r["deposit_seconds"] > 0 for r in result["sizes"])
    assert "## Against the model size" in (tmp_path / "policy_cost.md").read_text()


def test_predicted_rates_on_a_ring():
    ring = load_topology("ring", 4)
    # Slower than tau: the straggler's neighbours are held to tau per deposit.
    assert stragglers.predicted_rates(ring, [1], 10.0, 4) == [0.4, 0.1, 0.4, 1.0]
    # Within tau: nobody waits for the straggler.
    assert stragglers.predicted_rates(ring, [1], 4.0, 4) == [1.0, 0.25, 1.0, 1.0]


def test_best_rate_is_fewest_epochs_then_accuracy():
    tuning = [{"variant": "a", "lr": 0.1, "epochs_to_target": 5.0, "accuracy": 0.90},
              {"variant": "a", "lr": 0.05, "epochs_to_target": 4.0, "accuracy": 0.89},
              {"variant": "b", "lr": 0.1, "epochs_to_target": None, "accuracy": 0.80},
              {"variant": "b", "lr": 0.05, "epochs_to_target": None, "accuracy": 0.85}]
    assert stragglers.best_rates(tuning) == {"a": 0.05, "b": 0.05}


def test_summary_rows_take_medians_and_mark_unreached_targets():
    def run(seed, to_target, accuracy):
        return {"setting": "fixed4", "variant": "aau", "seed": seed, "lr": 0.05,
                "time_to_target": to_target, "seconds": 2.0 + seed, "accuracy": accuracy,
                "loss": 0.3, "samples_per_second": 100.0, "iterations": [10, 3, 10, 10],
                "neighbours": [2, 1, 2, 2], "wait_share": [0.1, 0.0, 0.1, 0.1],
                "shard_accuracy": [0.9, 0.8, 0.9, 1.0], "step_seconds": 0.01,
                "curve": [[0.5, 10, 0.5, 1.0], [1.5, 20, accuracy, 0.3]]}

    rows = stragglers.summarise([run(0, 1.0, 0.9), run(1, None, 0.8), run(2, 3.0, 0.95)],
                                ["none", "fixed4"], ["aau"])
    assert len(rows) == 1
    row = rows[0]
    assert row["time_to_target"] == 3.0 and row["accuracy"] == 0.9
    assert row["fixed_time"] == 2.0 and row["accuracy_at_fixed_time"] == 0.9
    assert row["iterations"] == [3, 10, 10]
    assert row["slow_shard_gap"] == pytest.approx(0.8 - 0.9333333)
    assert row["shard_spread"] == pytest.approx(0.2)
    assert stragglers.summarise([run(1, None, 0.8)], ["fixed4"], ["aau"])[0][
        "time_to_target"] == math.inf
