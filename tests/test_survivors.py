"""Losing a rank without losing the job (faults.on_rank_loss, aau_mpi.comm.survivors; issue 16).

The graph of the survivors is a unit test. The rest are launcher tests under
Open MPI's ULFM (`mpiexec --with-ft ulfm`), which is the only MPI here that
lets the survivors of a SIGKILL go on (docs/reliability.md): one of 8 ranks
is killed after the first evaluation, and with `continue` the 7 others
finish the job (exit 0) about as well as an unkilled run; with `abort` the
job ends within 60 s. Without ULFM the kill ends the job (tests/test_faults.py).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

from aau_mpi.decentralized import checkpoint
from aau_mpi.algorithms.graphs import Graph, generate, without

from launcher import (ENV, MLP, MPIEXEC, launch, launcher_required, rank_pids, read_lines,
                      start, stop)
from test_faults import wait_for

OPEN_MPI = "Open MPI" in MPI.Get_library_version()
ULFM = ["--with-ft", "ulfm"]
# 40 epochs of the digits over 8 ranks (about 15 s of training here); the kill
# lands after the first evaluation, at 5 epochs.
JOB = ["--config", "jobs/demo.yaml", MLP, "budget.epochs=40", "eval.every_epochs=5",
       "stragglers.name=none", "checkpoint.every_seconds=2", "output.progress=false"]
VICTIM = 3


# ---- the survivors' graph (no MPI) ---------------------------------------------


def test_a_generated_graph_is_generated_again_for_the_survivors():
    ring = generate("ring", 8)
    assert without(ring, [3]).edges == generate("ring", 7).edges
    one_peer = generate("exponential_one_peer", 8)
    assert without(one_peer, [0, 5]).name == generate("exponential_one_peer", 6).name


def test_a_given_graph_loses_the_ranks_and_is_reconnected_when_split():
    # 0-1-2-3 as an edge list: losing 1 leaves {0} and {2, 3}, numbered 0 and 1, 2.
    path = Graph(4, [(0, 1), (1, 2), (2, 3)], name="path")
    survivors = without(path, [1])
    assert survivors.n == 3
    assert sorted(survivors.edges) == [(0, 1), (1, 2)], "reconnected by one edge 0-1"
    assert "reconnected" in survivors.name
    # Losing an end does not split it: no edge added.
    assert sorted(without(path, [3]).edges) == [(0, 1), (1, 2)]
    assert "reconnected" not in without(path, [3]).name


# ---- a rank SIGKILLed under ULFM ---------------------------------------------------

ulfm_required = pytest.mark.skipif(not OPEN_MPI, reason="ULFM (mpiexec --with-ft ulfm) is "
                                   "Open MPI's; MPICH's launcher kills a lost rank's node")


def kill_after_first_evaluation(job, folder, timeout=120):
    wait_for(lambda: (folder / "eval.jsonl").exists()
             and (folder / "eval.jsonl").read_text().count("\n") >= 1, job,
             what="the first evaluation")
    os.kill(rank_pids(job.pid)[VICTIM], signal.SIGKILL)
    try:
        return job.communicate(timeout=timeout)  # a hang bound: the job must end
    except subprocess.TimeoutExpired:
        stop(job)
        err = job.communicate()[1]
        pytest.fail(f"the job did not end within {timeout} s of the kill; its stderr ends:\n"
                    f"{err[-6000:]}")


def generations_verify(folder):
    """Every committed generation loads, every rank file's crc32s check."""
    manifests = sorted(folder.glob("checkpoints/gen-*/manifest.h5"))
    for path in manifests:
        manifest = checkpoint.read_manifest(path)
        for rank in range(manifest.world_size):
            arrays, _ = checkpoint.read_rank_state(manifest, rank)
            assert np.isfinite(arrays["params"]).all()
    return [checkpoint.read_manifest(path).world_size for path in manifests]


