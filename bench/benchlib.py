"""What the benchmarks in bench/ share: launching jobs, training runs in one process, reports.

Starting a rank (Python, torch, MPI) costs about 5 s on the development
machine, more than one small training run, so a benchmark trains many runs
inside one MPI job: `train_run` builds one config and calls the trainer,
which is collective, frees its windows at the end and writes a normal run
folder that `read_run` then reads back.
"""

import contextlib
import datetime
import io
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from aau_mpi.training import evaluation

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
TORCHRUN = BIN / "torchrun"

# scripts/mpi.env, what the Makefile exports: Open MPI as root, more ranks than
# cores, the one-sided components. A user's own settings win.
MPI_ENV = dict(line.split("=", 1) for line in (REPO / "scripts" / "mpi.env").read_text().splitlines()
               if line and not line.startswith("#"))


def launch(command, timeout=None, env=None):
    """Run a job (its output goes to ours); a failure ends the benchmark.

    `env` (default ours) gets the MPI settings under it and the repository on
    PYTHONPATH after whatever it puts there."""
    env = env or os.environ
    env = {**MPI_ENV, **env, "PYTHONPATH": os.pathsep.join(
        filter(None, [env.get("PYTHONPATH"), str(REPO)]))}
    print("+ " + " ".join(map(str, command)), flush=True)
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=env, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"error: {command[0]} exited with status {result.returncode}")


def launch_until_done(command, runs_dir, timeout=None, ended=None):
    """Launch a benchmark's MPI job of many runs. A run that fails (diverges, or
    stalls past the watchdog) ends its job with the trainer's one-line error on
    every rank: launch again, the job skipping the runs already finished, as
    long as each job gets further (more run folders). `ended(runs_dir)`, if
    given, marks the run that ended the job, before the relaunch."""
    def folders():
        return sum(1 for _ in Path(runs_dir).glob("*/config.yaml"))

    while True:
        before = folders()
        try:
            launch(command, timeout)
            return
        except SystemExit:
            if folders() == before:
                raise
            if ended is not None:
                ended(runs_dir)
            print("the job ended in a run (above): launching again; that run counts as "
                  "failed", flush=True)


def median_seconds(action, repeats=5):
    """The doctor's timer, shared. Imported when first used: importing the doctor
    starts MPI, which the torchrun (gloo) DDP workers that import this must not."""
    from aau_mpi.doctor import median_seconds as timer
    return timer(action, repeats)


