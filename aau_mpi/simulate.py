"""The virtual-time simulator: N workers in one process, no MPI (docs/simulator.md).

    python -m aau_mpi.simulate --config jobs/compare/aau.yaml --ranks 256 \\
        [--step-seconds 0.002] [--bandwidth-gbs 10] [--latency-us 20] \\
        [--payload-bytes 100e6] [--calibration calibration.json] [section.key=value ...]

This command builds the job of a config for the engine
(aau_mpi.training.simulation, which runs the workers on the virtual clock)
and writes its run folder. Each virtual worker holds its own copy of the
config's model (the same x_0 on all, as the broadcast gives), computes real
gradients on its real shard (the trainer's partition and loader seeds) with
its own torch SGD, and runs the config's REAL policy over the config's graph
and straggler model.

The timing parameters: the step time is the job's emulated accelerator's
(`emulate:`, with its jitter and the same draws as the trainer), else
measured at start-up (the median of TIMED_STEPS real steps of this model and
batch size here) or given as --step-seconds; the deposit bandwidth is the
mailbox benchmark's (BANDWIDTH_RESULTS) or --bandwidth-gbs; the latency
--latency-us; the bytes a deposit and the allreduce carry the model's, or
--payload-bytes (a small model trained for its statistics, carrying a large
one's communication); each iteration's overhead and the allreduce's cost
from --calibration (aau_mpi.calibrate's file: the group of the job's policy
at the nearest number of ranks; its allreduce cost only for the model's own
bytes: with --payload-bytes the bandwidth model prices the collective).

The run folder is the trainer's (aau_mpi.training.runlog): config.yaml (plus a
`simulation:` section), rank-NNNNN.jsonl, eval.jsonl, summary.json (plus
"simulated": true and "timing"), model.h5; `python -m aau_mpi.plot` reads
it. With more than ALL_LOGGED workers only SAMPLED evenly spaced workers are
logged and evaluated one by one (summary "logged_ranks", eval record
"evaluated_ranks").

A tool: it imports the library's pure layers, never mpi4py, and nothing
imports it.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from aau_mpi.algorithms.emulation import EmulatedAccelerator
from aau_mpi.algorithms.policies import build_policy
from aau_mpi.algorithms.stragglers import build_straggler
from aau_mpi.algorithms.topology import load_topology
from aau_mpi.base.errors import UserError, exit_status, section
from aau_mpi.training.calibration import load_calibration
from aau_mpi.training.config_loading import load_config
from aau_mpi.training.datasets import load_dataset
from aau_mpi.training.evaluation import loss_and_correct
from aau_mpi.training.models import build_model, save_model
from aau_mpi.training.partitions import partition, shard_loader
from aau_mpi.training.runlog import Progress, RankLog, append_json_line, summary_table, write_json
from aau_mpi.training.simulation import StackedModel, Timing, VirtualCluster

BANDWIDTH_RESULTS = (Path(__file__).resolve().parent.parent / "bench" / "results"
                     / "mailbox_bandwidth.json")
DEFAULT_BANDWIDTH_GBS = 10.0
DEFAULT_LATENCY_US = 20.0
TIMED_STEPS = 20           # the start-up measurement: median of this many steps
WARM_UP_STEPS = 3          # ... after this many untimed ones
ALL_LOGGED = 64            # up to this many workers, every one is logged and evaluated
SAMPLED = 16               # beyond, this many evenly spaced ones
EVAL_CHUNK = 16            # workers per vmapped evaluation call


def measured_bandwidth(payload_bytes):
    """(GB/s, where from): the mailbox benchmark's deposit rate at the size nearest
    the payload when bench/results holds it, else the default."""
    if not BANDWIDTH_RESULTS.is_file():
        return DEFAULT_BANDWIDTH_GBS, "default (no bench/results/mailbox_bandwidth.json)"
    rows = json.loads(BANDWIDTH_RESULTS.read_text())["rows"]
    row = min(rows, key=lambda r: abs(math.log(r["megabytes"] * 1e6 / payload_bytes)))
    return row["deposit_gb_s"], f"bench/results/mailbox_bandwidth.json ({row['megabytes']} MB)"


def measure_step_seconds(model, x_train, y_train, batch_size, optim):
    """Median seconds of a real step (batch, forward, backward, SGD step) on this machine,
    to 3 significant digits (pass it as --step-seconds to repeat a run exactly)."""
    sgd = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                          weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    index = torch.arange(batch_size) % len(y_train)
    saved = [p.detach().clone() for p in model.parameters()]
    times = []
    for _ in range(WARM_UP_STEPS + TIMED_STEPS):
        started = time.perf_counter()
        x, y = x_train[index], y_train[index]
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        times.append(time.perf_counter() - started)
    with torch.no_grad():  # the timing steps must not move x_0
        for p, value in zip(model.parameters(), saved):
            p.copy_(value)
            p.grad = None
    return float(f"{statistics.median(times[WARM_UP_STEPS:]):.3g}")


def evaluated_ranks(n):
    """The workers logged and evaluated one by one: all, or SAMPLED evenly spaced."""
    if n <= ALL_LOGGED:
        return list(range(n))
    return sorted({int(r) for r in np.linspace(0, n - 1, SAMPLED).round()})


class Simulator:
    """A simulated job of `ranks` workers for `config`; run() trains it and returns the summary.

    After run(), `parameters` holds every worker's final x (row i: worker i) and
    `workers[i].k` its iterations. `folder`: the run folder (default: under
    config.output.dir, named as the trainer names it).
    """

    def __init__(self, config, ranks, *, step_seconds=None, bandwidth_gbs=None,
                 latency_us=None, payload_bytes=None, calibration=None, folder=None,
                 config_path=None):
        self.config, self.n = config, ranks
        n = ranks
        topology = config.topology
        with section("topology"):
            self.graph = load_topology(Path(topology.file) if topology.file else
                                       {"generator": topology.name, "params": topology.params},
                                       n)
        with section("policy"):
            policies = [build_policy(config.policy.name, self.graph, i, config.policy.params)
                        for i in range(n)]
        with section("stragglers"):
            stragglers = [build_straggler(config.stragglers.name, i, n, config.stragglers.params)
                          for i in range(n)]

        self.folder = self._run_folder(config_path) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Data, partition, loaders and model exactly as aau_mpi.train builds them.
        with section("data"):
            data = load_dataset(config.data.name, config.dataset_params(self.folder))
        self.train_size = len(data.y_train)
        with section("data.partition"):
            parts = partition(data.y_train.numpy(), n, config.data.partition.name,
                              seed=config.seed, **config.data.partition.params)
        self.batch_size = config.data.batch_size
        loaders = [shard_loader(data.x_train, data.y_train, parts[i], self.batch_size,
                                seed=config.seed * 1000 + i) for i in range(n)]
        test = slice(0, config.eval.max_samples)
        self.x_test, self.y_test = data.x_test[test], data.y_test[test]
        self.model_meta = {"model": config.model.name, "model_params": config.model.params,
                           "input_shape": list(data.input_shape),
                           "num_classes": int(data.num_classes), "dataset": config.data.name}
        torch.manual_seed(config.seed)
        with section("model"):
            self.model = build_model(config.model.name, data.input_shape, data.num_classes,
                                     config.model.params)
        if any(buffer.is_floating_point() for buffer in self.model.buffers()):
            raise UserError(f"model {config.model.name} has floating buffers (BatchNorm "
                            f"statistics), which the simulator does not batch: use a model "
                            f"without them (e.g. resnet18 with norm: group)")
        self.stacked = StackedModel(self.model)

        step_from, emulators = "--step-seconds", None
        emulate = config.emulate
        if emulate.step_seconds is not None:
            if step_seconds is not None:
                raise UserError(f"--step-seconds {step_seconds:g} and the job's "
                                f"emulate.step_seconds {emulate.step_seconds:g} both set the "
                                f"step: drop one (emulate.step_seconds=null)")
            step_seconds = emulate.step_seconds
            step_from = f"emulate (jitter {emulate.jitter:g})"
            emulators = [EmulatedAccelerator(emulate.step_seconds, emulate.jitter,
                                             seed=config.seed, rank=i) for i in range(n)]
        elif step_seconds is None:
            step_seconds = measure_step_seconds(self.model, data.x_train, data.y_train,
                                                self.batch_size, config.optim)
            step_from = (f"measured: median of {TIMED_STEPS} steps, "
                         f"{torch.get_num_threads()} thread(s)")
        x0 = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
        own_bytes = payload_bytes is None
        if own_bytes:
            payload_bytes = x0.numel() * x0.element_size()
        if bandwidth_gbs is None:
            bandwidth_gbs, bandwidth_from = measured_bandwidth(payload_bytes)
        else:
            bandwidth_from = "--bandwidth-gbs"
        calibrated = {}
        if calibration is not None:
            group, where = load_calibration(calibration, config.policy.name, n,
                                            {"name": config.stragglers.name,
                                             **config.stragglers.params})
            # The collective was measured carrying the model's own bytes; another
            # payload's is the bandwidth model's.
            collective = group.get("collective_seconds") if own_bytes else None
            calibrated = {"overhead_seconds": group["overhead_seconds"]["mean"],
                          "collective_seconds": collective["mean"] if collective else None,
                          "calibration_from": where}
        self.timing = Timing(step_seconds, step_from, bandwidth_gbs, bandwidth_from,
                             DEFAULT_LATENCY_US if latency_us is None else latency_us,
                             int(payload_bytes), **calibrated)
        self.schedule = config.schedule(self.train_size)
        self.learning_rate = config.optim.learning_rate(n * self.batch_size, self.batch_size)

        (self.folder / "config.yaml").write_text(
            config.to_yaml() + yaml.safe_dump({"simulation": {"ranks": n,
                                                              **self.timing.describe(n)}},
                                              sort_keys=False))
        self.logged = evaluated_ranks(n)
        logged = set(self.logged)
        self.logs = [RankLog(self.folder, i) if i in logged else None for i in range(n)]
        self.progress = Progress(self.schedule, enabled=config.output.progress)
        self.time_to_target = None
        self.cluster = VirtualCluster(self.graph, policies, stragglers, loaders, self.stacked,
                                      x0, config.optim, self.batch_size, self.timing,
                                      self.schedule, self.learning_rate, self.logs,
                                      self.progress, self._evaluate, emulators)
        # The engine's, updated in place as it runs.
        self.parameters, self.workers = self.cluster.parameters, self.cluster.workers

    def _run_folder(self, config_path):
        config = self.config
        name = config.name or "-".join([Path(config_path).stem if config_path else "run",
                                        config.policy.name, f"sim{self.n}",
                                        time.strftime("%Y%m%d-%H%M%S")])
        folder = Path(config.output.dir) / name
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"run folder {folder} is not empty: choose another name= or "
                            f"output.dir=")
        return folder

    def run(self):
        """Train until the budget is used; write the run folder; return the summary."""
        self.cluster.run()
        self.progress.close()
        return self._finish()

    # ---- evaluations and the summary ----------------------------------------------

    def _average(self):
        """x_bar, as the trainer's Allreduce of float64 copies gives it."""
        return (self.parameters.double().sum(0) / self.n).float()

    def _evaluate(self, number, now):
        """Evaluation `number` at virtual time `now` into eval.jsonl; returns the accuracy."""
        average = self._average()
        distance = float(((self.parameters - average) ** 2).sum(1).double().sum()) / self.n
        batch = self.config.data.eval_batch_size
        torch.nn.utils.vector_to_parameters(average, self.model.parameters())
        loss, correct = loss_and_correct(self.model, self.x_test, self.y_test, batch)
        m = len(self.y_test)
        samples = self.cluster.samples
        record = {"evaluation": number, "time": round(now, 6), "samples": samples,
                  "epochs": samples / self.train_size, "accuracy": correct / m,
                  "loss": loss / m, "consensus_distance": distance}
        if self.config.eval.rank_models:
            rank_loss, rank_correct = [], []
            for start in range(0, len(self.logged), EVAL_CHUNK):
                rows = torch.tensor(self.logged[start:start + EVAL_CHUNK])
                losses, corrects = self.stacked.loss_and_correct(self.parameters[rows],
                                                                 self.x_test, self.y_test, batch)
                rank_loss += losses.tolist()
                rank_correct += corrects.tolist()
            record.update(rank_accuracy=[c / m for c in rank_correct],
                          rank_loss=[l / m for l in rank_loss])
            if len(self.logged) < self.n:
                record["evaluated_ranks"] = self.logged
        append_json_line(self.folder / "eval.jsonl", record)
        target = self.config.eval.target_accuracy
        if target is not None and self.time_to_target is None and record["accuracy"] >= target:
            self.time_to_target = record["time"]
        return record["accuracy"]

    def _finish(self):
        """The averaged model, the summary and model.h5, as the trainer writes them."""
        for log in self.logs:
            if log is not None:
                log.close()
        torch.nn.utils.vector_to_parameters(self._average(), self.model.parameters())
        loss, correct = loss_and_correct(self.model, self.x_test, self.y_test,
                                         self.config.data.eval_batch_size)
        m = len(self.y_test)
        workers = self.workers
        summary = {"policy": self.config.policy.name, "topology": self.graph.name,
                   "world_size": self.n, "accuracy": correct / m, "loss": loss / m,
                   "seconds": self.cluster.seconds(), "samples": sum(w.own_samples for w in workers),
                   "iterations": [w.k for w in workers],
                   "neighbours": [w.neighbours / max(w.k, 1) for w in workers],
                   "wait_share": [w.wait / max(w.end, 1e-9) for w in workers],
                   "sleep_share": [w.sleep / max(w.end, 1e-9) for w in workers],
                   "stragglers": workers[0].straggler.describe(),
                   "target_accuracy": self.config.eval.target_accuracy,
                   "time_to_target": self.time_to_target, "exit": "finished",
                   "simulated": True, "timing": self.timing.describe(self.n)}
        if len(self.logged) < self.n:
            summary["logged_ranks"] = self.logged
        save_model(self.folder / "model.h5", self.model, self.model_meta)
        write_json(self.folder / "summary.json", summary)
        return summary