@launcher_required()
@ulfm_required
@pytest.mark.long
@pytest.mark.parametrize("policy", ["aau", "async"])
@pytest.mark.timeout(420)  # two jobs, each with its own bound
def test_the_survivors_of_a_killed_rank_finish_the_job(tmp_path, policy):
    args = [*JOB, f"policy.name={policy}", f"output.dir={tmp_path}"]
    reference = launch(8, *args, "name=unkilled", "faults.on_rank_loss=continue",
                       launcher_args=ULFM, timeout=150)
    assert reference.returncode == 0, reference.stderr[-3000:]
    unkilled = json.loads((tmp_path / "unkilled" / "summary.json").read_text())

    folder = tmp_path / "killed"
    job = start(8, *args, "name=killed", "faults.on_rank_loss=continue", launcher_args=ULFM)
    try:
        out, err = kill_after_first_evaluation(job, folder)
    finally:
        stop(job)
    assert job.returncode == 0, err[-3000:]
    assert f"ranks [{VICTIM}] lost" in err and "going on with 7 ranks" in err, err[-3000:]

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exit"] == "finished" and summary["finished_ranks"] == 7
    assert [loss["ranks"] for loss in summary["lost_ranks"]] == [[VICTIM]]
    assert summary["samples"] >= 0.99 * unkilled["samples"], "the global budget went on"
    assert abs(summary["accuracy"] - unkilled["accuracy"]) <= 0.02, (summary["accuracy"],
                                                                      unkilled["accuracy"])
    # Evaluations go on after the loss, over the 7 survivors.
    records = read_lines(folder / "eval.jsonl")
    noted = [i for i, r in enumerate(records) if "lost_ranks" in r]
    assert len(noted) == 1 and records[noted[0]]["ranks_left"] == 7
    after = [r for r in records[noted[0]:] if "evaluation" in r]
    assert after and all(len(r["rank_accuracy"]) == 7 for r in after)
    numbers = [r["evaluation"] for r in records if "evaluation" in r]
    assert numbers == sorted(set(numbers)), "numbered on, none twice"
    # Checkpoints: the 8 ranks' generations intact, the survivors' written by 7.
    sizes = generations_verify(folder)
    assert sizes and sizes[-1] == 7, sizes


@launcher_required()
@ulfm_required
@pytest.mark.long
def test_with_abort_a_killed_rank_ends_the_job_under_ulfm(tmp_path):
    folder = tmp_path / "job"
    job = start(8, *JOB, "budget.epochs=100000", f"output.dir={tmp_path}", "name=job",
                "faults.on_rank_loss=abort", launcher_args=ULFM)
    try:
        out, err = kill_after_first_evaluation(job, folder, timeout=60)
    finally:
        stop(job)
    assert job.returncode != 0
    assert any("error: a rank of the job was lost" in line for line in err.splitlines()), \
        err[-3000:]
    generations_verify(folder)