def machine():
    """One line about where the numbers were taken."""
    import torch
    return (f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def mpi_library():
    """The MPI library's name and version, without initialising MPI in this process."""
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    return MPI.Get_library_version().splitlines()[0].strip().rstrip("\0")


def source():
    """The commit this checkout's code is at, with "+edits" when tracked files differ
    from it (a benchmark that relaunches imports the tree as it is then); None
    outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        edited = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return None
    return commit + ("+edits" if edited else "") if commit else None


def today():
    return datetime.date.today().isoformat()


def write_json(path, record):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def median(values):
    """Median of the values that exist (None and nan are left out); None when none do."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.median(values)) if values else None


def cell(value, spec=".3f"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "not reached"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown_table(headers, rows):
    lines = [headers, ["---"] * len(headers)] + [[str(c) for c in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def text_table(headers, rows):
    lines = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)


def write_report(out, stem, record, intro, headers, rows):
    """A result as the docs cite it: out/stem.json (the record), out/stem.md (the
    intro paragraph, then the table); the table printed. Returns the JSON's path."""
    out = Path(out)
    path = write_json(out / f"{stem}.json", record)
    (out / f"{stem}.md").write_text(intro + "\n\n" + markdown_table(headers, rows))
    print()
    print(text_table(headers, rows))
    return path


# ------------------------------------------------------------ runs inside one job

def train_run(world, config_path, overrides):
    """Collective: train one run of `config_path` + `overrides`; returns its Config.

    The trainer's own summary table is silenced (the benchmark prints one line
    per run); the run folder is written as usual.
    """
    from aau_mpi.training.config_loading import load_config
    from aau_mpi.train import Trainer

    config = load_config(config_path, list(overrides) + ["output.progress=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(world, config, config_path).run()
    return config


def run_folder(config):
    return Path(config.output.dir) / config.name


def _from_evaluations(run, config):
    """What a run's evaluations give, finished or not."""
    target = config.eval.target_accuracy
    reached = next((e for e in run.evals if target is not None and e["accuracy"] >= target), None)
    return {
        "folder": str(run.folder), "target": target,
        "time_to_target": reached["time"] if reached else None,
        "epochs_to_target": reached["epochs"] if reached else None,
        "consensus_distance": run.evals[-1]["consensus_distance"] if run.evals else None,
        # (training seconds, global samples, accuracy, loss) of the averaged model
        "curve": [[e["time"], e["samples"], e["accuracy"], e["loss"]] for e in run.evals],
    }


def read_run(config):
    """The numbers of one finished run, from its folder (call on one rank)."""
    from aau_mpi.plot import load_run

    run = load_run(run_folder(config))
    summary = run.summary
    # A step's own cost: compute without the straggler's sleep.
    steps = [r["compute"] - r.get("delay", 0.0) for records in run.ranks.values()
             for r in records]
    return {
        **_from_evaluations(run, config),
        "accuracy": summary["accuracy"], "loss": summary["loss"],
        "seconds": summary["seconds"], "samples": summary["samples"],
        "samples_per_second": summary["samples"] / summary["seconds"],
        "time_to_target": summary["time_to_target"],
        "iterations": summary["iterations"], "neighbours": summary["neighbours"],
        "wait_share": summary["wait_share"], "sleep_share": summary["sleep_share"],
        "step_seconds": float(np.median(steps)) if steps else None,
    }


def run_state(folder):
    """"finished" (summary.json written), "failed" (the folder without it: the run
    that ended an earlier job), or "new"."""
    folder = Path(folder)
    if (folder / "summary.json").is_file():
        return "finished"
    return "failed" if folder.is_dir() else "new"


def read_failed_run(config):
    """What a failed run left, in read_run's fields: its evaluations (the last one
    stands for the end); the rest None."""
    from aau_mpi.plot import load_run

    run = load_run(run_folder(config))
    last = run.evals[-1] if run.evals else {}
    seconds = last.get("time", 0.0)
    return {**_from_evaluations(run, config), "failed": True,
            "accuracy": last.get("accuracy"), "loss": last.get("loss"),
            "seconds": seconds, "samples": last.get("samples", 0),
            "samples_per_second": last["samples"] / seconds if seconds else None,
            "iterations": None, "neighbours": None, "wait_share": None, "sleep_share": None,
            "step_seconds": None, "shard_accuracy": None, "class_accuracy": None}


_DATA = {}


def rank_accuracies(config, model, size):
    """`model` judged from each rank's side, as the trainer partitioned the data:
    "shard_accuracy", its accuracy on each rank's training shard, and
    "class_accuracy", its test accuracy weighted by each rank's class mix (the
    test set as that rank's own data would look; a two-class shard counts
    only its two classes)."""
    import torch
    from aau_mpi.training.datasets import load_dataset
    from aau_mpi.training.partitions import partition

    key = json.dumps([config.data.name, config.data.params], sort_keys=True, default=str)
    if key not in _DATA:
        _DATA[key] = load_dataset(config.data.name, config.data.params)
    data = _DATA[key]
    parts = partition(data.y_train.numpy(), size, config.data.partition.name,
                      seed=config.seed, **config.data.partition.params)
    with torch.no_grad():
        model.eval()
        predicted = torch.cat([model(x).argmax(1) for x in
                               data.x_test.split(config.data.eval_batch_size)])
    classes = data.num_classes
    right = torch.bincount(data.y_test[predicted == data.y_test], minlength=classes)
    per_class = (right / torch.bincount(data.y_test, minlength=classes).clamp(min=1)).numpy()
    shard, mix = [], []
    for part in parts:
        index = torch.as_tensor(part)
        _, correct = evaluation.loss_and_correct(model, data.x_train[index], data.y_train[index],
                                                 config.data.eval_batch_size)
        shard.append(correct / len(part))
        counts = np.bincount(data.y_train.numpy()[part], minlength=classes)
        mix.append(float(counts @ per_class / counts.sum()))
    return {"shard_accuracy": shard, "class_accuracy": mix}


def require_two_ranks(comm, script):
    """The two-rank benchmarks (a depositor and a target): exit 2 with the fix otherwise."""
    if comm.size != 2:
        if comm.rank == 0:
            print(f"error: run with exactly 2 ranks: mpiexec -n 2 python bench/{script}")
        raise SystemExit(2)
