"""The stall watchdog: report, and act on, a neighbour or a rank that stopped taking part.

Two ways a job can stall:
- a rank waits (for neighbours' deposits, in a collective) longer than
  `seconds`: `waiting()` reports it once per wait, naming each neighbour's
  last seq, the age of its last deposit and whether it is fresh;
- a neighbour stops depositing while this rank never waits for it (the
  wait-free policies): `observe()` notices a neighbour whose sequence number
  has not moved for `seconds` on this rank's clock.
Then, with `action: auto`, asynchronous policies go on without the stalled
neighbours (`policy.skip`: not waited for and not mixed until they deposit
again), and a synchronous policy, or a wait in a collective, which nobody
can leave without the missing rank, ends the job with EXIT_STALLED; `warn`
only reports; `abort` always ends the job.
"""

import sys
import time

import numpy as np

from aau_mpi.base import checks
from aau_mpi.base.settings import WATCHDOG_ACTIONS as ACTIONS
from aau_mpi.comm.world import report_and_abort

EXIT_STALLED = 3
# A gap this long between two polls of one wait is a pause of this rank itself
# (SIGSTOP, a suspended job), not waiting for others: it counts as this much.
# Polls are milliseconds apart (an evaluation served inside a wait resets it).
PAUSE_SECONDS = 1.0


class Watchdog:
    """One rank's watchdog. `seconds=None` switches it off."""

    def __init__(self, seconds=300.0, action="auto"):
        self.seconds = None if seconds is None else checks.number("watchdog.seconds", seconds,
                                                                  above=0)
        self.action = checks.choice("watchdog.action", action, ACTIONS)
        self._waited, self._last_poll = 0.0, None
        self._reported = False
        self._heard = None          # (seq per neighbour, monotonic time its seq last moved)
        self.comm, self.rank = None, 0

    def bind(self, comm, rank):
        """The job that a stall ends, and the rank that reports."""
        self.comm, self.rank = comm, rank

    def reset(self):
        """The wait ended (a step completed, a collective returned)."""
        self._last_poll, self._reported = None, False

    def waiting(self, where=None, inspect=None, synchronous=True):
        """Call while waiting. `where`: None (for neighbours) or the collective's name.

        `inspect()` -> (report of the neighbours, indices of the stalled ones,
        skip(indices)) is only called once the wait is too long.
        """
        if self.seconds is None:
            return
        now = time.monotonic()
        if self._last_poll is None:
            self._waited = 0.0
        else:
            self._waited += min(now - self._last_poll, PAUSE_SECONDS)
        self._last_poll = now
        waited = self._waited
        if waited < self.seconds or self._reported:
            return
        self._reported = True  # once per wait
        place = f"in {where}" if where else "for its neighbours"
        report, stalled, skip = inspect() if inspect else ("", [], None)
        head = f"rank {self.rank} has waited {waited:.1f} s {place}"
        self.act(f"{head}; {report}" if report else head, stalled, skip,
                 must_end=where is not None or synchronous or not stalled)

    def act(self, report, stalled, skip, must_end):
        """Report a stall; go on without `stalled` (skip) or end the job, per the action."""
        if self.action == "abort" or (self.action == "auto" and must_end):
            report_and_abort(f"watchdog: {report}: ending the job (watchdog.seconds="
                             f"{self.seconds:g}, action {self.action})", EXIT_STALLED, self.comm)
        if self.action == "auto":
            skip(stalled)
            report += "; going on without them until they deposit again"
        print(f"[rank {self.rank}] watchdog: {report}", file=sys.stderr, flush=True)

    def observe(self, seqs, done):
        """Every step, for policies that never wait: the live neighbours whose
        seq has not moved for `seconds` (each reported once until it moves)."""
        if self.seconds is None:
            return []
        now = time.monotonic()
        if self._heard is None or len(self._heard[0]) != len(seqs):
            self._heard = (seqs.copy(), np.full(len(seqs), now), np.zeros(len(seqs), bool))
        last, moved, reported = self._heard
        changed = seqs != last
        last[changed], moved[changed], reported[changed] = seqs[changed], now, False
        silent = ~changed & ~done & ~reported & (now - moved >= self.seconds)
        reported |= silent
        return list(np.flatnonzero(silent))


def neighbour_report(headers, last_seq, in_neighbours, now):
    """(one-line description of each neighbour, indices of those with nothing new)."""
    parts, stalled = [], []
    for j, rank in enumerate(in_neighbours):
        seq = int(headers["seq"][j].sum())
        if headers["done"][j].any():
            state = "done"
        elif seq > last_seq[j].sum():
            state = "fresh"
        else:
            state = "nothing new"
            stalled.append(j)
        age = f"{now - headers['time'][j].max():.1f} s ago" if seq else "never"
        parts.append(f"rank {rank} (seq {seq}, last deposit {age}, {state})")
    return f"its neighbours: {', '.join(parts)}", stalled