def run_under_ulfm(tmp_path, source, ranks, *args, timeout, hang):
    """Run the script `source` on `ranks` ranks under ULFM; past `timeout` its ranks
    are killed and the test fails with `hang` (what did not happen)."""
    script = tmp_path / "script.py"
    script.write_text(source)
    job = subprocess.Popen([str(MPIEXEC), *ULFM, "-n", str(ranks), sys.executable, str(script),
                            *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(job)
        pytest.fail(f"{hang} within {timeout} s: {job.communicate()[1][-3000:]}")
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


REVOKED_MID_COLLECTIVE = """
import time
from mpi4py import MPI
from aau_mpi.comm.survivors import LossDetector, errors_return, explained_by_loss
world = errors_return(MPI.COMM_WORLD)
detector = LossDetector(world)
rank, size = world.Get_rank(), world.Get_size()
classes, unexplained = [], 0
for trial in range(40):  # the last rank revokes while the others enter an Ibarrier, staggered
    comm = errors_return(world.Dup())
    world.Barrier()
    if rank == size - 1:
        time.sleep(0.02)
        comm.Revoke()
    else:
        time.sleep(0.001 * ((3 * rank + trial) % 40))
        try:
            request = comm.Ibarrier()
            while not request.Test():
                pass
        except MPI.Exception as error:
            classes.append(error.Get_error_class())
            unexplained += not explained_by_loss(error, [comm], detector, grace=0)
    world.Barrier()
own_error = None  # an error of its own, nothing revoked, nobody lost: not a loss
try:
    world.Send(bytearray(1), dest=size + 1)
except MPI.Exception as error:
    own_error = explained_by_loss(error, [world], detector, grace=0.2)
revoked = sum(c == MPI.ERR_REVOKED for c in classes)
print(f"rank {rank}: revoked {revoked} other {len(classes) - revoked} unexplained {unexplained} "
      f"own error explained {own_error}", flush=True)
"""


@launcher_required()
@ulfm_required
def test_a_revocation_that_a_nonblocking_collective_reports_as_another_error_is_a_loss(tmp_path):
    """Open MPI's Ibarrier on a communicator revoked between two rounds of its
    schedule fails with MPI_ERR_OTHER, not MPI_ERR_REVOKED (it hung the survivor
    test above in CI: the rank ended with that error, the others waited for it).
    Every such error is read as the loss; an error of a rank's own is not."""
    result = run_under_ulfm(tmp_path, REVOKED_MID_COLLECTIVE, 8, timeout=120,
                            hang="the job did not end")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 8, result.stdout
    counts = [[int(word) for word in line.split()[3:8:2]] for line in lines]
    assert sum(other for _, other, _ in counts) > 0, f"the disguised error was not seen: {lines}"
    assert all(unexplained == 0 for _, _, unexplained in counts), lines
    assert all(line.endswith("own error explained False") for line in lines), lines


ABORT_AFTER_A_LOSS = """
import os, signal, time
from mpi4py import MPI
from aau_mpi.comm.survivors import LossDetector, RankLost, errors_return
from aau_mpi.comm.world import report_and_abort
world = errors_return(MPI.COMM_WORLD)
detector = LossDetector(world)
world.Barrier()
if world.Get_rank() == 3:
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)
while True:
    try:
        detector.check()
    except RankLost:
        break
    time.sleep(0.001)
report_and_abort("a rank of the job was lost")  # every survivor, at about the same moment
"""


@launcher_required()
@ulfm_required
def test_survivors_that_all_abort_after_a_loss_end_the_job(tmp_path):
    """Under ULFM MPI_Abort ends only its caller, and prterun deadlocked (all
    ranks gone, prterun waiting on a mutex for ever) in 4 of 15 jobs whose 7
    survivors aborted at the same moment; it hung the abort test above in CI.
    Eight such jobs must each end, with the survivors' exit status."""
    for attempt in range(8):
        result = run_under_ulfm(tmp_path, ABORT_AFTER_A_LOSS, 8, timeout=30,
                                hang=f"attempt {attempt}: the job did not end")
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.count("error: a rank of the job was lost") == 7, \
            result.stderr[-3000:]


HELD_LOCK = """
import os, signal, time
import numpy as np
from mpi4py import MPI
from aau_mpi.comm.survivors import StallGuard, errors_return
world = errors_return(MPI.COMM_WORLD)
rank = world.Get_rank()
words = 20_000_000
win = MPI.Win.Allocate(8 * words if rank == 0 else 0, disp_unit=8, comm=world)
win.Lock_all()
pids = world.allgather(os.getpid())
data = np.ones(words) if rank == 2 else None
guard = StallGuard(seconds=2, tick=0.1)
world.Barrier()
if rank == 2:  # each Accumulate holds rank 0's accumulate lock (osc sm) for tens of ms
    while True:
        win.Accumulate(data, 0, op=MPI.SUM)
        win.Flush(0)
if rank == 1:
    time.sleep(0.3)
    os.kill(pids[2], signal.SIGKILL)  # inside an Accumulate: the lock stays held
time.sleep(0.5)
one, out = np.ones(1), np.zeros(1)
with guard.atomic(0):
    win.Fetch_and_op(one, out, 0, 0, op=MPI.SUM)
    win.Flush(0)
print(f"rank {rank}: the atomic call returned", flush=True)
"""


@launcher_required()
@ulfm_required
def test_an_atomic_call_waiting_for_a_lock_a_dead_rank_holds_ends_its_rank(tmp_path):
    """Open MPI's osc sm serialises atomics on a target with a spinlock in shared
    memory; a rank killed inside an Accumulate leaves rank 0's held, and every
    later Fetch_and_op on rank 0 spins for ever (7 survivors of the trainer
    were found so, 2.5 h after the kill). The StallGuard ends each such rank
    with one line, so the job ends instead of hanging."""
    result = run_under_ulfm(tmp_path, HELD_LOCK, 3, timeout=60,
                            hang="the ranks waiting for the dead rank's lock did not end")
    assert "returned" not in result.stdout, result.stdout
    for rank in (0, 1):
        assert (f"[rank {rank}] error: an atomic one-sided call to rank 0 has not returned in 2 s"
                in result.stderr), result.stderr[-3000:]


ONE_RANK_FAILS = """
import sys, time, torch, aau_mpi
ctx = aau_mpi.init()
m = torch.nn.Linear(4, 2)
opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), m,
                                     policy=sys.argv[1], on_rank_loss=sys.argv[2], watchdog=None,
                                     schedule=aau_mpi.Schedule(time_budget=120))
x = torch.randn(8, 4)
while not opt.should_stop():
    opt.zero_grad(); m(x).pow(2).mean().backward(); opt.step()
    time.sleep(0.002)
    if ctx.rank == 2 and opt.iteration == 50:
        raise ValueError("a bad batch on rank 2")
opt.finish()
print(f"rank {ctx.rank}: finished", flush=True)
"""


@launcher_required()
@ulfm_required
@pytest.mark.parametrize("policy, mode", [("async", "continue"), ("aau", "abort"),
                                          ("allreduce", "abort")])
def test_one_ranks_error_ends_the_job_under_ulfm(tmp_path, policy, mode):
    """Under ULFM MPI_Abort ends only its caller, and nobody else notices: the
    others trained on (async) or waited in their collective for ever
    (allreduce). The failing rank records the failure and dies visibly; the
    others end with a line naming it, in either on_rank_loss mode."""
    result = run_under_ulfm(tmp_path, ONE_RANK_FAILS, 4, policy, mode, timeout=60,
                            hang="the job did not end after rank 2's error")
    out, err = result.stdout, result.stderr
    assert result.returncode != 0 and "finished" not in out, (out, err[-3000:])
    assert "ValueError: a bad batch on rank 2" in err, err[-3000:]
    for rank in (0, 1, 3):
        assert f"[rank {rank}] error: rank 2 ended the job with an error" in err, err[-3000:]


GUARDED_SLEEP = """
import sys, time
from aau_mpi.comm.survivors import StallGuard
guard = StallGuard(seconds=float(sys.argv[1]), tick=0.1)
print("inside", flush=True)
with guard.atomic(5):
    time.sleep(float(sys.argv[2]))
print("returned", flush=True)
"""


def test_the_stall_guard_counts_the_process_running_time_not_a_pause(tmp_path):
    """A call inside longer than `seconds` ends the process with its line; a whole
    process stopped (SIGSTOP, a suspended Slurm job) for longer is not a stall."""
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_SLEEP)
    stalled = subprocess.run([sys.executable, str(script), "1", "30"], env=ENV,
                             capture_output=True, text=True, timeout=20)
    assert stalled.returncode == -signal.SIGKILL and "returned" not in stalled.stdout
    assert "an atomic one-sided call to rank 5 has not returned in 1 s" in stalled.stderr

    paused = subprocess.Popen([sys.executable, str(script), "3", "6"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert paused.stdout.readline() == "inside\n"
    time.sleep(0.5)
    paused.send_signal(signal.SIGSTOP)
    time.sleep(4)
    paused.send_signal(signal.SIGCONT)
    out, err = paused.communicate(timeout=20)
    assert paused.returncode == 0 and "returned" in out, err[-2000:]


METRICS_ACROSS_A_LOSS = """
import os, signal, sys, time, torch, aau_mpi
ctx = aau_mpi.init()
m = torch.nn.Linear(4, 2)
opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), m, policy="async",
                                     on_rank_loss="continue", watchdog=None,
                                     schedule=aau_mpi.Schedule(sample_budget=3000))
x = torch.randn(8, 4)
handles = []
while not opt.should_stop():
    opt.zero_grad(); m(x).pow(2).mean().backward(); opt.step()
    time.sleep(0.002)
    if ctx.rank == 3:  # never posts: the others' averages cannot complete before it is lost
        if opt.iteration == 100:
            os.kill(os.getpid(), signal.SIGKILL)
    elif opt.iteration % 5 == 0:
        handles.append(opt.average_metric(float(len(handles))))
opt.finish()
wrong = [n for n, h in enumerate(handles) if not h.dropped and (not h.ready() or h.value != n)]
print(f"rank {ctx.rank}: dropped {sum(h.dropped for h in handles)} wrong {wrong}", flush=True)
"""


@launcher_required()
@ulfm_required
def test_metric_averages_in_flight_at_a_loss_are_dropped_and_later_ones_exact(tmp_path):
    """Ranks 0-2 average a metric every 5 steps; rank 3 never posts and is killed at
    its 100th step. The survivors' averages in flight then (all they had posted)
    are marked dropped, with a note; those posted after the loss are exact."""
    result = run_under_ulfm(tmp_path, METRICS_ACROSS_A_LOSS, 4, timeout=120,
                            hang="the job did not end")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(":")[0] for line in lines] == ["rank 0", "rank 1", "rank 2"], result.stdout
    assert all(line.endswith("wrong []") and "dropped 0 " not in line for line in lines), lines
    assert "ranks [3] lost" in result.stderr, result.stderr[-3000:]
    assert "metric averages in flight dropped (a rank was lost)" in result.stderr
