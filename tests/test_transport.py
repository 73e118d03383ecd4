"""Deposits between ranks that share no memory: the mailbox, the doctor and training over TCP.

Like tests/test_train.py these tests are the launcher: each starts a real MPI
job in a subprocess with its own hard timeout. The stack is the one whose
`mpiexec` sits beside this Python:

- Open MPI: every rank on its own "node". On one node `btl self,tcp` does not
  keep deposits off shared memory: osc rdma maps `MPI_Win_allocate` windows
  in /dev/shm whenever ranks share a node and puts into them with memcpy
  (measured, docs/clusters.md). So the test makes two Linux network
  namespaces on a bridge and has prte's ssh launcher start their daemons
  through an agent that runs `ip netns exec <host>` (needs root and `ip`;
  skipped otherwise). Then `btl self,tcp` + `osc rdma` really go over TCP.
- MPICH: `MPIR_CVAR_NOLOCAL=1` (every rank as if on its own node) and UCX
  restricted to TCP (`UCX_TLS=tcp,self`).

Over TCP neither stack gives passive progress by default; one setting does
(Open MPI: `btl_tcp_progress_thread=1`, MPICH: `MPIR_CVAR_ASYNC_PROGRESS=1`).
The mailbox and training tests run with it; the doctor, run without it, must
find no progress and name that setting (the control: it shows that these
ranks really depend on the network for their deposits).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from launcher import ENV, MLP, MPIEXEC, REPO

OPEN_MPI = (MPIEXEC.parent / "ompi_info").exists()
MPICH = (MPIEXEC.parent / "mpichversion").exists()
pytestmark = [pytest.mark.skipif(not (OPEN_MPI or MPICH),
                                 reason=f"no Open MPI or MPICH mpiexec beside {sys.executable}"),
              pytest.mark.long]

PROGRESS = ({"OMPI_MCA_btl_tcp_progress_thread": "1"} if OPEN_MPI
            else {"MPIR_CVAR_ASYNC_PROGRESS": "1"})
# Passive progress, torn reads (seqlock), headers, parity slots, staggered close;
# the racing writers make 200 deposits, not 1000, and the reader takes 2000 copies,
# not 10,000 (over TCP each costs milliseconds here).
MAILBOX_TESTS = ["-k", "computes or no_torn_reads or headers_round_trip or two_slots or close"]
RACE_WRITES = {"AAU_RACE_WRITES": "200", "AAU_RACE_COPIES": "2000"}


def _run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=15, **kwargs)


class Namespaces:
    """Network namespaces on one bridge, each a 'node' named like itself."""

    def __init__(self, count, tag):
        self.tag, self.names = tag, [f"{tag}{chr(ord('b') + i)}" for i in range(count)]
        self.subnet = f"10.78.{os.getpid() % 250 + 1}"
        self.bridge = f"{tag}br"

    def create(self):
        steps = [["ip", "link", "add", self.bridge, "type", "bridge"],
                 ["ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge],
                 ["ip", "link", "set", self.bridge, "up"]]
        for i, ns in enumerate(self.names):
            inside = ["ip", "netns", "exec", ns, "ip"]
            steps += [["ip", "netns", "add", ns],
                      ["ip", "link", "add", f"{ns}h", "type", "veth", "peer", "name", f"{ns}n"],
                      ["ip", "link", "set", f"{ns}n", "netns", ns],
                      ["ip", "link", "set", f"{ns}h", "master", self.bridge, "up"],
                      [*inside, "addr", "add", f"{self.subnet}.{i + 2}/24", "dev", f"{ns}n"],
                      [*inside, "link", "set", f"{ns}n", "up"],
                      [*inside, "link", "set", "lo", "up"]]
        for step in steps:
            result = _run(step)
            if result.returncode:
                return f"`{' '.join(step)}` failed: {result.stderr.strip()}"
        return None

    def delete(self):
        for ns in self.names:  # deleting a namespace deletes its veth pair
            _run(["ip", "netns", "del", ns])
        _run(["ip", "link", "del", self.bridge])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(mpiexec arguments for n ranks, environment) with no shared memory between ranks."""
    if MPICH:
        env = {**ENV, "MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ucx",
               "UCX_TLS": "tcp,self"}
        yield (lambda n: [str(MPIEXEC), "-n", str(n)]), env
        return
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("unshare")):
        pytest.skip("Open MPI across nodes needs root, `ip` and `unshare` for network "
                    "namespaces (on one node osc rdma keeps windows in shared memory)")
    namespaces = Namespaces(2, f"aau{os.getpid() % 10000}")
    problem = namespaces.create()
    try:
        if problem:
            pytest.skip(f"cannot make network namespaces here: {problem}")
        agent = tmp_path_factory.mktemp("agent") / "netns-agent.sh"
        # prte's ssh launcher runs `<agent> <host> <command>`; each host is a
        # namespace, and gets a hostname of its own so prte sees two nodes.
        agent.write_text('#!/bin/sh\nhost=$1; shift\n'
                         'exec ip netns exec "$host" unshare --uts sh -c "hostname $host; $*"\n')
        agent.chmod(0o755)
        subnet = f"{namespaces.subnet}.0/24"
        env = {k: v for k, v in ENV.items() if k != "PRTE_MCA_rmaps_default_mapping_policy"}
        env.update({"PRTE_MCA_plm_ssh_agent": str(agent), "PRTE_MCA_oob_tcp_if_include": subnet,
                    "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,tcp",
                    "OMPI_MCA_btl_tcp_if_include": subnet, "OMPI_MCA_osc": "rdma"})
        hosts = [socket.gethostname(), *namespaces.names]

        def command(n):
            return [str(MPIEXEC), "--host", ",".join(f"{h}:1" for h in hosts[:n]), "-n", str(n),
                    "--map-by", "node", "--bind-to", "none"]
        yield command, env
    finally:
        namespaces.delete()


