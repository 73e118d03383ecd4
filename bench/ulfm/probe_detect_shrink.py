"""Probe: detecting a SIGKILLed rank without collectives, then Revoke/Agree/Shrink (question 7).

Before the death every rank holds, as aau_mpi does, a data window and a
control window in a Lock_all epoch (ERRORS_RETURN on both), and a
communicator `det` duplicated from COMM_WORLD. Survivors post a sentinel
`det.Ibarrier()` that cannot complete (the victim never enters it) and poll,
every millisecond, for up to --window seconds:

    sentinel        Ibarrier.Test() on det: ULFM completes a request that
                    involves a failed process with MPI_ERR_PROC_FAILED (or
                    MPI_ERR_REVOKED once someone revoked det)
    get-failed      COMM_WORLD.Get_failed(): the group of failed processes
                    this rank knows of (local, no communication)

The first rank whose sentinel raises revokes det, so the others' sentinels
raise MPI_ERR_REVOKED (the ULFM way to spread the news). Then every survivor:

    old-put-live    Put + Flush to a live rank in the old data window (still usable?)
    revoke(world)   COMM_WORLD.Revoke(): every pending/future call on world raises REVOKED
    old-put-live-after-revoke   the same Put + Flush once world is revoked
    shrink(world)   COMM_WORLD.Shrink(): a communicator of the survivors
                    (--rebuild create-group: COMM_WORLD.Create_group(survivors) instead,
                    MPI-3, collective over the survivors only, no ULFM)
    barrier / allreduce / iallreduce / agree   on the shrunk communicator
    new-win-*       Win.Allocate + Lock_all + Put/Flush to the next rank +
                    read back + Unlock_all + Free on the shrunk communicator
    get-failed / ack-failed / agree(world, after ack)   what world says afterwards
    free-old        (only with --free-old) Unlock_all + Free of the old windows
    finalize        MPI.Finalize (the old windows are leaked unless --free-old)

--no-sentinel polls only Get_failed (no pending request, no MPI progress
but that call) to see whether the failure is known without one.

Run (Open MPI wheel; root + oversubscription env as in the Makefile):

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe OMPI_MCA_osc=sm,rdma \
    timeout -k 5 60 /work/main/.venv/bin/mpirun --with-ft ulfm -n 4 \
        /work/main/.venv/bin/python bench/ulfm/probe_detect_shrink.py --victim 1

Run (MPICH wheel; survivors exist only when the victim leaves without a
signal, --kill exit; mpi4py's Revoke is not implemented there and its Shrink
hangs, --rebuild create-group works):

    timeout -k 5 60 /work/venv-mpich-probe/bin/mpiexec -disable-auto-cleanup -n 4 \
        /work/venv-mpich-probe/bin/python bench/ulfm/probe_detect_shrink.py --kill exit \
        --window 3 --rebuild create-group --no-world-after
"""

import time

from common import (MPI, RANK, SIZE, WORLD, Steps, arguments, banner, describe, errors_return,
                    kill_at, np, plan_death, say, wait_until)


def options(p):
    p.add_argument("--window", type=float, default=15.0, help="how long to poll for the death (s)")
    p.add_argument("--grace", type=float, default=0.5,
                   help="after the sentinel raised, poll Get_failed this long more (s)")
    p.add_argument("--no-sentinel", action="store_true", help="poll Get_failed only")
    p.add_argument("--rebuild", choices=["shrink", "create-group"], default="shrink",
                   help="make the survivors' communicator with Comm.Shrink or Comm.Create_group")
    p.add_argument("--no-revoke", action="store_true", help="do not revoke world")
    p.add_argument("--no-world-after", action="store_true",
                   help="skip get-failed/ack-failed/agree on world after the rebuild")
    p.add_argument("--free-old", action="store_true", help="try to free the old windows")


args = arguments(__doc__, options)
banner("probe_detect_shrink", args)
errors_return(WORLD)
steps = Steps(args.timeout)

data = MPI.Win.Allocate(64, disp_unit=1, comm=WORLD)
ctrl = MPI.Win.Allocate(8 * 4 if RANK == 0 else 0, disp_unit=8, comm=WORLD)
errors_return(data, ctrl)
det = WORLD.Dup()  # a communicator only for noticing failures
errors_return(det)
WORLD.Barrier()
data.Lock_all()
ctrl.Lock_all()
WORLD.Barrier()

t_death, victim_pid = plan_death(args)
kill_at(args, t_death, victim_pid)
victim = args.victim
alive = [r for r in range(SIZE) if r != victim]
live_target = alive[(alive.index(RANK) + 1) % len(alive)]
origin = np.full(1, 1000 + RANK, np.int64)


def old_put_live():
    data.Put([origin, 1, MPI.INT64_T], live_target, target=(8 * RANK, 1, MPI.INT64_T))
    data.Flush(live_target)


def failed_world_ranks(comm=WORLD):
    group = comm.Get_failed()
    ranks = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), WORLD.Get_group())
    return list(ranks)


