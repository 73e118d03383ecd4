"""`python -m aau_mpi.doctor` under a real launcher, as users run it.

Like tests/test_train.py these tests are the launcher: each starts a real
`mpiexec` job in a subprocess with a hard timeout.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import ENV as LAUNCH_ENV

REPO = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).with_name("mpiexec")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ENV = {k: v for k, v in LAUNCH_ENV.items() if k not in THREAD_VARIABLES}
CHECKS = ["MPI", "ranks", "cores", "thread env", "one-sided", "passive progress", "deposit bandwidth", "devices"]

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")


def doctor(ranks, env=None, *args):
    return subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "aau_mpi.doctor",
                           "--megabytes", "4", "--busy-seconds", "0.5", *args],
                          cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def rows(stdout):
    """check name -> (the rest of its line, verdict)."""
    table = {}
    for line in stdout.splitlines():
        for check in CHECKS:
            if line.startswith(check + "  "):
                rest = line[len(check):]
                verdict = "warn" if "  warn  " in rest else "FAIL" if "  FAIL  " in rest else "ok"
                table[check] = (rest.strip(), verdict)
    return table


def test_two_ranks_on_two_cores_pass_every_check():
    cores = len(os.sched_getaffinity(0))
    result = doctor(2)
    assert result.returncode == 0, result.stderr[-3000:]
    table = rows(result.stdout)
    assert list(table) == CHECKS, result.stdout
    assert result.stdout.count("check ") == 1, "one table, from rank 0 only"
    assert "Open MPI" in table["MPI"][0] or "MPICH" in table["MPI"][0]
    assert table["ranks"][0].startswith("2 on 1 node, 2 per node")
    assert table["passive progress"][1] == "ok", result.stdout
    assert "GB/s vs memcpy" in table["deposit bandwidth"][0]
    assert "cpu" in table["devices"][0]
    if cores >= 2:
        assert all(verdict == "ok" for _, verdict in table.values()), result.stdout
        assert "training will work (0 warnings)" in result.stdout


def test_oversubscribed_threads_warn_with_the_fix_but_do_not_fail():
    cores = len(os.sched_getaffinity(0))
    result = doctor(2, {"OMP_NUM_THREADS": str(4 * cores)})
    assert result.returncode == 0, result.stderr[-3000:]
    line, verdict = rows(result.stdout)["thread env"]
    assert verdict == "warn" and f"OMP_NUM_THREADS={4 * cores}" in line
    assert "export OMP_NUM_THREADS=" in line, "the warning names the fix"
    assert "training will work (1 warning" in result.stdout


def test_more_ranks_than_cores_warn():
    cores = len(os.sched_getaffinity(0))
    result = doctor(2 * cores)
    assert result.returncode == 0, result.stderr[-3000:]
    line, verdict = rows(result.stdout)["cores"]
    assert verdict == "warn" and "more ranks than cores" in line


def test_bad_arguments_are_one_line():
    result = subprocess.run([sys.executable, "-m", "aau_mpi.doctor", "--megabytes", "lots"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid int value" in result.stderr and "Traceback" not in result.stderr


def test_window_mapping_tells_shared_from_private_memory():
    from aau_mpi.doctor import window_mapping
    maps = ("7f0be53ff000-7f0be5600000 rw-s 00000000 00:1b 323    "
            "/dev/shm/osc_rdma.vm.c2600001.3.4376 (deleted)\n"
            "7fd4d86fd000-7fd4d8800000 rw-p 00000000 00:00 0 \n")
    assert window_mapping(0x7f0be5400000, maps) == (True, "osc_rdma.vm.c2600001.3.4376")
    assert window_mapping(0x7fd4d86ff000, maps) == (False, "")
    assert window_mapping(0x1000, maps) is None


def test_transport_settings_name_what_is_set():
    from aau_mpi.doctor import transport_settings
    env = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_osc": "rdma", "MPIR_CVAR_NOLOCAL": "1"}
    assert transport_settings("Open MPI", env) == "OMPI_MCA_btl=self,tcp OMPI_MCA_osc=rdma"
    assert transport_settings("MPICH", env) == "MPIR_CVAR_NOLOCAL=1"
    assert transport_settings("MPI", env) == "MPI defaults"


def test_osc_settings_that_exclude_ucx_warn_only_across_nodes_with_rdma_devices():
    from aau_mpi.doctor import one_sided_advice
    env = {"OMPI_MCA_osc": "sm,rdma"}
    advice = one_sided_advice("Open MPI", env, one_node=False, devices=["mlx5_0"])
    assert "export OMPI_MCA_osc=sm,ucx,rdma" in advice and "mlx5_0" in advice
    assert one_sided_advice("Open MPI", env, one_node=True, devices=["mlx5_0"]) is None
    assert one_sided_advice("Open MPI", env, one_node=False, devices=[]) is None
    assert one_sided_advice("Open MPI", {}, one_node=False, devices=["mlx5_0"]) is None
    assert one_sided_advice("Open MPI", {"OMPI_MCA_osc": "sm,ucx,rdma"}, False, ["mlx5_0"]) is None
    assert one_sided_advice("MPICH", env, one_node=False, devices=["mlx5_0"]) is None
