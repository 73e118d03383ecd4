"""The trainer: `mpirun -n N python -m aau_mpi.train --config jobs/demo.yaml [key=value ...]`.

One user of the library API: it builds the job's components from the config
(topology, policy, stragglers, data shard, model, torch optimizer) and runs
a plain PyTorch loop around `aau_mpi.DecentralizedOptimizer`, which does the
decentralized part. Around it, by name:

- `aau_mpi.decentralized.events`: evaluations and the stop, announced job-wide and served
  by every rank in the same order (also while it waits for neighbours);
- `aau_mpi.decentralized.watchdog`: a neighbour or a rank that stopped taking part;
- `aau_mpi.decentralized.checkpointer`: each rank's state, per generation, committed by
  the last writer, no rank ever waiting for another;
- `aau_mpi.training.runlog`: the run folder's logs, the progress line, the summary.

SIGTERM / SIGUSR1 (Slurm's warning before preemption): every rank stops,
checkpoints and exits with EXIT_PREEMPTED; `--resume <run folder>` goes on,
on the same number of ranks or another (every rank then starts from the
average of the saved models, on shards partitioned for the new number).
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from mpi4py import MPI

from aau_mpi.decentralized import checkpoint
from aau_mpi.decentralized.checkpointer import Checkpointer
from aau_mpi.training.config_loading import config_from_dict, load_config
from aau_mpi.training.datasets import DATASETS, load_dataset
from aau_mpi.training.partitions import partition, shard_loader
from aau_mpi.base.errors import UserError, section
from aau_mpi.training.evaluation import evaluate_job, loss_and_correct
from aau_mpi.training.models import build_model, save_model
from aau_mpi.decentralized.optimizer import DecentralizedOptimizer
from aau_mpi.algorithms.policies import build_policy
from aau_mpi.training.runlog import Progress, RankLog, append_json_line, summary_table, write_json
from aau_mpi.algorithms.stragglers import build_straggler
from aau_mpi.algorithms.topology import load_topology
from aau_mpi.decentralized.watchdog import Watchdog
from aau_mpi.comm.world import install_abort_hook
from aau_mpi.decentralized.device import init

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: "try again", what a requeue script looks for
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MEMORY_EVERY = 16            # iterations between resident-memory samples (7 us each)
MIN_ITERATIONS = 50          # per rank: fewer, and a job is warned that it cannot learn


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resident_megabytes():
    """This process's resident memory (Linux; None elsewhere), logged to show it stays flat."""
    try:
        with open("/proc/self/statm") as statm:
            return round(int(statm.read().split()[1]) * PAGE_BYTES / 2**20, 1)
    except OSError:
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m aau_mpi.train",
        description="Decentralized training with DSGD-AAU and baselines (run under mpirun/srun).")
    parser.add_argument("--config", help="job file, e.g. jobs/demo.yaml")
    parser.add_argument("--resume", metavar="PATH",
                        help="continue from a run folder or checkpoint (its config is used "
                             "unless --config is given; overrides apply on top)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. policy.name=dpsgd optim.lr=0.05")
    args = parser.parse_args(argv)
    if not args.config and not args.resume:
        parser.error("give --config jobs/<name>.yaml (or --resume <run folder>)")
    return args