# ---- command line ----------------------------------------------------------------

def _option(name, text, kind, minimum, strict, example):
    """A numeric command-line option, or None when not given; a one-line UserError if bad."""
    if text is None:
        return None
    wanted = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {minimum}"
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum or (strict and
                                                                        value == minimum):
        raise UserError(f"{name} must be {wanted}, got {text!r}: e.g. {name} {example}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m aau_mpi.simulate",
        description="Simulate a decentralized training job in virtual time (one process, "
                    "no MPI).")
    parser.add_argument("--config", required=True, help="job file, e.g. jobs/demo.yaml")
    parser.add_argument("--ranks", required=True, help="number of virtual workers")
    parser.add_argument("--step-seconds",
                        help="compute time of one step (default: measured at start-up)")
    parser.add_argument("--bandwidth-gbs", help="deposit bandwidth per link, GB/s (default: "
                        "bench/results/mailbox_bandwidth.json, else 10)")
    parser.add_argument("--latency-us", help=f"latency per deposit, microseconds (default: "
                        f"{DEFAULT_LATENCY_US:g})")
    parser.add_argument("--payload-bytes", help="bytes of a deposit and of the allreduce "
                        "(default: the model's parameters), e.g. 100e6 for ResNet-50's")
    parser.add_argument("--calibration", help="a calibration file (python -m "
                        "aau_mpi.calibrate): per-iteration overhead, allreduce cost")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. policy.name=dpsgd optim.lr=0.05")
    return parser.parse_intermixed_args(argv)  # overrides before and after the options