# ---- detection: nobody makes a collective call ----------------------------
sentinel = None if args.no_sentinel else det.Ibarrier()
seen_sentinel = seen_failed = None
get_failed_works = True
deadline = t_death + args.window
while time.time() < deadline:
    if sentinel is not None and seen_sentinel is None:
        try:
            if sentinel.Test():
                seen_sentinel = ("completed (unexpected)", time.time() - t_death)
        except MPI.Exception as exc:
            seen_sentinel = (describe(exc), time.time() - t_death)
            say(f"step detect-sentinel: raised {seen_sentinel[0]} "
                f"{seen_sentinel[1]:.3f} s after the death")
            # ULFM: spread the news; the others' sentinels now raise REVOKED.
            steps("revoke(det)", det.Revoke)
    if get_failed_works and seen_failed is None:
        try:
            failed = failed_world_ranks()
        except Exception as exc:  # noqa: BLE001 (e.g. not implemented)
            say(f"step detect-get-failed: raised {describe(exc)}")
            get_failed_works = False
        else:
            if failed:
                seen_failed = (failed, time.time() - t_death)
                say(f"step detect-get-failed: ranks {failed} known failed "
                    f"{seen_failed[1]:.3f} s after the death")
    if seen_sentinel and (seen_failed or not get_failed_works
                          or time.time() > t_death + seen_sentinel[1] + args.grace):
        break  # the sentinel spoke; Get_failed had `grace` seconds more
    if sentinel is None and (seen_failed or not get_failed_works):
        break
    time.sleep(0.001)
if sentinel is not None and seen_sentinel is None:
    say(f"step detect-sentinel: nothing within {args.window:.0f} s of the death")
if get_failed_works and seen_failed is None:
    until = "the sentinel" if seen_sentinel else "the death"
    waited = (time.time() - t_death - seen_sentinel[1]) if seen_sentinel else args.window
    say(f"step detect-get-failed: nothing within {waited:.1f} s after {until}")
wait_until(t_death + 0.2)  # not before the death even if detection was "instant"

# ---- recovery -------------------------------------------------------------
steps("old-put-live(->%d)" % live_target, old_put_live)
if not args.no_revoke:  # a revoked world refuses Create_group (MPI_ERR_REVOKED)
    steps("revoke(world)", WORLD.Revoke)
    steps("old-put-live-after-revoke(->%d)" % live_target, old_put_live)


def create_group():
    # MPI-3 Comm_create_group is collective over the group's members only, so
    # the dead rank takes no part (no ULFM needed; the survivors must agree on
    # the group, here from --victim, in real code from Get_failed).
    group = WORLD.Get_group().Incl(alive)
    return WORLD.Create_group(group, tag=7)


rebuild = WORLD.Shrink if args.rebuild == "shrink" else create_group
ok, new = steps(f"{args.rebuild}(world)", rebuild,
                detail=lambda c: f"size {c.Get_size()}, my new rank {c.Get_rank()}")
if ok:
    errors_return(new)
    me, n = new.Get_rank(), new.Get_size()
    steps("barrier(shrunk)", new.Barrier)
    steps("allreduce(shrunk)", lambda: new.allreduce(RANK),
          detail=lambda v: f"sum of old ranks {v}, expected {sum(alive)}")
    buf, out = np.full(1, RANK, np.int64), np.zeros(1, np.int64)
    steps("iallreduce(shrunk)", lambda: (new.Iallreduce(buf, out, op=MPI.SUM).Wait(), int(out[0]))[1],
          detail=lambda v: f"sum {v}, expected {sum(alive)}")

    holder = {}

    def new_window():
        win = MPI.Win.Allocate(8 * n, disp_unit=8, comm=new)
        errors_return(win)
        np.frombuffer(win.tomemory(), np.int64)[:] = -1
        new.Barrier()
        win.Lock_all()
        new.Barrier()
        holder["win"] = win

    def new_put():
        win, peer = holder["win"], (me + 1) % n
        win.Put([origin, 1, MPI.INT64_T], peer, target=(me, 1, MPI.INT64_T))
        win.Flush(peer)
        new.Barrier()
        win.Sync()
        got = int(np.frombuffer(win.tomemory(), np.int64)[(me - 1) % n])
        return f"read {got} from my left neighbour's put"

    def new_free():
        holder["win"].Unlock_all()
        holder["win"].Free()

    if steps("new-win-allocate+lock-all(shrunk)", new_window)[0]:
        steps("new-win-put+flush+read(shrunk)", new_put, detail=lambda v: v)
        steps("new-win-unlock-all+free(shrunk)", new_free)

    # Agree returns the bitwise AND of the flags: 0xff with every rank's own bit cleared.
    steps("agree(shrunk)", lambda: new.Agree(0xff ^ (1 << me)),
          detail=lambda f: f"flag {f:#x}, expected {0xff ^ ((1 << n) - 1):#x}")

# After the shrink: what world still says (Agree on a revoked communicator is allowed).
if not args.no_world_after:
    steps("get-failed(world)", failed_world_ranks, detail=lambda r: f"ranks {r}")
    steps("ack-failed(world)", WORLD.Ack_failed, detail=lambda n: f"acknowledged {n}")
    steps("agree(world, after ack)", lambda: WORLD.Agree(1), detail=lambda f: f"flag {f}")
if args.free_old:
    steps("free-old: unlock-all(data)", data.Unlock_all)
    steps("free-old: free(data)", data.Free)
    steps("free-old: unlock-all+free(ctrl)", lambda: (ctrl.Unlock_all(), ctrl.Free()))
steps("finalize", MPI.Finalize)
say(f"survivor done {time.time() - t_death:.2f} s after the death")
