"""What the ULFM probes share: bounded steps, error naming, the planned death.

Only numpy and mpi4py (no torch, no aau_mpi), so the probes run in a bare
MPICH venv too. Every rank prints one line per observation:

    r0 step put-dead(->1): ok after 0.000 s
    r2 step detect-sentinel: raised MPI_ERR_PROC_FAILED (class 75 "...") 0.015 s after the death

and every step runs under a thread timer: if the MPI call has not returned
after `timeout` seconds the timer prints `HUNG` and ends the rank with
os._exit(3) (mpi4py releases the GIL inside blocking MPI calls, so the timer
thread runs while the main thread waits in MPI). For a call that keeps the
GIL (mpi4py's Finalize) a faulthandler watchdog, which needs no GIL, ends the
rank 2 s later and prints a stack naming the step (HUNG_STEP_<step>).

Mind that a rank ended by its timer is a second failure, and one that ULFM
does not see (an exit without Finalize is not reported as a process
failure): after a HUNG on one rank, the others' later steps are not
independent observations.

By default a Python handler records SIGUSR1 (MPICH's Hydra sends it to the
survivors when a rank exits); it replaces the C handler that MPICH installs
at MPI_Init. --keep-sigusr1 leaves MPICH's handler in place.
"""

import argparse
import faulthandler
import os
import signal
import sys
import threading
import time
import types

import numpy as np
from mpi4py import MPI

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def library():
    """'ompi 5.0.11' or 'mpich 5.0.2' (short tag for the output lines)."""
    text = MPI.Get_library_version()
    if text.startswith("Open MPI"):
        return "ompi " + text.split()[2].lstrip("v").rstrip(",")
    if text.startswith("MPICH"):
        return "mpich " + text.split()[2]
    return text.split("\n")[0][:30]


def say(text):
    sys.stdout.flush()
    os.write(1, f"r{RANK} {text}\n".encode())  # one write per line: lines of ranks do not mix


def _error_names():
    # Standard names first, the ULFM ones only where their value is free:
    # MPICH's mpi4py aliases ERR_PROC_FAILED/ERR_REVOKED, which MPICH lacks
    # as MPI_ names, to ERR_UNKNOWN's value.
    ulfm = ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED", "ERR_PROC_ABORTED")
    names = {}
    for name in [n for n in dir(MPI) if n.startswith("ERR_") and n not in ulfm] + list(ulfm):
        if name != "ERR_LASTCODE" and isinstance(getattr(MPI, name), int):
            names.setdefault(getattr(MPI, name), "MPI_" + name)
    return names


ERROR_NAMES = _error_names()


def describe(exc):
    """One line for an exception: the MPI error class, its name and the text."""
    if isinstance(exc, MPI.Exception):
        cls = exc.Get_error_class()
        text = exc.Get_error_string().replace("\n", " ").strip()
        return f'{ERROR_NAMES.get(cls, "?")} (class {cls} "{text[:110]}")'
    return f"{type(exc).__name__}: {str(exc)[:110]}"


class Steps:
    """Run named steps, each bounded by a timer; print one line per step."""

    def __init__(self, timeout):
        self.timeout = timeout
        self.results = {}

    def __call__(self, name, fn, timeout=None, detail=None):
        """(True, value) if fn returned, (False, exception) if it raised."""
        timeout = self.timeout if timeout is None else timeout
        t0 = time.perf_counter()

        def hung():
            say(f"step {name}: HUNG after {timeout:.0f} s (timer ends the rank with os._exit(3))")
            os._exit(3)

        timer = threading.Timer(timeout, hung)
        timer.daemon = True
        timer.start()
        # Backstop for a call that keeps the GIL (mpi4py's Finalize does, so
        # the timer thread cannot run): faulthandler's C watchdog thread needs
        # no GIL; it prints "Timeout (0:00:..)!" and every thread's stack, in
        # which the main thread sits in a function named HUNG_STEP_<step>,
        # then calls _exit(1).
        faulthandler.dump_traceback_later(timeout + 2, exit=True)
        try:
            value = _named_runner(name)(fn)
        except Exception as exc:  # noqa: BLE001 (report every kind)
            faulthandler.cancel_dump_traceback_later()
            timer.cancel()
            dt = time.perf_counter() - t0
            say(f"step {name}: raised {describe(exc)} after {dt:.3f} s")
            self.results[name] = ("raised", exc)
            return False, exc
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()
        dt = time.perf_counter() - t0
        extra = detail(value) if detail else None
        extra = f" ({extra})" if extra else ""
        say(f"step {name}: ok after {dt:.3f} s{extra}")
        self.results[name] = ("ok", value)
        return True, value


