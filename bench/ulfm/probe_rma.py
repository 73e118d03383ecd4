"""Probe: RMA windows in a Lock_all epoch when one rank is SIGKILLed (questions 1-6).

Sets up what aau_mpi holds: a data window per rank (Win.Allocate, 64 bytes,
the mailbox) and a control window on rank 0 (Win.Allocate, int64 words,
JobControl), both with ERRORS_RETURN and one Lock_all epoch. Then the victim
is SIGKILLed (by itself, or by the next rank) and, after --delay seconds,
every survivor runs these steps, each bounded by --timeout (a timer prints
HUNG and ends the rank):

    local-read      Win.Sync + read of its own window memory (a survivor's deposit is there)
    put-live        Put + Flush(t) to a live target (mailbox deposit)
    put-dead        Put + Flush(victim)
    fop-dead        Fetch_and_op(REPLACE) + Flush(victim) (the seqlock word)
    put-live-again  Put + Flush(t) after touching the dead target
    flush-all       Put to the live target + Flush_all (what Mailbox.deposit calls)
    ctrl-fop        Fetch_and_op(SUM) + Flush(0) on the control window (JobControl.add_samples)
    ctrl-cas        Compare_and_swap + Flush(0) (JobControl.announce)
    unlock-all      Win.Unlock_all on both windows
    free            Win.Free of the data window, then of the control window (collective)
    finalize        MPI.Finalize

With --victim 0 the control window's owner is the dead rank (question 5).
--order dead-first runs put-dead/fop-dead before put-live.

Run (Open MPI wheel; root + oversubscription env as in the Makefile):

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe OMPI_MCA_osc=sm,rdma \
    timeout -k 5 60 /work/main/.venv/bin/mpirun --with-ft ulfm -n 3 \
        /work/main/.venv/bin/python bench/ulfm/probe_rma.py --victim 1

Run (MPICH wheel; a SIGKILL there makes Hydra SIGKILL every rank of the
node, so --kill exit (os._exit(1)) is the case that leaves survivors;
MPIR_CVAR_ENABLE_FT=1 aborts in MPI_Init with this wheel):

    timeout -k 5 60 /work/venv-mpich-probe/bin/mpiexec -disable-auto-cleanup -n 3 \
        /work/venv-mpich-probe/bin/python bench/ulfm/probe_rma.py --victim 1 --kill exit

Common options (common.py): --victim R, --kill self|other|exit, --delay S,
--timeout S, --keep-sigusr1.
"""

import time

from common import (MPI, RANK, SIZE, WORLD, Steps, arguments, banner, errors_return, kill_at,
                    np, plan_death, say, wait_until)


def options(p):
    p.add_argument("--order", choices=["live-first", "dead-first"], default="live-first")
    p.add_argument("--skip", default="", help="comma-separated steps not to run")


args = arguments(__doc__, options)
banner("probe_rma", args)
errors_return(WORLD)
steps = Steps(args.timeout)

# Windows as aau_mpi makes them: Allocate, then Lock_all while everybody is in MPI.
data = MPI.Win.Allocate(64, disp_unit=1, comm=WORLD)
ctrl = MPI.Win.Allocate(8 * 4 if RANK == 0 else 0, disp_unit=8, comm=WORLD)
errors_return(data, ctrl)  # a window's handler is its own, not its communicator's
mine = np.frombuffer(data.tomemory(), np.int64)
mine[:] = -1
if RANK == 0:
    np.frombuffer(ctrl.tomemory(), np.int64)[:] = 0
WORLD.Barrier()
data.Lock_all()
ctrl.Lock_all()
WORLD.Barrier()

victim = args.victim
alive = [r for r in range(SIZE) if r != victim]
live_target = alive[(alive.index(RANK) + 1) % len(alive)] if RANK in alive else None
origin = np.full(1, 1000 + RANK, np.int64)
result = np.zeros(1, np.int64)
compare = np.zeros(1, np.int64)


def put(target, slot=RANK, flush_all=False):
    # Put to word `slot` of the target, completed at the target by Flush.
    data.Put([origin, 1, MPI.INT64_T], target, target=(8 * slot, 1, MPI.INT64_T))
    data.Flush_all() if flush_all else data.Flush(target)


def fop(win, target, disp, op):
    win.Fetch_and_op([origin, 1, MPI.INT64_T], [result, 1, MPI.INT64_T], target, disp, op=op)
    win.Flush(target)
    return int(result[0])


def cas(win, target, disp):
    compare[0] = 0
    win.Compare_and_swap(origin, compare, result, target, disp)
    win.Flush(target)
    return int(result[0])


def local_read():
    data.Sync()  # memory barrier between RMA writes into my window and my loads
    return mine[:SIZE].tolist()


# Sanity before the death: every rank deposits into every other rank.
for t in range(SIZE):
    if t != RANK:
        put(t)
data.Flush_all()
WORLD.Barrier()
if RANK == 0:
    say("baseline: puts + Flush_all to every rank ok before the death")

t_death, victim_pid = plan_death(args)
kill_at(args, t_death, victim_pid)
wait_until(t_death + args.delay)

plan = [
    ("local-read", local_read),
    ("put-live(->%d)" % live_target, lambda: put(live_target)),
    ("put-dead(->%d)" % victim, lambda: put(victim)),
    ("fop-dead(->%d)" % victim, lambda: fop(data, victim, 8 * RANK, MPI.REPLACE)),
    ("put-live-again(->%d)" % live_target, lambda: put(live_target)),
    ("flush-all(put->%d)" % live_target, lambda: put(live_target, flush_all=True)),
    ("ctrl-fop(rank 0 %s)" % ("dead" if victim == 0 else "alive"),
     lambda: fop(ctrl, 0, 0, MPI.SUM)),
    ("ctrl-cas(rank 0 %s)" % ("dead" if victim == 0 else "alive"), lambda: cas(ctrl, 0, 1)),
    ("local-read-again", local_read),
    ("unlock-all(data)", data.Unlock_all),
    ("unlock-all(ctrl)", ctrl.Unlock_all),
    ("free(data)", data.Free),
    ("free(ctrl)", ctrl.Free),
    ("finalize", MPI.Finalize),
]
if args.order == "dead-first":
    plan[1:5] = [plan[2], plan[3], plan[1], plan[4]]
skip = set(filter(None, args.skip.split(",")))
t_start = time.time()
for name, fn in plan:
    if name.split("(")[0] in skip:
        say(f"step {name}: skipped")
        continue
    steps(name, fn, detail=lambda v: None if v is None else f"value {v}")
say(f"survivor done {time.time() - t_death:.2f} s after the death")
