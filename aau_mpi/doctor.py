"""Check that this launcher, MPI and node layout can train: `python -m aau_mpi.doctor`.

    srun --mpi=pmix python -m aau_mpi.doctor          # under the training job's launcher
    mpirun -n 4 python -m aau_mpi.doctor

Run it exactly as training will run (same launcher, ranks, nodes, environment).
In a few seconds it measures and prints, on rank 0, one table:

  MPI             implementation and version
  ranks           ranks, nodes, ranks per node
  cores           cores per node against ranks per node, torch threads per rank
  thread env      OMP_NUM_THREADS and friends against the cores each rank has
  one-sided       where each rank's window lies (shared memory on the node, or
                  private: deposits cross the network) and the settings that
                  choose the transport (OMPI_MCA_osc/btl, MPIR_CVAR_NOLOCAL, ...)
  passive progress  a deposit into a rank that is computing without MPI calls
                    lands while it computes (spec contract 1: without it the
                    adaptive policy degenerates to waiting for the slowest)
  deposit bandwidth  concurrent ring deposits against numpy's memcpy
  devices         each rank's device; GPUs shared between ranks

A `warn` row names what will slow training down and how to fix it. Exit
status: 0 when training will work (warnings included), 1 when it will not
(no passive progress, or a deposit that never completes ends in an MPI error),
2 for bad arguments.
"""

import argparse
import math
import os
import socket
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

from aau_mpi.comm.mailbox import Mailbox
from aau_mpi.comm.world import init_world, install_abort_hook

OK, WARN, FAIL = "ok", "warn", "FAIL"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
SLOW_DEPOSIT_SECONDS = 0.1   # a deposit into a busy rank should take about a memcpy
SLOW_BANDWIDTH_RATIO = 0.05  # deposits at 1/20 of memcpy: a slow path is in use

# The setting that gives passive progress, per implementation, within a node and
# across nodes (docs/clusters.md, "Across nodes: no shared memory").
PROGRESS_FIX = {
    "Open MPI": "use the shared-memory/RDMA one-sided components: export OMPI_MCA_osc=sm,rdma "
                "(or osc=ucx on InfiniBand)",
    "MPICH": "export MPIR_CVAR_ASYNC_PROGRESS=1 (one progress thread per rank: leave it a core)",
    "Intel MPI": "export I_MPI_ASYNC_PROGRESS=1 (one progress thread per rank: leave it a core)",
}
PROGRESS_FIX_ACROSS_NODES = {
    "Open MPI": "over TCP (osc rdma on btl tcp): export OMPI_MCA_btl_tcp_progress_thread=1; "
                "on InfiniBand/RoCE let osc ucx do the RMA: export OMPI_MCA_osc=sm,ucx,rdma",
}
# Environment variables that choose the one-sided transport, per implementation.
TRANSPORT_VARIABLES = {
    "Open MPI": ("OMPI_MCA_pml", "OMPI_MCA_btl", "OMPI_MCA_osc", "OMPI_MCA_btl_tcp_progress_thread",
                 "UCX_TLS"),
    "MPICH": ("MPIR_CVAR_NOLOCAL", "MPIR_CVAR_CH4_NETMOD", "MPIR_CVAR_ASYNC_PROGRESS",
              "FI_PROVIDER", "UCX_TLS"),
    "Intel MPI": ("I_MPI_FABRICS", "I_MPI_OFI_PROVIDER", "I_MPI_ASYNC_PROGRESS", "FI_PROVIDER"),
}


def implementation():
    """(name, first line of the library's version string)."""
    # The first line, up to the build details after the first comma.
    version = " ".join(MPI.Get_library_version().strip().splitlines()[0].split(",")[0].split())
    for name in ("Open MPI", "Intel(R) MPI", "MPICH"):  # Intel MPI also says MPICH
        if name in version:
            return name.replace("(R)", ""), version
    return "MPI", version


class Report:
    def __init__(self):
        self.rows = []

    def add(self, check, result, verdict=OK, fix=""):
        self.rows.append((check, result, verdict, fix))

    def print(self, out=sys.stdout):
        headers = ("check", "result", "verdict", "what to do")
        widths = [max(len(str(row[i])) for row in [headers, *self.rows]) for i in range(3)]
        for row in [headers, *self.rows]:
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
            print("  ".join([*cells, row[3]]).rstrip(), file=out)
        warnings = sum(row[2] == WARN for row in self.rows)
        failures = [row[0] for row in self.rows if row[2] == FAIL]
        if failures:
            print(f"doctor: training will not work here ({', '.join(failures)}): see 'what to do'",
                  file=out)
        else:
            print(f"doctor: training will work ({warnings} warning{'s' * (warnings != 1)})",
                  file=out)
        out.flush()

    def exit_code(self):
        return 1 if any(row[2] == FAIL for row in self.rows) else 0


