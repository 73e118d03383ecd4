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


# Rank 1 passes another value of one setting that all ranks must share.
DISAGREEING = {
    "policy": ("policy='dpsgd' if ctx.rank == 1 else 'aau'", "rank 0,2 aau, rank 1 dpsgd"),
    "topology": ("topology='exponential_one_peer' if ctx.rank == 1 else 'ring'",
                 "rank 0,2 ring(n=3), rank 1 exponential_one_peer(n=3)"),
    "batch size": ("batch_size=32 if ctx.rank == 1 else 64", "rank 0,2 64, rank 1 32"),
    "checksum": ("checksum=ctx.rank == 1", "rank 0,2 False, rank 1 True"),
}


@pytest.mark.parametrize("setting", list(DISAGREEING))
def test_ranks_that_disagree_on_a_setting_stop_at_construction(tmp_path, setting):
    """One line on every rank naming the setting and who differs, at once: not the
    watchdog's stall report after 300 s (a rank with another policy read
    misaligned headers until then)."""
    argument, who = DISAGREEING[setting]
    script = tmp_path / "disagree.py"
    script.write_text("import torch, aau_mpi\n"
                      "ctx = aau_mpi.init()\n"
                      "m = torch.nn.Linear(4, 2)\n"
                      "opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), "
                      f"lr=0.1), m, {argument})\n"
                      "for _ in range(5):\n"
                      "    opt.zero_grad(); m(torch.ones(1, 4)).sum().backward(); opt.step()\n"
                      "opt.finish()\n")
    result = run(3, script, timeout=60)  # the watchdog would take 300 s
    assert result.returncode != 0
    lines = error_lines(result)
    message = f"ranks disagree on {setting}: {who}: pass the same settings on every rank"
    assert sorted(line.split("]")[0] for line in lines) == ["[rank 0", "[rank 1", "[rank 2"], \
        result.stderr[-2000:]
    assert all(line.endswith(message) for line in lines), result.stderr[-2000:]


TRAPS = {
    "no budget": ("opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), "
                  "lr=0.1), m)\n"
                  "while not opt.should_stop() and opt.iteration < 5:\n"
                  "    opt.zero_grad(); m(torch.ones(1, 4)).sum().backward(); opt.step()\n"
                  "opt.finish()\n",
                  ["should_stop() never becomes true without a budget"]),
    "no finish": ("opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), "
                  "lr=0.1), m)\n"
                  "for _ in range(5):\n"
                  "    opt.zero_grad(); m(torch.ones(1, 4)).sum().backward(); opt.step()\n",
                  [f"rank {r} exited without opt.finish()" for r in (0, 1)]),
    "no gradients": ("opt = aau_mpi.DecentralizedOptimizer(torch.optim.SGD(m.parameters(), "
                     "lr=0.1), m)\n"
                     "for _ in range(5):\n"
                     "    opt.zero_grad(); opt.step()\n"
                     "opt.finish()\n",
                     [f"rank {r}: step() found no gradients" for r in (0, 1)]),
}


@pytest.mark.parametrize("trap", list(TRAPS))
def test_silent_traps_warn_once_in_one_line(tmp_path, trap):
    """A loop that cannot end, models left unaveraged, steps without gradients: each
    runs as written (exit 0) and says so once, in one line (per rank where the
    cause is the rank's own)."""
    code, expected = TRAPS[trap]
    script = tmp_path / "trap.py"
    script.write_text("import torch, aau_mpi\nctx = aau_mpi.init()\nm = torch.nn.Linear(4, 2)\n"
                      + code)
    result = run(2, script, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == len(expected), result.stderr[-2000:]
    for text in expected:
        assert sum(text in line for line in warnings) == 1, result.stderr[-2000:]
