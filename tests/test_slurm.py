"""The Slurm templates in jobs/slurm/, submitted to a real one-node Slurm cluster.

`make test-slurm` installs Debian's Slurm packages if it may (root, apt) and
runs these tests; each module run starts its own cluster with
scripts/slurm-cluster.sh in a temporary folder and stops it at the end. The
GPU templates are submitted as they are, with command-line options that turn
the GPU request off (`--gpus-per-task=0`, `--gres=none`), the demo job and a
small MLP: the same scripts, signal path and requeue a GPU cluster runs.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import ENV

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "scripts" / "slurm-cluster.sh"
QUICK = ["model={name: mlp, hidden: [64]}", "output.progress=false", "eval.every_epochs=1"]
CPU = {"srun": ["--gpus-per-task=0", "--cpus-per-task=1"],
       "mpirun": ["--gres=none", "--cpus-per-task=1"]}

missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(tool)]
pytestmark = [
    pytest.mark.skipif(os.environ.get("AAU_SLURM_TESTS") != "1",
                       reason="Slurm tests run with `make test-slurm` (it installs Slurm and "
                              "starts a one-node cluster)"),
    pytest.mark.skipif(bool(missing), reason=f"Slurm is not installed ({', '.join(missing)} "
                       f"missing): `scripts/slurm-cluster.sh install` needs root and apt"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment in which sbatch reaches a fresh cluster, and jobs find
    the venv's python and mpirun and the Open MPI settings."""
    folder = tmp_path_factory.mktemp("slurm")
    env = {**ENV, "SLURM_CLUSTER_DIR": str(folder / "cluster"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    started = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stderr
    env["SLURM_CONF"] = str(folder / "cluster" / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, timeout=120)


def slurm_command(env, *args, timeout=60):
    result = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout


def job_field(env, job, field):
    """A field of `scontrol show job`, or None once the job has left the controller."""
    result = subprocess.run(["scontrol", "show", "job", str(job)], env=env,
                            capture_output=True, text=True, timeout=30)
    match = re.search(rf"\b{field}=(\S+)", result.stdout)
    return match.group(1) if match else None


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.5)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.long
@pytest.mark.parametrize("template,launcher", [("gpu-1node-mpirun.sbatch", "mpirun"),
                                               ("gpu-1node-srun.sbatch", "srun")])
def test_a_signalled_job_checkpoints_requeues_itself_and_resumes(slurm, tmp_path, template,
                                                                  launcher):
    run, log = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm, "RUN": str(run), "CONFIG": "jobs/demo.yaml"}
    job = slurm_command(env, "sbatch", "--parsable", *CPU[launcher], f"--output={log}",
                        f"jobs/slurm/{template}", *QUICK, "budget.epochs=null",
                        "budget.seconds=10", "checkpoint.every_seconds=0.5").strip()
    wait_until(lambda: list(run.glob("checkpoints/gen-*/manifest.h5")), 120, "a checkpoint")
    # What --signal=B:USR1@<s> does before the time limit: signal the batch shell.
    slurm_command(env, "scancel", "--signal=USR1", "--batch", job)
    wait_until(lambda: job_field(env, job, "Restarts") == "1", 90, "a requeue")
    preempted = json.loads((run / "summary.json").read_text())
    assert preempted["exit"] == "preempted"
    last = read_lines(run / "rank-00000.jsonl")[-1]["iteration"]
    # Slurm holds a requeued job for about two minutes before it may start
    # again; the test lets it start sooner, but not within the second of the
    # requeue (slurmd refuses that start: "Job credential revoked").
    slurm_command(env, "scontrol", "update", f"JobId={job}", "StartTime=now+3")
    wait_until(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED", None), 180,
               "the resumed job to end")
    assert job_field(env, job, "JobState") in ("COMPLETED", None), log.read_text()[-3000:]

    output = log.read_text()
    assert f"job {job} start 1: new run {run}" in output
    assert f"preempted after a checkpoint; requeueing job {job}" in output
    assert f"job {job} start 2: resuming {run}" in output, "the log survives the requeue"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exit"] == "finished" and summary["world_size"] == 4
    iterations = [r["iteration"] for r in read_lines(run / "rank-00000.jsonl")]
    assert iterations.count(0) == 1, "the resumed job continued, it did not start again"
    assert iterations[-1] > last


@pytest.mark.long
def test_a_sweep_runs_every_point_and_collects_one_table(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**slurm, "CONFIG": "jobs/demo.yaml", "SWEEP": str(sweep), "POLICIES": "aau dpsgd",
           "SEEDS": "0", "STRAGGLERS": "slow1"}
    slurm_command(env, "sbatch", "--wait", "--array=0-1", *CPU["srun"],
                  f"--output={tmp_path}/sweep-%a.out", "jobs/slurm/sweep.sbatch", *QUICK,
                  "budget.epochs=2", timeout=300)
    runs = sorted(p.name for p in sweep.iterdir())
    assert runs == ["aau-seed0-slow1", "dpsgd-seed0-slow1"]
    for name in runs:
        summary = json.loads((sweep / name / "summary.json").read_text())
        assert summary["exit"] == "finished" and summary["policy"] == name.split("-")[0]

    table = slurm_command(env, "scripts/collect-sweep.sh", str(sweep))
    assert "aau" in table and "dpsgd" in table and "accuracy" in table
    assert (sweep / "plots" / "accuracy.png").stat().st_size > 0
    assert (sweep / "plots" / "runs.md").exists()


def test_a_point_outside_the_grid_is_one_line(slurm, tmp_path):
    env = {**slurm, "CONFIG": "jobs/demo.yaml", "POLICIES": "aau", "SEEDS": "0",
           "STRAGGLERS": "none", "SWEEP": str(tmp_path / "sweep")}
    result = subprocess.run(["sbatch", "--wait", "--array=1", *CPU["srun"],
                             f"--output={tmp_path}/out", "jobs/slurm/sweep.sbatch"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "outside the grid of 1 points: submit with --array=0-0" in (tmp_path / "out").read_text()


@pytest.mark.long
def test_the_elastic_template_resumes_on_the_ranks_a_later_start_gets(slurm, tmp_path):
    """jobs/slurm/elastic.sbatch: a start runs on the tasks Slurm gave it, and one that
    finds a checkpoint in RUN resumes it on its own number of ranks. The one-node
    cluster cannot vary the nodes; two submissions of 2 and 3 tasks stand in for
    two starts on different node counts."""
    run = tmp_path / "run"
    env = {**slurm, "RUN": str(run), "CONFIG": "jobs/demo.yaml"}
    for tasks, epochs in ((2, 2), (3, 4)):
        slurm_command(env, "sbatch", "--wait", *CPU["srun"], "--nodes=1",
                      f"--ntasks-per-node={tasks}", f"--output={tmp_path}/job-{tasks}.out",
                      "jobs/slurm/elastic.sbatch", *QUICK, f"budget.epochs={epochs}",
                      timeout=300)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["exit"] == "finished" and summary["world_size"] == tasks
    first, second = ((tmp_path / f"job-{tasks}.out").read_text() for tasks in (2, 3))
    assert "1 node(s), 2 ranks" in first and f"new run {run}" in first
    assert "1 node(s), 3 ranks" in second and f"resuming {run}" in second
    assert "resuming 2 ranks' checkpoint gen-" in second and " on 3 ranks: " in second
    assert summary["samples"] >= 4 * 1437