def check_layout(world, report):
    """Ranks per node, cores and threads: the trainer's own arithmetic."""
    name, version = implementation()
    report.add("MPI", f"{version} (MPI {'.'.join(map(str, MPI.Get_version()))})")
    host = socket.gethostname()
    per_node = world.comm.allgather((host, world.local_size, world.cores_per_node))
    nodes = {h: (ranks, cores) for h, ranks, cores in per_node}
    counts = sorted({ranks for ranks, _ in nodes.values()})
    report.add("ranks", f"{world.size} on {len(nodes)} node{'s' * (len(nodes) != 1)}, "
                        f"{'-'.join(map(str, counts))} per node")

    crowded = sorted(h for h, (ranks, cores) in nodes.items() if ranks > cores)
    threads = world.threads_per_rank()
    cores = f"{world.cores_per_node} cores for {world.local_size} ranks on {host}"
    if crowded:
        h = crowded[0]
        report.add("cores", f"{nodes[h][1]} cores for {nodes[h][0]} ranks on {h}", WARN,
                   "more ranks than cores: ranks time-share cores; run one rank per core "
                   "or give each rank its cores (srun --cpus-per-task, mpirun --map-by ...:PE=n)")
    else:
        report.add("cores", f"{cores}: torch threads per rank {threads}")

    # Thread pools outside torch (OpenMP, BLAS) size themselves from these.
    mine = {v: os.environ[v] for v in THREAD_VARIABLES if os.environ.get(v, "").isdigit()}
    share = max(1, world.cores_per_node // world.local_size)
    too_many = {v: n for v, n in mine.items() if int(n) > share}
    everyone = [t for t in world.comm.allgather(too_many) if t]
    if everyone:
        variable, value = next(iter(everyone[0].items()))
        report.add("thread env", f"{variable}={value}, {share} core{'s' * (share != 1)} per rank",
                   WARN, f"threads oversubscribe the cores: export {variable}={share} "
                         f"(or unset it; the trainer sets torch's threads itself)")
    else:
        report.add("thread env", ", ".join(f"{v}={n}" for v, n in mine.items()) or "unset")


def ring(world):
    """(in-neighbours, out-neighbours) of this rank on the ring."""
    if world.size == 1:
        return [], []
    return [(world.rank - 1) % world.size], [(world.rank + 1) % world.size]


def window_mapping(address, maps_text):
    """(shared, backing file name) of the mapping in /proc/<pid>/maps text that
    holds `address`; None when no line does. A shared mapping ('s' in its
    permissions) is memory that other processes on the node may map too: a
    deposit into it can be a plain memcpy (Open MPI's osc rdma puts such
    windows in /dev/shm whenever ranks share a node, whatever the btl). A
    private one ('p') is this process's alone: deposits reach it through the
    network (or the kernel)."""
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= address < high:
            path = fields[5].replace(" (deleted)", "").strip() if len(fields) > 5 else ""
            return fields[1][3:4] == "s", os.path.basename(path)
    return None


def transport_settings(name, environ):
    """The set variables that choose the one-sided transport, as `VAR=value` words."""
    chosen = [f"{v}={environ[v]}" for v in TRANSPORT_VARIABLES.get(name, ()) if environ.get(v)]
    return " ".join(chosen) or "MPI defaults"


def rdma_devices():
    """InfiniBand/RoCE devices of this node (Linux lists them in /sys/class/infiniband)."""
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def one_sided_advice(name, environ, one_node, devices):
    """The fix when the settings keep MPI off the node's RDMA network, else None:
    Open MPI's `OMPI_MCA_osc=sm,rdma` (right without UCX devices) excludes osc
    ucx, the component Open MPI documents for RMA over InfiniBand/RoCE."""
    osc = environ.get("OMPI_MCA_osc", "")
    if name == "Open MPI" and not one_node and devices and osc and \
            not osc.startswith("^") and "ucx" not in osc.split(","):
        return (f"RDMA devices ({', '.join(devices[:2])}) but OMPI_MCA_osc={osc} excludes ucx: "
                f"export OMPI_MCA_osc=sm,ucx,rdma (or unset it)")
    return None


def check_one_sided(world, mailbox, report):
    """Where each rank's window lies, and the settings behind it. Returns True
    when all ranks share one node's memory (every deposit is node-local)."""
    if world.size == 1:
        report.add("one-sided", "not measured with 1 rank")
        return True
    address = MPI.Get_address(mailbox.win.tomemory())
    try:
        with open("/proc/self/maps") as maps:
            found = window_mapping(address, maps.read())
    except OSError:  # not Linux
        found = None
    found = world.comm.allgather(found)
    one_node = world.comm.allreduce(world.local_size, op=MPI.MIN) == world.size
    name, _ = implementation()
    settings = transport_settings(name, os.environ)
    if any(f is None for f in found):
        where = "window memory not inspectable here"
    else:
        shared = sum(s for s, _ in found)
        backing = sorted({b.split(".")[0] for s, b in found if s and b})
        ranks = f"all {world.size}" if shared in (0, world.size) else f"{shared} of {world.size}"
        where = (f"windows private on {ranks} ranks" if not shared else
                 f"windows in shared memory on {ranks} ranks"
                 + (f" ({', '.join(backing)})" if backing else ""))
    if not one_node:
        where += ": deposits between nodes cross the network"
    advice = one_sided_advice(name, os.environ, one_node, rdma_devices())
    advice = next((a for a in world.comm.allgather(advice) if a), None)
    report.add("one-sided", f"{where}; {settings}", WARN if advice else OK, advice or "")
    return one_node


def colour(rank, size):
    """Phase in which this rank is the busy target; a rank and its predecessor
    on the ring never share one (an odd ring needs a third colour)."""
    if size % 2 and rank == size - 1:
        return 2
    return rank % 2


def check_passive_progress(world, mailbox, payload, busy_seconds, report, node_local=True):
    """Contract 1: each rank in turn computes without MPI calls while its ring
    predecessor deposits twice; the second deposit (started after the first
    returned) must land in the busy rank's memory before it stops computing."""
    if world.size == 1:
        report.add("passive progress", "not measured with 1 rank")
        return
    landed, started, seconds = True, True, []
    phases = 3 if world.size % 2 and world.size > 1 else 2
    busy_here = colour(world.rank, world.size)
    target_busy = colour((world.rank + 1) % world.size, world.size)
    for phase in range(phases):
        world.comm.Barrier()
        if busy_here == phase:
            second, first = busy_until_second_deposit(mailbox, busy_seconds)
            landed, started = landed and second, started and first
        elif target_busy == phase:
            time.sleep(0.1 * busy_seconds)  # let the target get busy
            for iteration in range(2):
                started_at = time.perf_counter()
                mailbox.deposit(payload, iteration=iteration)
                seconds.append(time.perf_counter() - started_at)
    world.comm.Barrier()
    landed_everywhere = world.comm.allreduce(landed, op=MPI.LAND)
    started_everywhere = world.comm.allreduce(started, op=MPI.LAND)
    slowest = world.comm.allreduce(max(seconds, default=0.0), op=MPI.MAX)
    result = f"deposit into a busy rank took up to {slowest * 1e3:.2f} ms"
    if not landed_everywhere and started_everywhere:
        # Part of a deposit landed while the target computed: progress, too slow to finish.
        report.add("passive progress", f"deposits landed only in part within the "
                   f"{busy_seconds:g} s busy period ({slowest:.2f} s each)", WARN,
                   f"slow one-sided path: rerun with --busy-seconds {math.ceil(4 * slowest)} "
                   f"to measure it")
    elif not landed_everywhere:
        name, _ = implementation()
        fix = PROGRESS_FIX.get(name, "enable your MPI's asynchronous progress")
        if not node_local:
            fix = PROGRESS_FIX_ACROSS_NODES.get(name, fix)
        report.add("passive progress", f"deposits waited for busy ranks ({slowest:.2f} s)", FAIL,
                   fix)
    elif slowest > SLOW_DEPOSIT_SECONDS:
        report.add("passive progress", result, WARN,
                   "deposits land, but slowly: check the one-sided component and network")
    else:
        report.add("passive progress", result)


def busy_until_second_deposit(mailbox, busy_seconds):
    """Compute for `busy_seconds` with no MPI call; returns (the second deposit
    landed meanwhile, anything landed meanwhile), seen as plain loads of this
    rank's own window (the first deposit's busy mark is its first write)."""
    work = np.ones((64, 64))
    second = first = False
    start = time.perf_counter()
    while time.perf_counter() - start < busy_seconds:
        work = np.tanh(work @ work)
        # A plain load of this rank's own window memory: headers() would call
        # Win_sync, an MPI call that could drive progress and hide its absence.
        if mailbox._table["seq"][0] >= 2:
            second = True
        if mailbox._table["version"][0] != 0:
            first = True
    return second, first


def median_seconds(action, repeats=5):
    """Median wall time of `action` over `repeats` calls, after one warm-up call
    (the first pays for page faults and lazy set-up). The benchmarks use it too."""
    action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def check_bandwidth(world, mailbox, payload, report):
    """Every rank deposits into its ring successor at once, as in training."""
    if world.size == 1:
        report.add("deposit bandwidth", "not measured with 1 rank")
        return
    copy = np.empty_like(payload)
    world.comm.Barrier()
    deposit = median_seconds(lambda: mailbox.deposit(payload, iteration=2))
    world.comm.Barrier()
    memcpy = median_seconds(lambda: np.copyto(copy, payload))
    gb = payload.nbytes / 1e9
    ratios = world.comm.allgather(memcpy / deposit)
    slowest = int(np.argmin(ratios))
    deposit_gbs = world.comm.allreduce(gb / deposit, op=MPI.MIN)
    memcpy_gbs = world.comm.allreduce(gb / memcpy, op=MPI.MIN)
    result = (f"{deposit_gbs:.1f} GB/s vs memcpy {memcpy_gbs:.1f} GB/s "
              f"({payload.nbytes >> 20} MiB, slowest rank {slowest}: {ratios[slowest]:.2f}x)")
    if ratios[slowest] < SLOW_BANDWIDTH_RATIO:
        report.add("deposit bandwidth", result, WARN,
                   "deposits take a slow path: check the one-sided component "
                   "(Open MPI: OMPI_MCA_osc) and that MPI uses the fast network")
    else:
        report.add("deposit bandwidth", result)


def check_devices(world, report):
    """The device each rank trains on; two ranks on one GPU halve both."""
    import torch
    from aau_mpi.decentralized.device import node_device
    device = node_device(world)
    identity = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        identity = (socket.gethostname(), str(getattr(properties, "uuid", device.index)))
    devices = world.comm.allgather((str(device), identity))
    users = {}
    for rank, (_, gpu) in enumerate(devices):
        if gpu:
            users.setdefault(gpu, []).append(rank)
    shared = [ranks for ranks in users.values() if len(ranks) > 1]
    kinds = sorted({d for d, _ in devices})
    summary = f"{', '.join(kinds)}; {len(users)} GPU{'s' * (len(users) != 1)} for {world.size} ranks" \
        if users else f"{', '.join(kinds)} (no CUDA device visible)"
    if shared:
        report.add("devices", f"{summary}: ranks {shared[0]} share a GPU", WARN,
                   "give each rank its own GPU: srun --gpus-per-task=1, or as many ranks "
                   "per node as GPUs (--ntasks-per-node)")
    elif users and len(users) < world.size:
        report.add("devices", f"{summary}: some ranks have no GPU", WARN,
                   "request GPUs on every node, one per rank")
    else:
        report.add("devices", summary)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m aau_mpi.doctor",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=16,
                        help="deposit size for the progress and bandwidth checks (16)")
    parser.add_argument("--busy-seconds", type=float, default=1.0,
                        help="how long a target computes without MPI calls (1.0)")
    args = parser.parse_args(argv)
    install_abort_hook()
    world = init_world()
    report = Report()
    check_layout(world, report)
    floats = max(1, args.megabytes * (1 << 20) // 4)
    payload = np.random.default_rng(world.rank).standard_normal(floats, dtype=np.float32)
    ins, outs = ring(world)
    with Mailbox(world.comm, ins, outs, floats) as mailbox:
        node_local = check_one_sided(world, mailbox, report)
        check_passive_progress(world, mailbox, payload, args.busy_seconds, report, node_local)
        check_bandwidth(world, mailbox, payload, report)
        world.comm.Barrier()
    check_devices(world, report)
    if world.rank == 0:
        report.print()
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
