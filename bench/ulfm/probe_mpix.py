"""Probe: MPICH's MPIX_Comm_* fault-tolerance calls, made directly with ctypes (question 8).

mpi4py 4.1.2's MPICH build does not call MPICH's MPIX_ functions: its
Comm.Revoke raises NotImplementedError and its Get_failed/Ack_failed/Shrink
are mpi4py's own fallbacks. libmpi.so.12 exports MPIX_Comm_revoke,
MPIX_Comm_shrink, MPIX_Comm_agree, MPIX_Comm_failure_ack and
MPIX_Comm_get_failed, so this probe calls them through ctypes (MPICH's ABI:
MPI_Comm and MPI_Group are C ints, the same numbers as mpi4py's `.handle`).

Setup as in probe_detect_shrink.py (data window in Lock_all, ERRORS_RETURN);
after the death every survivor runs, each step bounded by --timeout:

    mpix-get-failed     MPIX_Comm_get_failed(world), polled every ms until it names a
                        failed rank (local; the time after the death is printed)
    mpix-failure-ack    MPIX_Comm_failure_ack(world)
    mpix-revoke         MPIX_Comm_revoke(world)
    mpix-agree          MPIX_Comm_agree(world, &flag)
    mpix-shrink         MPIX_Comm_shrink(world, &new), then Barrier, allreduce and
                        a new window (Allocate + Lock_all + Put/Flush + Unlock_all + Free) on it
    finalize

--only STEP starts at STEP: a failed MPIR_Assert inside MPICH aborts the rank.

Only MPICH (Open MPI's handles are pointers; use probe_detect_shrink.py there).
Hydra SIGKILLs every rank of a node when one dies by a signal, so the victim
here leaves with os._exit(1) (--kill exit, the default in this probe):

    timeout -k 5 60 /work/venv-mpich-probe/bin/mpiexec -disable-auto-cleanup -n 4 \
        /work/venv-mpich-probe/bin/python bench/ulfm/probe_mpix.py
"""

import ctypes
import os
import sys
import time

from common import (MPI, RANK, SIZE, WORLD, Steps, arguments, banner, errors_return, kill_at, np,
                    plan_death, say, wait_until)

if not MPI.Get_library_version().startswith("MPICH"):
    sys.exit("probe_mpix.py is for MPICH only")
sys.argv += [] if "--kill" in sys.argv else ["--kill", "exit"]
args = arguments(__doc__, lambda p: p.add_argument(
    "--only", choices=["get-failed", "failure-ack", "revoke", "agree", "shrink"],
    help="start at this step (an MPICH assertion aborts the rank)"))
banner("probe_mpix", args)
errors_return(WORLD)
steps = Steps(args.timeout)

libmpi = ctypes.CDLL(os.path.join(os.path.dirname(os.path.dirname(sys.executable)),
                                  "lib", "libmpi.so.12"), mode=ctypes.RTLD_GLOBAL)
Comm = ctypes.c_int  # MPICH ABI: handles are ints


def check(code):
    """An MPI return code as an exception (the MPIX calls do not raise by themselves)."""
    if code != MPI.SUCCESS:
        raise MPI.Exception(code)


def mpix(name, *argtypes):
    fn = getattr(libmpi, name)
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


get_failed = mpix("MPIX_Comm_get_failed", Comm, ctypes.POINTER(ctypes.c_int))
failure_ack = mpix("MPIX_Comm_failure_ack", Comm)
revoke = mpix("MPIX_Comm_revoke", Comm)
agree = mpix("MPIX_Comm_agree", Comm, ctypes.POINTER(ctypes.c_int))
shrink = mpix("MPIX_Comm_shrink", Comm, ctypes.POINTER(ctypes.c_int))

data = MPI.Win.Allocate(64, disp_unit=1, comm=WORLD)
errors_return(data)
WORLD.Barrier()
data.Lock_all()
WORLD.Barrier()

t_death, victim_pid = plan_death(args)
kill_at(args, t_death, victim_pid)
wait_until(t_death + args.delay)
alive = [r for r in range(SIZE) if r != args.victim]
w = WORLD.handle


group_size = mpix("MPI_Group_size", ctypes.c_int, ctypes.POINTER(ctypes.c_int))


def do_get_failed():
    """Poll MPIX_Comm_get_failed every millisecond until it names a failed rank."""
    group, size = ctypes.c_int(), ctypes.c_int(0)
    while size.value == 0:
        check(get_failed(w, ctypes.byref(group)))
        check(group_size(group.value, ctypes.byref(size)))
        if size.value == 0:
            time.sleep(0.001)
    return (f"{size.value} failed rank(s) known {time.time() - t_death:.3f} s after the death "
            f"(group handle {group.value:#x})")


def do_agree():
    flag = ctypes.c_int(1)
    check(agree(w, ctypes.byref(flag)))
    return flag.value


def do_shrink():
    new = ctypes.c_int()
    check(shrink(w, ctypes.byref(new)))
    return MPI.Intracomm.fromhandle(new.value)


# A failed MPIR_Assert aborts the rank (and, through Hydra, the job), so
# --only runs the remaining steps from one of them on.
plan = [("get-failed", lambda: steps("mpix-get-failed(world)", do_get_failed, detail=str)),
        ("failure-ack", lambda: steps("mpix-failure-ack(world)", lambda: check(failure_ack(w)))),
        ("revoke", lambda: steps("mpix-revoke(world)", lambda: check(revoke(w)))),
        ("agree", lambda: steps("mpix-agree(world)", do_agree, detail=lambda f: f"flag {f}")),
        ("shrink", lambda: steps("mpix-shrink(world)", do_shrink,
                                 detail=lambda c: f"size {c.Get_size()}, new rank {c.Get_rank()}"))]
first = [name for name, _ in plan].index(args.only) if args.only else 0
ok = new = None
for name, run in plan[first:]:
    ok, new = run()
if plan[-1][0] == "shrink" and ok:
    errors_return(new)
    steps("barrier(shrunk)", new.Barrier)
    steps("allreduce(shrunk)", lambda: new.allreduce(RANK),
          detail=lambda v: f"sum of old ranks {v}, expected {sum(alive)}")

    def new_window():
        me, n = new.Get_rank(), new.Get_size()
        win = MPI.Win.Allocate(8 * n, disp_unit=8, comm=new)
        errors_return(win)
        np.frombuffer(win.tomemory(), np.int64)[:] = -1
        new.Barrier()
        win.Lock_all()
        win.Put([np.full(1, 1000 + RANK, np.int64), 1, MPI.INT64_T], (me + 1) % n,
                target=(me, 1, MPI.INT64_T))
        win.Flush((me + 1) % n)
        new.Barrier()
        win.Sync()
        got = int(np.frombuffer(win.tomemory(), np.int64)[(me - 1) % n])
        win.Unlock_all()
        win.Free()
        return f"read {got} from my left neighbour's put"

    steps("new-window(shrunk)", new_window, detail=lambda v: v)
steps("finalize", MPI.Finalize)
say(f"survivor done {time.time() - t_death:.2f} s after the death")