def mpirun(stack, ranks, args, extra_env=None, timeout=60):
    command, env = stack
    return subprocess.run([*command(ranks), sys.executable, *args], cwd=REPO,
                          env={**env, **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def test_mailbox_contract_holds_between_ranks_that_share_no_memory(stack):
    """Passive progress, no torn reads, headers, parity slots and staggered
    close, on 3 ranks (the headers test needs 3)."""
    result = mpirun(stack, 3, ["-m", "mpi4py", "-m", "pytest", "--with-mpi", "-m", "mpi",
                               "-p", "no:cacheprovider", "--color=no", "-q", "-s",
                               "--timeout=40", "--timeout-method=thread",
                               "tests/test_mailbox_mpi.py", *MAILBOX_TESTS],
                    {**PROGRESS, **RACE_WRITES}, timeout=90)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert re.search(r"\b5 passed\b", result.stdout), result.stdout[-2000:]
    assert "skipped" not in result.stdout
    assert "deposit into a busy target returned after" in result.stdout


def doctor_rows(stdout):
    return {line.split("  ")[0]: line for line in stdout.splitlines()}


def test_doctor_finds_no_progress_without_the_setting_and_names_it(stack):
    """The control: over TCP, without the progress setting, a deposit waits
    for the busy target; the doctor fails and names the setting."""
    result = mpirun(stack, 2, ["-m", "aau_mpi.doctor", "--megabytes", "4", "--busy-seconds", "0.5"])
    rows = doctor_rows(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "windows private on all 2 ranks" in rows["one-sided"], result.stdout
    if OPEN_MPI:
        assert rows["ranks"].split("  ", 1)[1].strip().startswith("2 on 2 nodes"), result.stdout
    assert "FAIL" in rows["passive progress"], result.stdout
    assert next(iter(PROGRESS)) in rows["passive progress"], "the fix names the setting"


def test_training_finishes_between_ranks_that_share_no_memory(stack, tmp_path):
    """The demo job, 2 epochs, without its 4x straggler (whose sleep scales
    with compute time, which MPICH's spinning progress threads inflate here)."""
    result = mpirun(stack, 2, ["-m", "aau_mpi.train", "--config", "jobs/demo.yaml", MLP,
                               "budget.epochs=2", "stragglers={name: none}", "output.progress=false",
                               f"output.dir={tmp_path}", "name=tcp"], PROGRESS, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "tcp" / "summary.json").read_text())
    assert summary["exit"] == "finished" and summary["world_size"] == 2
