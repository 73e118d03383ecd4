"""The trainer end to end: `mpiexec -n K python -m aau_mpi.train ...` as users launch it.

Each test starts a real MPI job in a subprocess with a hard timeout, so a
hang fails the test instead of the run. These tests run once (not under
mpiexec themselves): they are the launcher.
"""

import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import yaml
import torch

from aau_mpi.base.errors import UserError
from aau_mpi.calibrate import main as calibrate_main
from aau_mpi.checkpoint import load_model  # the documented name
from aau_mpi.decentralized import checkpoint
from aau_mpi.training.datasets import load_dataset

from launcher import (MLP, QUICK, error_lines, launch, launcher_required, rank_pids,
                      read_lines, start, stop)

pytestmark = launcher_required()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = launch(4, "--config", "jobs/demo.yaml", f"output.dir={out}", "name=demo",
                    "output.trace=true", "eval.target_accuracy=0.5",
                    "checkpoint.every_iterations=10", "checkpoint.keep=50", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "demo", result


def test_a_run_leaves_its_config_logs_summary_and_final_model(finished_run):
    folder, result = finished_run
    assert "test accuracy" in result.stdout and "wait share" in result.stdout
    assert (folder / "config.yaml").read_text().startswith("name: demo")

    for rank in range(4):
        records = read_lines(folder / f"rank-{rank:05d}.jsonl")
        assert [r["iteration"] for r in records] == list(range(len(records)))
        assert {"time", "loss", "averaged", "wait", "staleness", "delay", "samples"} <= set(records[0])
        trace = json.loads((folder / f"trace-rank-{rank:05d}.json").read_text().rstrip(",\n") + "]")
        assert {"deposit", "compute", "wait"} <= {event["name"] for event in trace}

    evals = read_lines(folder / "eval.jsonl")
    assert [e["evaluation"] for e in evals] == [1, 2, 3], "every epoch but the last (the end)"
    assert all(len(e["rank_accuracy"]) == 4 and e["consensus_distance"] >= 0 for e in evals)
    times = [e["time"] for e in evals]
    assert times == sorted(times)

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exit"] == "finished" and summary["world_size"] == 4
    assert summary["samples"] >= 4 * 1437
    assert summary["time_to_target"] is not None and summary["time_to_target"] <= summary["seconds"]
    assert summary["iterations"][1] < max(summary["iterations"]), "rank 1 is the 4x straggler"

    # The final model loads in one call and scores what the summary says.
    model = load_model(folder / "model.h5")
    data = load_dataset("digits", {})
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert accuracy == pytest.approx(summary["accuracy"], abs=1e-6)

    manifest = checkpoint.read_manifest(checkpoint.find_checkpoint(folder))
    assert manifest.world_size == 4
    with h5py.File(manifest.path) as f:  # standard HDF5 reaches every rank's state
        assert f["ranks/00003/arrays/params"].shape == (sum(p.numel() for p in model.parameters()),)


def test_calibrate_fits_the_runs_per_iteration_costs_for_the_simulator(finished_run, tmp_path):
    folder, _ = finished_run
    out = tmp_path / "calibration.json"
    assert calibrate_main([str(folder), "--out", str(out)]) == 0
    every, setting = json.loads(out.read_text())["groups"]
    assert every["stragglers"] is None, "every setting's group first"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert setting["stragglers"] == {k: v for k, v in config["stragglers"].items() if k != "seed"}
    assert {k: v for k, v in setting.items() if k != "stragglers"} == \
        {k: v for k, v in every.items() if k != "stragglers"}, "one run: the same figures"
    group = every
    iterations = json.loads((folder / "summary.json").read_text())["iterations"]
    assert (group["policy"], group["ranks"], group["runs"]) == ("aau", 4, 1)
    overhead = group["overhead_seconds"]
    assert overhead["count"] == sum(iterations) - 4, "every iteration but each rank's first"
    assert 0 < overhead["p05"] <= overhead["median"] <= overhead["p95"]
    assert group["deposit_seconds"]["count"] > 0 and "collective_seconds" not in group
    with pytest.raises(UserError, match="is not a finished run folder"):
        calibrate_main([str(tmp_path), "--out", str(out)])


@pytest.mark.parametrize("policy,how", [
    pytest.param("dpsgd", "SIGUSR1 to mpiexec", marks=pytest.mark.long),
    pytest.param("allreduce", "SIGUSR1 to mpiexec", marks=pytest.mark.long),
    ("aau", "SIGTERM to every rank"),
])
def test_a_preempted_run_checkpoints_exits_75_and_resumes(tmp_path, policy, how):
    """Slurm signals either the launcher (--signal=B:USR1 in a batch script
    that forwards it to mpirun) or every task (srun, --signal=TERM)."""
    args = ["--config", "jobs/demo.yaml", MLP, f"output.dir={tmp_path}", "name=job",
            f"policy.name={policy}", "budget.epochs=100000", "checkpoint.every_seconds=0.5",
            "optim.schedule.name=constant", "optim.warmup=0",
            "eval.every_epochs=3", "output.progress=false"]
    job = start(4, *args)
    folder = tmp_path / "job"
    try:
        deadline = time.monotonic() + 90
        while not list(folder.glob("checkpoints/gen-*/manifest.h5")):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.2)
        if how == "SIGUSR1 to mpiexec":
            job.send_signal(signal.SIGUSR1)  # mpiexec forwards it to the ranks
        else:
            ranks = rank_pids(job.pid)
            assert sorted(ranks) == [0, 1, 2, 3]
            for pid in ranks.values():
                os.kill(pid, signal.SIGTERM)
        out, err = job.communicate(timeout=60)  # bounded: still running after 60 s fails here
    finally:
        stop(job)
    assert job.returncode == 75, err[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exit"] == "preempted"
    assert "--resume" in out
    last = [read_lines(folder / f"rank-{r:05d}.jsonl")[-1]["iteration"] for r in range(4)]
    evals = folder / "eval.jsonl"  # the signal may come before the first evaluation
    evaluations = len(read_lines(evals)) if evals.exists() else 0

    more = summary["samples"] + 3000
    result = launch(4, "--resume", str(folder), "budget.epochs=null", f"budget.samples={more}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exit"] == "finished" and summary["samples"] >= more
    for rank in range(4):
        iterations = [r["iteration"] for r in read_lines(folder / f"rank-{rank:05d}.jsonl")]
        resumed = iterations[last[rank] + 1:]
        assert resumed and resumed[0] >= last[rank] - 1, "iterations continue, not restart"
    # A signal just after an evaluation point, before its evaluation ran, and
    # a resume too short for the next point leave no evaluation at all.
    numbers = [e["evaluation"] for e in read_lines(evals)] if evals.exists() else []
    assert numbers[:evaluations] == list(range(1, evaluations + 1))
    assert numbers == sorted(set(numbers)), "evaluations continue their numbering"
    assert summary["accuracy"] > 0.8


def test_resuming_an_older_generation_never_overwrites_newer_ones(finished_run, tmp_path):
    """Review finding 6: resuming from an old generation while later ones exist numbers
    the new ones after the largest present, and leaves the others byte for byte."""
    folder, _ = finished_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    complete = sorted(path.parent for path in (copy / "checkpoints").glob("gen-*/manifest.h5"))
    assert len(complete) >= 2, [g.name for g in complete]
    before = {path: path.read_bytes() for path in (copy / "checkpoints").rglob("*.h5")}
    newest = max(int(g.name[4:]) for g in (copy / "checkpoints").glob("gen-*"))
    result = launch(4, "--resume", str(complete[0]), "budget.epochs=null",
                    "budget.samples=8000", "checkpoint.every_iterations=null", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was overwritten"
    resumed = checkpoint.read_manifest(checkpoint.find_checkpoint(copy))
    assert resumed.generation == newest + 1, "the final generation follows the largest one"


@pytest.mark.long
def test_resume_refuses_another_model(finished_run):
    """(Another number of ranks is resumed: tests/test_resize.py.)"""
    folder, _ = finished_run
    result = launch(4, "--resume", str(folder), "model.name=logreg", "budget.epochs=8")
    assert result.returncode != 0
    assert "model" in " ".join(error_lines(result))


@pytest.mark.long
def test_a_corrupt_checkpoint_is_reported_not_loaded(finished_run, tmp_path):
    folder, _ = finished_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    newest = checkpoint.find_checkpoint(copy).parent
    victim = newest / "rank-00001.h5"
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    result = launch(4, "--resume", str(copy), "budget.epochs=8")
    assert result.returncode != 0
    lines = error_lines(result)
    assert lines and "rank-00001.h5" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.long
def test_divergence_stops_the_job_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    folder, _ = finished_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    before = checkpoint.find_checkpoint(copy)
    result = launch(4, "--resume", str(copy), "optim.lr=1e30", "optim.warmup=0",
                    "budget.epochs=40")
    assert result.returncode != 0
    assert "diverged" in " ".join(error_lines(result)), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    after = checkpoint.find_checkpoint(copy)
    assert after == before
    arrays, _ = checkpoint.read_rank_state(checkpoint.read_manifest(after), 0)
    assert np.isfinite(arrays["params"]).all()


def test_an_emulated_accelerator_paces_every_step_and_reports_overruns_and_cpu(tmp_path):
    # As bench/emulated.py runs it: the ranks' own models are not evaluated.
    result = launch(4, "--config", "jobs/demo.yaml", MLP, "budget.seconds=2",
                    "eval.every_seconds=1", "eval.rank_models=false", "output.progress=false",
                    f"output.dir={tmp_path}", "name=emulated", "checkpoint.enabled=false",
                    "emulate.step_seconds=0.02",
                    "stragglers={name: fixed, ranks: [1], slowdown: 4}", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "emulated accelerator: 0.02 s a step" in result.stdout
    summary = json.loads((tmp_path / "emulated" / "summary.json").read_text())
    assert summary["emulation"] == "emulated accelerator: 0.02 s a step"
    assert all(0 <= share <= 1 for share in summary["overrun_share"])
    assert all(share > 0 for share in summary["cpu_share"]) and len(summary["cpu_share"]) == 4
    for rank, step in ((0, 0.02), (1, 0.08)):
        records = read_lines(tmp_path / "emulated" / f"rank-{rank:05d}.jsonl")
        paced = [r for r in records if not r["overran"]]
        assert paced and all(r["compute"] == pytest.approx(step) for r in paced)
        assert summary["overrun_share"][rank] == pytest.approx(1 - len(paced) / len(records))
        # no step is shorter than the modelled one: the count is bounded by the time
        assert len(records) <= summary["seconds"] / step + 1
    evals = read_lines(tmp_path / "emulated" / "eval.jsonl")
    assert evals and all("rank_accuracy" not in e and 0 <= e["accuracy"] <= 1 for e in evals)


def test_clipping_the_gradient_norm_keeps_a_spike_from_killing_the_network(tmp_path):
    # At lr 3 with momentum 0.9 the first large gradients push every ReLU
    # below zero: the network's output is its last bias, at chance for good
    # (the collapse of docs/benchmarks.md). Clipped to norm 0.5, it learns.
    # One rank and a sample budget: the same steps every time, whatever the timing.
    steps = ["--config", "jobs/demo.yaml", MLP, "policy={name: allreduce}",
             "stragglers={name: none}", "optim.lr=3", "optim.warmup=0", "budget.epochs=2",
             "eval.every_epochs=1", "output.progress=false", f"output.dir={tmp_path}"]
    accuracy = {}
    for name, clip in (("free", []), ("clipped", ["optim.clip_grad_norm=0.5"])):
        result = launch(1, *steps, f"name={name}", *clip, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        accuracy[name] = json.loads((tmp_path / name / "summary.json").read_text())["accuracy"]
    assert accuracy["free"] < 0.2 < 0.6 < accuracy["clipped"], accuracy


# One case per stage where bad input is found: the config, a component built
# from it, the topology against the job's size, the data. Every config message
# is unit-tested in tests/test_config.py; these show that each stage ends the
# whole job with one line (2 ranks, each case its own job).
BAD_INPUT = [
    (["policy.name=aua"], "did you mean 'aau'"),
    (["data.partition.alpha=0"], "alpha must be a number > 0"),
    (["topology={file: topologies/two_clusters_8.yaml}"], "8 nodes but the job has 2 ranks"),
    (["data={name: mnist, root: /nonexistent}"], "nothing is downloaded"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUT, ids=[b[1] for b in BAD_INPUT])
def test_bad_input_ends_the_whole_job_with_one_line(overrides, message):
    result = launch(2, "--config", "jobs/demo.yaml", *overrides, timeout=60)
    assert result.returncode != 0
    lines = error_lines(result)
    assert lines and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  name: aau\n   tau: [1,\n")
    result = launch(2, "--config", str(bad), timeout=60)
    assert result.returncode != 0
    lines = error_lines(result)
    assert lines and "not valid YAML" in lines[0] and "Traceback" not in result.stderr
