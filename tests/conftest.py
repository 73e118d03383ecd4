"""Test-suite plumbing.

Unit tests run in one plain pytest process. MPI tests (marked
`@pytest.mark.mpi(min_size=K)`) run under `mpiexec -n N python -m mpi4py -m
pytest --with-mpi`; there, a failing test on one rank would leave the other
ranks waiting in their next collective, so the failing rank prints its report
and aborts the whole job at once. The Makefile adds a per-test thread timeout
and an outer `timeout` so that a deadlock fails the run instead of hanging it.
"""

import sys

import pytest


def _under_mpi(config):
    return config.getoption("with_mpi", default=False)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    if not report.failed or not _under_mpi(pytest_runtest_logreport.config):
        return
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() > 1:
        sys.stderr.write(f"\n[rank {comm.Get_rank()}] FAILED {report.nodeid} ({report.when})\n"
                         f"{report.longreprtext}\n[rank {comm.Get_rank()}] aborting the job\n")
        sys.stderr.flush()
        comm.Abort(1)


def pytest_configure(config):
    pytest_runtest_logreport.config = config
    config.addinivalue_line("markers", "soak: long runs of many ranks (SOAK_SECONDS sets the length)")
    config.addinivalue_line("markers", "long: tests of a minute or more; `make test` (CI) runs "
                                       "them, `make test-fast` leaves them out")
