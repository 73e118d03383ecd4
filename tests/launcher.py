"""Helpers for tests that launch real MPI jobs, as users do: `mpiexec -n K python -m aau_mpi.train`.

Every job runs in a subprocess with a hard timeout, so a hang fails the test
instead of the run. Works with the Open MPI and the MPICH wheel (whichever
`mpiexec` sits beside this Python).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).with_name("mpiexec")
# scripts/mpi.env: Open MPI as root, more ranks than cores (what the Makefile exports).
MPI_ENV = dict(line.split("=", 1) for line in
               (REPO / "scripts" / "mpi.env").read_text().splitlines()
               if line and not line.startswith("#"))
ENV = {**os.environ, **MPI_ENV}
# The tests pin a small MLP: quick, and stable under any load on the machine.
MLP = "model={name: mlp, hidden: [64]}"
QUICK = [MLP, "budget.epochs=4", "eval.every_epochs=1", "output.progress=false"]


def launcher_required():
    return pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")


def command(ranks, *args, launcher_args=()):
    return [str(MPIEXEC), *launcher_args, "-n", str(ranks), sys.executable, "-m",
            "aau_mpi.train", *args]


def launch(ranks, *args, timeout=150, launcher_args=()):
    """Run a job to its end; a job that outlives `timeout` is a failure (a hang),
    and its ranks are killed with it."""
    job = start(ranks, *args, launcher_args=launcher_args)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(job)
        raise
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def start(ranks, *args, launcher_args=()):
    """Start a job in the background; the caller communicates and kills it."""
    return subprocess.Popen(command(ranks, *args, launcher_args=launcher_args), cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(launcher):
    """{rank: pid} of the job's ranks: the processes below the launcher (children
    with Open MPI, grandchildren under MPICH's proxy) that carry a rank in
    their environment."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            parents[int(pid)] = int(rest.rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    below, found = {launcher}, True
    while found:
        found = {pid for pid, parent in parents.items() if parent in below} - below
        below |= found
    ranks = {}
    for pid in below - {launcher}:
        try:
            environ = dict(item.split(b"=", 1) for item in
                           Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        rank = environ.get(b"OMPI_COMM_WORLD_RANK", environ.get(b"PMI_RANK"))
        if rank is not None and Path(f"/proc/{pid}/exe").resolve() == Path(sys.executable).resolve():
            ranks[int(rank)] = pid
    return ranks


def stop(job):
    """Kill a job's ranks, then its launcher. Killing only the launcher can leave
    ranks spinning (under ULFM 7 of them ran on for hours)."""
    if job.poll() is None:
        for pid in rank_pids(job.pid).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # it ended meanwhile
        job.kill()
    job.wait()


def error_lines(result):
    return [line for line in result.stderr.splitlines() if "error:" in line]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]
