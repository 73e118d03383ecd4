"""Deposit bandwidth against a plain memcpy of the same bytes (spec contract 4).

    mpiexec -n 2 python bench/mailbox_bandwidth.py [--sizes-mb 4 40 400] [--out FILE]

Rank 0 deposits into rank 1 (a full seqlocked deposit: three flushed steps),
and, for reference, makes a bare Put + Flush of the same bytes into the same
window. Rank 0 also times numpy's copy of the same bytes between two buffers
of its own. Medians of repeated runs, after one warm-up (page faults).
Prints a table and writes the numbers to bench/results/mailbox_bandwidth.json.
"""

import argparse
import datetime
import json
import os
import platform

import numpy as np
from mpi4py import MPI

import benchlib
from aau_mpi.comm.mailbox import Mailbox

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "mailbox_bandwidth.json")


def measure(comm, megabytes, repeats):
    floats = megabytes * 1_000_000 // 4
    ins, outs = ([0], []) if comm.rank == 1 else ([], [1])
    row = None
    with Mailbox(comm, ins, outs, floats) as mailbox:
        if comm.rank == 0:
            payload = np.random.default_rng(0).standard_normal(floats, dtype=np.float32)
            copy_target = np.empty_like(payload)
            offset = mailbox._target_table_bytes[1]

            def bare_put():
                mailbox.win.Put([payload, floats, MPI.FLOAT], 1, target=(offset, floats, MPI.FLOAT))
                mailbox.win.Flush(1)

            deposit = benchlib.median_seconds(lambda: mailbox.deposit(payload, iteration=0), repeats)
            put = benchlib.median_seconds(bare_put, repeats)
            memcpy = benchlib.median_seconds(lambda: np.copyto(copy_target, payload), repeats)
            nbytes = floats * 4
            row = {"megabytes": megabytes, "repeats": repeats,
                   "deposit_gb_s": nbytes / deposit / 1e9, "put_gb_s": nbytes / put / 1e9,
                   "memcpy_gb_s": nbytes / memcpy / 1e9, "deposit_over_memcpy": memcpy / deposit}
        comm.Barrier()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[4, 40, 400])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    benchlib.require_two_ranks(comm, "mailbox_bandwidth.py")
    rows = [measure(comm, mb, repeats=max(3, 200 // mb)) for mb in args.sizes_mb]
    if comm.rank != 0:
        return
    print(f"{'size':>8} {'deposit GB/s':>13} {'bare Put GB/s':>14} {'memcpy GB/s':>12} "
          f"{'deposit/memcpy':>15}")
    for r in rows:
        print(f"{r['megabytes']:>5} MB {r['deposit_gb_s']:>13.2f} {r['put_gb_s']:>14.2f} "
              f"{r['memcpy_gb_s']:>12.2f} {r['deposit_over_memcpy']:>15.2f}")
    result = {
        "benchmark": "mailbox_bandwidth",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "ranks": comm.size,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