def main(argv=None):
    args = parse_args(argv)
    ranks = _option("--ranks", args.ranks, int, 1, False, 16)
    options = dict(step_seconds=_option("--step-seconds", args.step_seconds, float, 0, True,
                                        0.002),
                   bandwidth_gbs=_option("--bandwidth-gbs", args.bandwidth_gbs, float, 0, True,
                                         10),
                   latency_us=_option("--latency-us", args.latency_us, float, 0, False, 20),
                   payload_bytes=_option("--payload-bytes", args.payload_bytes, float, 0, True,
                                         "100e6"),
                   calibration=args.calibration)
    config = load_config(args.config, args.overrides)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    simulator = Simulator(config, ranks, config_path=args.config, **options)
    timing = simulator.timing
    calibrated = (f", overhead {timing.overhead_seconds * 1e3:.2f} ms an iteration from "
                  f"{timing.calibration_from}" if timing.calibration_from else "")
    print(f"{ranks} virtual workers, {simulator.graph.name}, policy {config.policy.name}; "
          f"step {timing.step_seconds:g} s ({timing.step_seconds_from}), deposit "
          f"{timing.link_seconds * 1e6:.1f} us per link ({timing.bandwidth_gbs:g} GB/s, "
          f"{timing.latency_us:g} us){calibrated}; run folder {simulator.folder}", flush=True)
    started = time.perf_counter()
    summary = simulator.run()
    lines = summary_table(summary).splitlines()
    if ranks > ALL_LOGGED:
        lines = lines[:2] + [f"({ranks} workers: per-worker figures in summary.json)"]
    print("\n".join(lines))
    print(f"simulated {summary['seconds']:.3f} virtual s in {time.perf_counter() - started:.1f} "
          f"wall s; run folder: {simulator.folder}", flush=True)
    return 0


def cli():
    sys.exit(exit_status(main))


if __name__ == "__main__":
    cli()