class Trainer:
    """One rank's part of a training run. Collective to build and to run."""

    def __init__(self, world, config, config_path=None, resume=None):
        self.world, self.config, self.comm = world, config, world.comm
        self.rank, self.size = world.rank, world.size
        self.device = world.device

        # Cheap components first: their bad input fails before data loads.
        topology = config.topology
        with section("topology"):
            self.graph = load_topology(Path(topology.file) if topology.file else
                                       {"generator": topology.name, "params": topology.params},
                                       self.size)
        with section("policy"):
            policy = build_policy(config.policy.name, self.graph, self.rank,
                                  config.policy.params)
        with section("stragglers"):
            self.straggler = build_straggler(config.stragglers.name, self.rank, self.size,
                                             config.stragglers.params)
        self.lr = config.optim.learning_rate(self.size * config.data.batch_size,
                                             config.data.batch_size)
        manifest = None
        if resume:
            manifest = checkpoint.read_manifest(checkpoint.find_checkpoint(resume))
            checkpoint.check_compatible(manifest, self._identity())

        self.folder = self._run_folder(config_path, manifest)
        with section("data"):
            data = self._load_data()
        self.train_size = len(data.y_train)
        with section("data.partition"):
            parts = partition(data.y_train.numpy(), self.size, config.data.partition.name,
                              seed=config.seed, **config.data.partition.params)
        self._guard_rails([len(part) for part in parts])
        # Only this rank's shard and the test set go to the device.
        self.batches = shard_loader(data.x_train, data.y_train, parts[self.rank],
                                    config.data.batch_size, seed=config.seed * 1000 + self.rank,
                                    device=self.device)
        test = slice(0, config.eval.max_samples)
        self.x_test = data.x_test[test].to(self.device)
        self.y_test = data.y_test[test].to(self.device)
        self.input_shape, self.num_classes = data.input_shape, data.num_classes

        torch.manual_seed(config.seed)
        with section("model"):
            self.model = build_model(config.model.name, self.input_shape, self.num_classes,
                                     config.model.params).to(self.device)
        optim = config.optim
        sgd = torch.optim.SGD(self.model.parameters(), lr=optim.lr, momentum=optim.momentum,
                              weight_decay=optim.weight_decay, nesterov=optim.nesterov)

        self.schedule = config.schedule(self.train_size)
        self.log = RankLog(self.folder, self.rank, trace=config.output.trace)
        self.checkpoints = Checkpointer(
            self.folder / "checkpoints", every_seconds=config.checkpoint.every_seconds,
            every_iterations=config.checkpoint.every_iterations, keep=config.checkpoint.keep,
            extra_state=self._extra_state, config_yaml=config.to_yaml(), meta=self._identity())
        self.last_accuracy, self.time_to_target = None, None
        self._lost_noted = 0
        self.loss, self.base_lr = math.nan, optim.lr
        self.opt = DecentralizedOptimizer(
            sgd, self.model, policy=policy, topology=self.graph, world=world,
            batch_size=config.data.batch_size, schedule=self.schedule,
            on_evaluation=self._evaluate, stragglers=self.straggler,
            watchdog=Watchdog(config.watchdog.seconds, config.watchdog.action),
            checkpoints=self.checkpoints if config.checkpoint.enabled else None,
            checksum=config.mailbox.checksum, overlap=config.mailbox.overlap,
            on_rank_loss=config.faults.on_rank_loss,
            on_iteration=self._log_iteration, emulate=self._emulation())
        if manifest is not None:
            self._restore(manifest)

    # ---- set-up helpers ---------------------------------------------------

    def _emulation(self):
        """The emulate section as the optimizer takes it (None: real compute only)."""
        emulate = self.config.emulate
        if emulate.step_seconds is None:
            return None
        return {"step_seconds": emulate.step_seconds, "jitter": emulate.jitter,
                "seed": self.config.seed}

    def _identity(self):
        """What a resumed run must share with the run it continues."""
        data = self.config.to_dict()["data"]
        return {"model": self.config.to_dict()["model"],
                "data": {key: value for key, value in data.items()
                         if key not in ("batch_size", "eval_batch_size")}}

    def _run_folder(self, config_path, manifest):
        """The run's folder: the resumed run's, or a new one under output.dir."""
        if manifest is not None:
            folder = manifest.path.parent.parent.parent
        else:
            folder = None
            if self.rank == 0:
                name = self.config.name or "-".join([
                    Path(config_path).stem if config_path else "run", self.config.policy.name,
                    time.strftime("%Y%m%d-%H%M%S")])
                folder = Path(self.config.output.dir) / name
                if folder.is_dir() and any(folder.iterdir()):
                    # Never append to, or overwrite, another run's files.
                    folder = UserError(f"run folder {folder} is not empty: continue that run "
                                       f"with --resume {folder}, or choose another name=")
                else:
                    folder.mkdir(parents=True, exist_ok=True)
            folder = self.comm.bcast(folder, root=0)
            if isinstance(folder, UserError):
                raise folder
        if self.rank == 0:
            (folder / "config.yaml").write_text(self.config.to_yaml())
        return folder

    def _guard_rails(self, shard_sizes):
        """Warn (rank 0, one line each) about a job too thin to learn: shards smaller
        than a batch, or a budget of fewer than MIN_ITERATIONS iterations per rank."""
        if self.rank != 0:
            return
        config, batch = self.config, self.config.data.batch_size
        small = min(range(self.size), key=lambda r: shard_sizes[r])
        if shard_sizes[small] < batch:
            warn(f"rank {small}'s shard holds {shard_sizes[small]} samples, fewer than its batch "
                 f"of {batch}: give the job more samples (or a data.partition that balances "
                 f"them), fewer ranks, or a smaller data.batch_size")
        budget = config.budget
        samples = budget.samples or (budget.epochs * sum(shard_sizes) if budget.epochs else None)
        if samples is not None and samples / (self.size * batch) < MIN_ITERATIONS:
            warn(f"the budget gives each rank about {samples / (self.size * batch):.0f} "
                 f"iterations (under {MIN_ITERATIONS}): a model barely moves in that; raise "
                 f"budget.epochs or budget.samples, use fewer ranks, or set optim.scale_lr "
                 f"so that each step does more")

    def _load_data(self):
        """The dataset. One that is generated (it takes a `cache` folder, as mnist1d
        does) is generated once, by rank 0, into the run folder from the job's
        seed; the other ranks wait, sleeping, and read the cached file."""
        name, params = self.config.data.name, self.config.dataset_params(self.folder)
        if "cache" not in DATASETS.params(name):
            return load_dataset(name, params)
        data = load_dataset(name, params) if self.rank == 0 else None
        done = self.comm.Ibarrier()
        while not done.Test():
            time.sleep(0.05)  # not a spinning barrier: rank 0 needs the cores
        return data if data is not None else load_dataset(name, params)

    def _extra_state(self):
        """What the trainer adds to each rank's checkpoint."""
        return {"loader": self.batches.state_dict(), "torch_rng": torch.get_rng_state()}

    def _restore(self, manifest):
        if self.checkpoints.opt is None:  # checkpoints off in this run: restore only
            self.checkpoints.attach(self.opt)
        extra, _ = self.checkpoints.restore(manifest.path)
        if extra is None:
            # Another number of ranks: the shards above are partitioned for this
            # one, so the old loaders' positions do not map; these start afresh,
            # seeded as in a new run.
            if self.rank == 0:
                print(f"{self.checkpoints.resized}; shards re-partitioned", flush=True)
            return
        self.batches.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["torch_rng"])

    def _checkpoint_hint(self):
        return self.checkpoints.hint() if self.config.checkpoint.enabled else "checkpoints are off"

    # ---- what the optimizer calls back ---------------------------------------

    def _evaluate(self, number):
        """Collective: every rank's model, the average, consensus distance."""
        at = self.opt.training_seconds()
        record = evaluate_job(self.opt, self.opt.job_comm, self.x_test, self.y_test,
                              self.config.data.eval_batch_size, self.config.eval.rank_models)
        if record is not None:
            samples = self.opt.samples
            record = {"evaluation": number, "time": round(at, 6), "samples": samples,
                      "epochs": samples / self.train_size, **record}
            append_json_line(self.folder / "eval.jsonl", record)
            self.last_accuracy = record["accuracy"]
            target = self.config.eval.target_accuracy
            if target is not None and self.time_to_target is None and record["accuracy"] >= target:
                self.time_to_target = at
        self.log.span("evaluate", at, 0.0, evaluation=number)

    def _log_iteration(self, record):
        memory = {"rss_mb": resident_megabytes()} if record.iteration % MEMORY_EVERY == 0 else {}
        self.log.iteration(record, loss=self.loss, samples=self.opt.samples,
                           lr=self.base_lr * record.step_scale, **memory)

    # ---- the run ------------------------------------------------------------

    def run(self):
        """Train until the budget is used or a preemption signal; returns the exit code."""
        config, opt, model = self.config, self.opt, self.model
        progress = Progress(self.schedule, enabled=config.output.progress and self.rank == 0)
        self._started = (time.perf_counter(), time.process_time())
        while not opt.should_stop():
            self.base_lr = self.lr(opt.progress())
            for group in opt.param_groups:
                group["lr"] = self.base_lr
            x, y = next(self.batches)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if config.optim.clip_grad_norm is not None:
                # A loss spike's gradient, times momentum, can kill the ReLUs of
                # every rank (docs/benchmarks.md, "aau's collapse on seed 2").
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
            self.loss = loss.item()
            if not math.isfinite(self.loss):
                raise UserError(f"training diverged: loss is {self.loss} at iteration "
                                f"{opt.iteration} on rank {self.rank}: lower optim.lr "
                                f"(now {config.optim.lr:g}) or add optim.warmup; "
                                f"{self._checkpoint_hint()}")
            opt.step()
            self._note_lost_ranks()
            progress.update(opt.samples, opt.training_seconds(), self.loss, self.last_accuracy)
        progress.update(opt.samples, opt.training_seconds(), self.loss, self.last_accuracy,
                        force=True)
        progress.close()
        return self._finish()

    def _note_lost_ranks(self):
        """After the survivors went on without a rank: one line in eval.jsonl, by the
        survivors' rank 0, saying which ranks, when and how many are left."""
        for loss in self.opt.lost_ranks[self._lost_noted:]:
            if self.opt.rank == 0:
                append_json_line(self.folder / "eval.jsonl", {"lost_ranks": loss["ranks"],
                                                              **loss})
        self._lost_noted = len(self.opt.lost_ranks)

    def _finish(self):
        """Collective: average, checkpoint, evaluate, save; returns the exit code."""
        opt = self.opt
        seconds = opt.training_seconds() - opt.events.seconds_before
        wall, cpu = (now - then for now, then in zip((time.perf_counter(), time.process_time()),
                                                     self._started))
        stats = {"iterations": opt.iteration, "cpu_share": cpu / max(wall, 1e-9),
                 "mailbox": opt.mailbox.stats if opt.mailbox else {},
                 "control_round_trips": opt.events.control.round_trips,
                 **self.log.totals(seconds)}
        preempted = opt.preempted
        opt.finish()  # the model now holds the average of all ranks (the survivors)
        self._note_lost_ranks()
        comm = opt.job_comm
        seconds = comm.allreduce(opt.training_seconds(), op=MPI.MAX)
        samples = (comm.allreduce(opt.events.own_samples)
                   + sum(loss["their_samples"] for loss in opt.lost_ranks))
        self.log.close()
        rows = comm.gather(stats, root=0)
        loss, correct = loss_and_correct(self.model, self.x_test, self.y_test,
                                         self.config.data.eval_batch_size)
        if opt.rank == 0:
            n = len(self.y_test)
            summary = {"policy": self.config.policy.name, "topology": self.graph.name,
                       "world_size": self.size, "finished_ranks": opt.size,
                       "lost_ranks": opt.lost_ranks,
                       "accuracy": correct / n, "loss": loss / n,
                       "seconds": seconds, "samples": samples,
                       "iterations": [r["iterations"] for r in rows],
                       "neighbours": [r["neighbours"] for r in rows],
                       "wait_share": [r["wait_share"] for r in rows],
                       "sleep_share": [r["sleep_share"] for r in rows],
                       # this rank's process CPU time over its wall-clock time in run()
                       "cpu_share": [r["cpu_share"] for r in rows],
                       "overrun_share": [r["overrun_share"] for r in rows],
                       "mailbox": [r["mailbox"] for r in rows],
                       "control_round_trips": [r["control_round_trips"] for r in rows],
                       "stragglers": self.straggler.describe(),
                       "emulation": opt.emulator.describe() if opt.emulator else None,
                       "target_accuracy": self.config.eval.target_accuracy,
                       "time_to_target": self.time_to_target,
                       "exit": "preempted" if preempted else "finished"}
            if not preempted:
                save_model(self.folder / "model.h5", self.model, self._model_meta())
            write_json(self.folder / "summary.json", summary)
            print(summary_table(summary), flush=True)
            print(f"run folder: {self.folder}" + (
                f" (preempted: continue with --resume {self.folder})" if preempted else ""),
                flush=True)
        return EXIT_PREEMPTED if preempted else 0

    def _model_meta(self):
        return {"model": self.config.model.name, "model_params": self.config.model.params,
                "input_shape": list(self.input_shape), "num_classes": int(self.num_classes),
                "dataset": self.config.data.name}


def resolve_config(args):
    """The job's config: the file, or the resumed run's, with the overrides on top."""
    if args.config:
        return load_config(args.config, args.overrides)
    manifest = checkpoint.read_manifest(checkpoint.find_checkpoint(args.resume))
    raw = yaml.safe_load(manifest.config_yaml)
    return config_from_dict(raw, source=f"{manifest.path} (config)", overrides=args.overrides)


def main(argv=None):
    args = parse_args(argv)
    install_abort_hook()  # bad input on any rank ends the whole job, from here on
    config = resolve_config(args)
    world = init(device=config.device)
    if world.rank == 0:
        for warning in config.warnings:
            warn(warning)
        print(config.to_yaml(), flush=True)
    trainer = Trainer(world, config, args.config, args.resume)
    if world.rank == 0:
        print(f"{world.size} ranks, {trainer.graph.name}, policy {config.policy.name}, "
              f"device {trainer.device}, {world.threads_per_rank()} torch thread(s) per rank, "
              f"{trainer.opt.deposit_mode()}, {trainer.opt.communicated()}; run folder "
              f"{trainer.folder}", flush=True)
    return trainer.run()


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
