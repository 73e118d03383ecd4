"""The library API as users run it: the examples under mpiexec, and misuse that ends the job.

Launcher tests: each runs `mpiexec -n K python <script>` in a subprocess with
its own hard timeout, so a hang fails the test instead of the run.
"""

import re
import subprocess
import sys

import pytest

from launcher import ENV, MPIEXEC, REPO, error_lines, launcher_required

pytestmark = launcher_required()


def run(ranks, *args, timeout=120):
    return subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, *map(str, args)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def accuracy(result):
    found = re.search(r"test accuracy (\d\.\d+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    return float(found[1])


# Floors well below what the examples reach here (0.94-0.97 on 4 ranks), far
# above chance (0.1): a broken mix, step or average lands near chance.
def test_the_first_example_trains_in_a_plain_loop():
    result = run(4, "examples/train_digits.py", "--epochs", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert accuracy(result) > 0.85


@pytest.mark.long
def test_amp_clipping_and_a_torch_scheduler_work_unchanged():
    result = run(4, "examples/train_amp_clip_scheduler.py", "--steps", "150")
    assert result.returncode == 0, result.stderr[-3000:]
    assert accuracy(result) > 0.85
    assert "autocast bfloat16" in result.stdout or "autocast float16" in result.stdout


MISUSE = {
    "no init": ("import torch, aau_mpi\n"
                "m = torch.nn.Linear(4, 2)\n"
                "aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)\n",
                "aau_mpi.init() was not called"),
    "different models": ("import torch, aau_mpi\n"
                         "ctx = aau_mpi.init()\n"
                         "m = torch.nn.Linear(4, 2 + (ctx.rank == 1))\n"
                         "aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)\n"
                         "ctx.comm.Barrier()\n",
                         "ranks built different models"),
    "step after finish": ("import torch, aau_mpi\n"
                          "ctx = aau_mpi.init()\n"
                          "m = torch.nn.Linear(4, 2)\n"
                          "opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)\n"
                          "opt.finish()\n"
                          "if ctx.rank == 0: opt.step()\n"
                          "ctx.comm.Barrier()\n",
                          "is closed (finish() was called)"),
    "averaged after finish": ("import torch, aau_mpi\n"
                              "ctx = aau_mpi.init()\n"
                              "m = torch.nn.Linear(4, 2)\n"
                              "opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)\n"
                              "opt.finish()\n"
                              "with opt.averaged(): pass\n",
                              "averaged() after finish(): the model already holds the average"),
    "load_state_dict after step": ("import torch, aau_mpi\n"
                                   "ctx = aau_mpi.init()\n"
                                   "m = torch.nn.Linear(4, 2)\n"
                                   "opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)\n"
                                   "opt.step()\n"
                                   "opt.load_state_dict(opt.state_dict())\n"
                                   "opt.finish()\n",
                                   "load_state_dict() after step(): it is collective"),
    "one rank's state everywhere": ("import torch, aau_mpi\n"
                                    "ctx = aau_mpi.init()\n"
                                    "m = torch.nn.Linear(4, 2)\n"
                                    "opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)\n"
                                    "saved = ctx.comm.bcast(opt.state_dict() if ctx.rank == 0 else None)\n"
                                    "opt.load_state_dict(saved)\n"
                                    "opt.finish()\n",
                                    "1 of 2 ranks got another rank's state_dict()"),
    "metrics of different sizes": ("import torch, aau_mpi\n"
                                   "ctx = aau_mpi.init()\n"
                                   "m = torch.nn.Linear(4, 2)\n"
                                   "opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)\n"
                                   "opt.average_metric(1.0 if ctx.rank == 0 else [1.0, 2.0, 3.0])\n"
                                   "opt.finish()\n",
                                   "ranks posted values of different sizes as their k-th metric"),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_is_one_line_and_ends_the_job(tmp_path, case):
    code, message = MISUSE[case]
    script = tmp_path / "misuse.py"
    script.write_text(code)
    result = run(2, script, timeout=60)  # a hang fails here
    assert result.returncode != 0
    lines = error_lines(result)
    assert lines and all(message in line for line in lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


AVERAGED_IN_THE_LOOP = """
import time, torch, aau_mpi
ctx = aau_mpi.init()
m = torch.nn.Linear(4, 2)
opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), m, watchdog=3)
x = torch.randn(8, 4)
for _ in range(300):
    opt.zero_grad(); m(x).pow(2).mean().backward(); opt.step()
    if ctx.rank == 1:
        time.sleep(0.02)  # a straggler: the others run iterations ahead
    if opt.iteration % 10 == 0:
        with opt.averaged():
            pass
opt.finish()
"""


def test_a_blocking_average_in_the_loop_fails_fast_instead_of_deadlocking(tmp_path):
    """`with opt.averaged():` every 10 steps under aau with a straggler: the fast ranks
    blocked in it while the straggler waited for their next deposits, until the
    watchdog (3 s here) ended the job. Now every rank that reaches it stops at once
    with the one line naming the safe ways (the straggler, still waiting for the
    others' deposits, may be ended by the abort before it gets there)."""
    script = tmp_path / "averaged_in_loop.py"
    script.write_text(AVERAGED_IN_THE_LOOP)
    result = run(3, script, timeout=90)
    assert result.returncode != 0
    lines = error_lines(result)
    assert lines and all("averaged() outside on_evaluation" in line and "average_metric" in line
                         for line in lines), result.stderr[-2000:]
    assert "watchdog" not in result.stderr and "Traceback" not in result.stderr
