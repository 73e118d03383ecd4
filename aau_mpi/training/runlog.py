"""What a run leaves behind and what rank 0 shows while it runs.

A run folder holds:

    config.yaml            the resolved configuration
    rank-00003.jsonl       one JSON line per iteration of rank 3
    eval.jsonl             one JSON line per evaluation (rank 0)
    summary.json           the end-of-run summary (rank 0)
    trace-rank-00003.json  Chrome trace of rank 3's phases (output.trace: true)
    checkpoints/           HDF5 checkpoints (see aau_mpi.decentralized.checkpoint)
    model.h5               the final averaged model

`aau_mpi.plot` reads these folders back.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

RANK_LOG = "rank-{:05d}.jsonl"
TRACE = "trace-rank-{:05d}.json"


class RankLog:
    """A rank's iteration records (JSON lines) and, optionally, its Chrome trace.

    The trace is the JSON array format, whose closing bracket is optional, so
    a run that is killed still leaves a file Perfetto and chrome://tracing
    open. Timestamps are training seconds, in microseconds. The main thread's
    phases are on tid 0; the deposit, which overlaps them on the
    communication thread, on tid 1.
    """

    def __init__(self, folder, rank, trace=False):
        self.rank = rank
        self.lines = open(Path(folder) / RANK_LOG.format(rank), "a", buffering=1 << 16)
        self.trace = None
        if trace:
            self.trace = open(Path(folder) / TRACE.format(rank), "a", buffering=1 << 16)
            if self.trace.tell() == 0:
                self.trace.write("[\n")
        self.iterations = self.neighbours = self.overruns = 0
        self.wait = self.sleep = 0.0
        self._previous_end = None

    def iteration(self, record, **extra):
        line = {"iteration": record.iteration, "time": round(record.time, 6),
                "compute": record.compute_seconds, "wait": record.wait_seconds,
                "deposit": record.deposit_seconds, "deposit_wait": record.deposit_wait_seconds,
                "mix": record.mix_seconds, "step": record.step_seconds,
                "copy": record.copy_seconds, "control": record.control_seconds,
                "delay": record.delay, "overran": record.overran, "averaged": record.averaged,
                "staleness": record.staleness, "step_scale": record.step_scale, **extra}
        self.lines.write(json.dumps(line) + "\n")
        self.iterations += 1
        self.neighbours += len(record.averaged)
        self.wait += record.wait_seconds
        self.sleep += record.delay
        self.overruns += record.overran
        if self.trace:
            start = record.started - record.compute_seconds
            for name, seconds in (("compute", record.compute_seconds),
                                  ("wait", record.wait_seconds),
                                  ("mix", record.mix_seconds), ("step", record.step_seconds),
                                  ("deposit_wait", record.deposit_wait_seconds)):
                self.span(name, start, seconds, k=record.iteration)
                start += seconds
            if self._previous_end is not None:
                self.span("deposit", self._previous_end, record.deposit_seconds, tid=1,
                          k=record.iteration)
            self._previous_end = record.time

    def span(self, name, start, seconds, tid=0, **args):
        if self.trace:
            event = {"name": name, "ph": "X", "pid": self.rank, "tid": tid,
                     "ts": round(start * 1e6, 1), "dur": round(seconds * 1e6, 1), "args": args}
            self.trace.write(json.dumps(event) + ",\n")

    def totals(self, seconds):
        """Per-rank summary figures over this job's `seconds` of training."""
        return {"neighbours": self.neighbours / max(self.iterations, 1),
                "wait_share": self.wait / max(seconds, 1e-9),
                "sleep_share": self.sleep / max(seconds, 1e-9),
                "overrun_share": self.overruns / max(self.iterations, 1)}

    def flush(self):
        self.lines.flush()
        if self.trace:
            self.trace.flush()

    def close(self):
        self.lines.close()
        if self.trace:
            self.trace.close()


def append_json_line(path, record):
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


def write_json(path, record):
    """Write JSON atomically and durably: a reader, or a crash right after, never
    leaves half a file (fsync before the rename, and of the folder after it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as out:
        json.dump(record, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def duration(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Rank 0's progress line: samples used of the budget, loss, accuracy, rate, ETA.

    On a terminal it redraws one line; in a log file (SLURM output) it prints
    a line every `every` seconds instead of filling the file with redraws.
    """

    def __init__(self, schedule, enabled=True, stream=sys.stderr, every=10.0):
        self.schedule, self.stream, self.every = schedule, stream, every
        self.enabled = enabled
        self.tty = stream.isatty()
        self.shown_at = time.monotonic()  # the first line comes after one interval
        self.started = None

    def update(self, samples, seconds, loss, accuracy, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if self.started is None:
            self.started = (now, samples, seconds)
        if not force and now - self.shown_at < (0.25 if self.tty else self.every):
            return
        self.shown_at = now
        t0, s0, _ = self.started
        rate = (samples - s0) / max(now - t0, 1e-9)
        done = self.schedule.progress(samples, seconds)
        eta = (now - t0) * (1 - done) / done if done > 0 else None
        budget = f"/{self.schedule.sample_budget}" if self.schedule.sample_budget else ""
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        acc = "-" if accuracy is None else f"{accuracy:.3f}"
        line = (f"[{bar}] {done:4.0%} samples {samples}{budget}  loss {loss:.4f}  acc {acc}  "
                f"{rate:,.0f} samples/s  {duration(seconds)} elapsed  ETA {duration(eta)}")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def summary_table(summary):
    """The end-of-run table: the averaged model's result and one row per rank."""
    head = (f"{summary['policy']} on {summary['topology']}, {summary['world_size']} ranks: "
            f"test accuracy {summary['accuracy']:.4f} (loss {summary['loss']:.4f}) after "
            f"{summary['seconds']:.1f} s and {summary['samples']} samples")
    if summary.get("target_accuracy") is not None:
        reached = summary["time_to_target"]
        head += (f"; accuracy {summary['target_accuracy']:g} reached at "
                 f"{reached:.1f} s" if reached is not None else
                 f"; accuracy {summary['target_accuracy']:g} not reached")
    emulation = summary.get("emulation")
    rows = [f"stragglers: {summary['stragglers']}" + (
                f"; {emulation}, {max(summary['overrun_share']):.1%} of steps overran at most, "
                f"CPU {sum(summary['cpu_share']):.2f} cores" if emulation else ""),
            f"{'rank':>5} {'iterations':>11} {'neighbours':>11} {'wait share':>11} "
            f"{'sleep share':>12}"]
    for rank, (its, nbrs, wait, sleep) in enumerate(zip(
            summary["iterations"], summary["neighbours"], summary["wait_share"],
            summary["sleep_share"])):
        rows.append(f"{rank:>5} {its:>11} {nbrs:>11.2f} {wait:>11.2f} {sleep:>12.2f}")
    return "\n".join([head, *rows])