def _run(fn):
    return fn()


def _named_runner(step):
    """_run under the name HUNG_STEP_<step>, so that a faulthandler stack names the step."""
    label = "HUNG_STEP_" + "".join(ch if ch.isalnum() else "_" for ch in step)
    return types.FunctionType(_run.__code__.replace(co_name=label), globals())


def arguments(doc, extra=None):
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--victim", type=int, default=1, help="rank that dies")
    p.add_argument("--kill", choices=["self", "other", "exit"], default="self",
                   help="self: os.kill(os.getpid(), 9); other: the next rank SIGKILLs it; "
                        "exit: the victim calls os._exit(1) (a crash without Finalize)")
    p.add_argument("--delay", type=float, default=1.0,
                   help="seconds survivors wait after the planned death before probing")
    p.add_argument("--timeout", type=float, default=10.0, help="bound on each step (s)")
    p.add_argument("--keep-sigusr1", action="store_true",
                   help="leave SIGUSR1 at its default action (terminate); by default a handler "
                        "records it (MPICH's Hydra sends SIGUSR1 to survivors on a failure)")
    if extra:
        extra(p)
    args = p.parse_args()
    if not args.keep_sigusr1:
        signal.signal(signal.SIGUSR1, _record_sigusr1)
    return args


SIGUSR1_AT = []
T_DEATH = []  # set by plan_death


def _record_sigusr1(signum, frame):
    # Python runs this in the main thread between bytecodes, so it is late by
    # however long the main thread was inside an MPI call.
    now = time.time()
    SIGUSR1_AT.append(now)
    when = f"{now - T_DEATH[0]:.3f} s after the death" if T_DEATH else "before the death"
    os.write(1, f"r{RANK} step sigusr1: received (Hydra's failure notice) {when}\n".encode())


def errors_return(*handles):
    """ERRORS_RETURN on communicators and windows: errors become exceptions.

    MPI's default handler on a communicator (and on a window, inherited from
    its communicator at creation) is ERRORS_ARE_FATAL; mpi4py sets
    ERRORS_RETURN on COMM_WORLD/COMM_SELF at start-up, but windows are given
    it explicitly here, as the brief requires.
    """
    for h in handles:
        h.Set_errhandler(MPI.ERRORS_RETURN)


def plan_death(args, comm=WORLD):
    """Agree on the wall-clock instant of the death; return (t_death, victim pid).

    All ranks are on one node, so time.time() is one clock. The victim (or,
    with --kill other, the next rank) sends SIGKILL at t_death; survivors get
    back t_death and compute latencies from it.
    """
    pids = comm.allgather(os.getpid())
    t_death = comm.bcast(time.time() + 0.5, root=0)
    T_DEATH.append(t_death)
    return t_death, pids[args.victim]


def kill_at(args, t_death, victim_pid):
    """The victim (or its killer) acts at t_death; everybody else returns."""
    killer = (args.victim + 1) % SIZE if args.kill == "other" else args.victim
    if RANK == killer and args.kill == "exit":
        time.sleep(max(0.0, t_death - time.time()))
        say("exits with os._exit(1) (no Finalize)")
        os._exit(1)
    if RANK == killer:
        time.sleep(max(0.0, t_death - time.time()))
        say(f"kills pid {victim_pid} (rank {args.victim}) with SIGKILL ({args.kill})")
        os.kill(victim_pid, signal.SIGKILL)
    if RANK == args.victim:  # --kill other: wait for the bullet
        time.sleep(60)
        os._exit(9)


def wait_until(t):
    time.sleep(max(0.0, t - time.time()))


def banner(name, args):
    if RANK == 0:
        env = {k: v for k, v in os.environ.items()
               if k.startswith(("OMPI_MCA_osc", "OMPI_MCA_btl", "OMPI_MCA_mpi_ft", "MPIR_CVAR"))}
        print(f"== {name} {library()} n={SIZE} victim={args.victim} kill={args.kill} "
              f"delay={args.delay} env={env}", flush=True)


__all__ = ["MPI", "np", "WORLD", "RANK", "SIZE", "say", "describe", "Steps", "arguments",
           "errors_return", "plan_death", "kill_at", "wait_until", "banner", "library"]
