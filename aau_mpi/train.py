"""The trainer: `mpirun -n N python -m aau_mpi.train --config jobs/demo.yaml [key=value ...]`.

It wires config -> data -> model -> policy -> engine and runs the loop of
spec section 3 until the budget is used, then averages the ranks' models,
evaluates and saves the average. Around the engine it adds what a run needs:

- job-wide events (evaluations, the stop) announced through one-sided
  control words and served by every rank in the same order, both after a
  step and while waiting for neighbours, so a rank blocked on a neighbour
  never keeps that neighbour from an evaluation's collectives;
- a training clock that excludes evaluation time;
- per-rank checkpoints on each rank's own schedule, committed as a
  generation once every rank has written it (no rank ever waits for that);
- SIGTERM / SIGUSR1 (SLURM's warning before preemption): every rank stops,
  checkpoints and exits with EXIT_PREEMPTED; `--resume <run folder>` goes on.
"""

import argparse
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
import torch.nn.functional as F
from mpi4py import MPI

from aau_mpi import checkpoint
from aau_mpi.config import config_from_dict, load_config
from aau_mpi.control import PREEMPTED, JobControl, events_announced
from aau_mpi.datasets import load_dataset, partition, shard_loader
from aau_mpi.engine import Engine, wait_for
from aau_mpi.errors import UserError
from aau_mpi.evaluation import evaluate_job, loss_and_correct
from aau_mpi.models import FlatParameters, build_model
from aau_mpi.policies import build_policy
from aau_mpi.runlog import Progress, RankLog, append_json_line, summary_table, write_json
from aau_mpi.schedule import Schedule
from aau_mpi.stragglers import build_straggler, slow_down
from aau_mpi.topology import load_topology
from aau_mpi.world import init_world, install_abort_hook, report_and_abort

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: "try again", what a requeue script looks for
EXIT_STALLED = 3             # the watchdog ended the job
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLL_SECONDS = 0.02          # how often a waiting rank reads the control words
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MEMORY_EVERY = 16            # iterations between resident-memory samples (7 us each)


@contextmanager
def section(name):
    """Prefix a component's UserError with its config section, unless it names it."""
    try:
        yield
    except UserError as err:
        message = str(err)
        raise UserError(message if message.startswith(name) else f"{name}: {message}") from None


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
        self.device = self._device(config.device)
        self.preempted = False

        # Cheap components first: their bad input fails before data loads.
        topology = config.topology
        with section("topology"):
            self.graph = load_topology(Path(topology.file) if topology.file else
                                       {"generator": topology.name, "params": topology.params},
                                       self.size)
        with section("policy"):
            self.policy = build_policy(config.policy.name, self.graph, self.rank,
                                       config.policy.params)
        with section("stragglers"):
            self.straggler = build_straggler(config.stragglers.name, self.rank, self.size,
                                             config.stragglers.params)
        self.lr = config.optim.learning_rate()
        self.manifest = checkpoint.find_checkpoint(resume) if resume else None
        if self.manifest:
            self.manifest = checkpoint.read_manifest(self.manifest)
            checkpoint.check_compatible(self.manifest, self.size, self._identity())

        with section("data"):
            data = load_dataset(config.data.name, config.data.params)
        self.train_size = len(data.y_train)
        with section("data.partition"):
            parts = partition(data.y_train.numpy(), self.size, config.data.partition.name,
                              seed=config.seed, **config.data.partition.params)
        self.shard = parts[self.rank]
        self.batches = shard_loader(data.x_train.to(self.device), data.y_train.to(self.device),
                                    self.shard, config.data.batch_size,
                                    seed=config.seed * 1000 + self.rank)
        test = slice(0, config.eval.max_samples)
        self.x_test = data.x_test[test].to(self.device)
        self.y_test = data.y_test[test].to(self.device)
        self.input_shape, self.num_classes = data.input_shape, data.num_classes

        torch.manual_seed(config.seed)
        with section("model"):
            self.model = build_model(config.model.name, self.input_shape, self.num_classes,
                                     config.model.params).to(self.device)
        self.params = FlatParameters(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.optim.lr,
                                         momentum=config.optim.momentum,
                                         weight_decay=config.optim.weight_decay,
                                         nesterov=config.optim.nesterov)
        self.x = self.params.host_view()
        self.comm.Bcast(self.x, root=0)  # spec section 3: identical start on every rank
        self._to_device()

        budget = config.budget
        samples = budget.samples or (round(budget.epochs * self.train_size) if budget.epochs
                                     else None)
        every = config.eval
        self.schedule = Schedule(
            sample_budget=samples, time_budget=budget.seconds,
            eval_samples=round(every.every_epochs * self.train_size) if every.every_epochs
            else None,
            eval_seconds=every.every_seconds)

        # Progress counters; a resume replaces them with the checkpoint's.
        self.own_samples = 0         # samples this rank used (its share of the global count)
        self.evals_before = 0        # evaluations done before this job started
        self.time_offset = 0.0       # training seconds before this job started
        self.excluded = 0.0          # evaluation seconds in this job
        self.started = self.world.clock()  # re-set when the loop starts
        self.generation = 0          # this rank's newest checkpoint generation
        self.committed = 0
        self.folder = self._run_folder(config_path, resume)
        self.engine = Engine(self.comm, self.graph, self.policy, self.x, self.clock,
                             checksum=config.mailbox.checksum)
        if self.manifest:
            self._restore()
        self.control = JobControl(self.comm, self.comm.allreduce(self.own_samples))
        self.events_done = 0         # events of this job served by this rank
        self.word = 0                # newest event word this rank has seen

    # ---- set-up helpers ---------------------------------------------------

    def _device(self, wanted):
        if wanted == "cpu":
            return torch.device("cpu")
        if wanted == "cuda" and not torch.cuda.is_available():
            raise UserError("device: cuda requested but torch sees no GPU: set device=auto "
                            "or device=cpu, or install a CUDA build of torch")
        return self.world.device()

    def _identity(self):
        """What a resumed run must share with the run it continues."""
        data = self.config.to_dict()["data"]
        return {"model": self.config.to_dict()["model"],
                "data": {key: value for key, value in data.items()
                         if key not in ("batch_size", "eval_batch_size")}}

    def _run_folder(self, config_path, resume):
        """The run's folder: the resumed run's, or a new one under output.dir."""
        if self.manifest:
            folder = self.manifest.path.parent.parent.parent
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

    def _to_device(self):
        """On a GPU, the engine mixes a pinned host copy: load it into the model."""
        if self.device.type != "cpu":
            self.params.load_(self.x)

    # ---- clock ------------------------------------------------------------

    def clock(self):
        """Training seconds: since the run's start, evaluation time excluded."""
        return self.time_offset + self.world.clock() - self.started - self.excluded

    # ---- one iteration ----------------------------------------------------

    def _compute(self):
        started = time.perf_counter()
        x, y = next(self.batches)
        self.params.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.loss = loss.item()
        if not math.isfinite(self.loss):
            raise UserError(f"training diverged: loss is {self.loss} at iteration "
                            f"{self.engine.k} on rank {self.rank}: lower optim.lr "
                            f"(now {self.config.optim.lr:g}) or add optim.warmup; "
                            f"{self._checkpoint_hint()}")
        self.delay = slow_down(self.straggler, time.perf_counter() - started, self.clock())
        grad = self.params.flat_grad
        return grad.numpy() if grad.device.type == "cpu" else grad.cpu().numpy()

    def _apply_step(self, g, scale):
        if self.device.type != "cpu":
            self.params.load_(self.x)
            self.params.flat_grad.copy_(torch.from_numpy(g))
        self.step_lr = self.lr(self._progress()) * scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.step_lr
        self.optimizer.step()
        if self.device.type != "cpu":
            self.params.host_view()  # refresh the staging buffer the next deposit sends

    def _progress(self):
        """Fraction of the budget used, for the learning rate. Lock-step ranks
        use the value agreed after the last step: each rank's own reading of
        the counter differs, and different steps would let their models drift."""
        if self.policy.uses_mailbox:
            return self.schedule.progress(self.samples, self.clock())
        return self._agreed_progress

    # ---- events -------------------------------------------------------------

    def _announce(self, word):
        """Announce whatever is due after `word`; return the newest event word."""
        while (new := self.schedule.next_word(word, self.evals_before, self.samples,
                                              self.clock(), self.preempted)) is not None:
            found = self.control.announce(word, new)
            word = new if found == word else found
        return max(word, self.word)

    def _serve(self, word, stop_allowed):
        """Run the events announced up to `word` in order; True once the stop is reached.

        Mid-step (`stop_allowed` False) only evaluations are served: the step
        finishes first, and the stop is taken after it.
        """
        self.word = max(self.word, word)
        count, stop = events_announced(self.word)
        while self.events_done < count:
            if self.events_done + 1 == count and stop:
                return stop_allowed
            self.events_done += 1
            self._evaluate(self.evals_before + self.events_done)
        return False

    def _idle(self):
        """Called while the engine waits for neighbours."""
        self._watch()
        now = time.monotonic()
        if now - self._polled < POLL_SECONDS:
            return
        self._polled = now
        self.samples, word = self.control.poll()
        self._serve(self._announce(word), stop_allowed=False)

    # ---- the stall watchdog ---------------------------------------------------

    def _watch(self, collective=None):
        """While waiting: report, and act on, a wait longer than watchdog.seconds.

        `collective`: what this rank waits in when every rank must arrive (an
        evaluation, the final average); going on without a rank is then
        impossible, so the watchdog ends the job.
        """
        watchdog = self.config.watchdog
        now = time.monotonic()
        if watchdog.seconds is None:
            return
        if self._waiting_since is None:
            self._waiting_since = now
        waited = now - self._waiting_since
        if waited < watchdog.seconds or self._reported:
            return
        self._reported = True  # once per wait
        report, stalled, headers = self._stall_report(waited, collective)
        if (collective or watchdog.action == "abort"
                or (watchdog.action == "auto" and (self.policy.synchronous or not stalled))):
            report_and_abort(f"watchdog: {report}: ending the job (watchdog.seconds="
                             f"{watchdog.seconds:g}, action {watchdog.action})",
                             EXIT_STALLED, self.comm)
        if watchdog.action == "auto":
            self.policy.skip(stalled, headers)
            report += "; going on without them until they deposit again"
        print(f"[rank {self.rank}] watchdog: {report}", file=sys.stderr, flush=True)

    def _stall_report(self, waited, collective):
        """(one-line report, indices of the neighbours waited for, header snapshot)."""
        where = f"in {collective}" if collective else f"at iteration {self.engine.k}"
        head = f"rank {self.rank} has waited {waited:.1f} s {where}"
        mailbox = self.engine.mailbox
        if mailbox is None or mailbox.closed:
            return f"{head} in an Allreduce: some rank stopped stepping", [], None
        headers, now = mailbox.headers(), self.clock()
        parts, stalled = [], []
        for j, rank in enumerate(mailbox.in_neighbours):
            seq = int(headers["seq"][j].sum())
            if headers["done"][j].any():
                state = "done"
            elif seq > self.policy.last_seq[j].sum():
                state = "fresh"
            else:
                state = "nothing new"
                stalled.append(j)
            age = f"{now - headers['time'][j].max():.1f} s ago" if seq else "never"
            parts.append(f"rank {rank} (seq {seq}, last deposit {age}, {state})")
        return f"{head}; its neighbours: {', '.join(parts)}", stalled, headers

    def _evaluate(self, number):
        """Collective evaluation; its time is excluded from the training clock."""
        # Non-blocking, so the watchdog sees a rank that never arrives; once
        # every rank is here the evaluation's own collectives complete.
        self._waiting_since, self._reported = None, False
        wait_for(self.comm.Ibarrier(), lambda: self._watch("an evaluation"))
        started = self.world.clock()
        at = self.clock()
        record = evaluate_job(self.comm, self.model, self.params, self.x_test, self.y_test,
                              self.config.data.eval_batch_size)
        if record is not None:
            record = {"evaluation": number, "time": round(at, 6), "samples": self.samples,
                      "epochs": self.samples / self.train_size, **record}
            append_json_line(self.folder / "eval.jsonl", record)
            self.last_accuracy = record["accuracy"]
            target = self.config.eval.target_accuracy
            if target is not None and self.time_to_target is None and record["accuracy"] >= target:
                self.time_to_target = at
        self.log.span("evaluate", at, 0.0, evaluation=number)
        self.excluded += self.world.clock() - started
        self._waiting_since = None  # an evaluation is not a stall

    # ---- checkpoints ------------------------------------------------------

    def _checkpoint_root(self):
        return self.folder / "checkpoints"

    def _checkpoint_hint(self):
        return (f"the last complete checkpoint is kept under {self._checkpoint_root()}"
                if self.config.checkpoint.enabled else "checkpoints are off")

    def _checkpoint_due(self):
        every = self.config.checkpoint
        if not every.enabled:
            return False
        return ((every.every_seconds is not None and self.clock() >= self._next_checkpoint_time)
                or (every.every_iterations is not None
                    and self.engine.k >= self._next_checkpoint_iteration))

    def _rank_state(self):
        momentum = [self.optimizer.state[p].get("momentum_buffer") for p in self.model.parameters()]
        arrays = {"params": self.params.flat.detach().cpu().numpy(),
                  "torch_rng": torch.get_rng_state().numpy()}
        if all(m is not None for m in momentum):
            arrays["momentum"] = torch.cat([m.reshape(-1) for m in momentum]).cpu().numpy()
        info = {"iteration": self.engine.k, "own_samples": self.own_samples,
                "training_seconds": self.clock(), "evaluations": self.evals_before + self.events_done,
                "loader": self.batches.state_dict(), "policy": self.policy.state_dict(),
                "straggler": self.straggler.state_dict()}
        return arrays, info

    def _write_checkpoint(self):
        """Write this rank's state as its next generation; commit it if every rank has."""
        if not np.isfinite(self.x).all():
            raise UserError(f"training diverged: rank {self.rank}'s parameters hold NaN or inf "
                            f"at iteration {self.engine.k}: lower optim.lr; "
                            f"{self._checkpoint_hint()}")
        started = self.clock()
        self.generation += 1
        arrays, info = self._rank_state()
        checkpoint.write_rank_state(self._checkpoint_root(), self.generation, self.rank,
                                    self.size, arrays, info)
        everyone = self.control.checkpointed(self.generation)
        if everyone >= self.generation > self.committed:
            self._commit(self.generation)
        self.log.span("checkpoint", started, self.clock() - started, generation=self.generation)

    def _commit(self, generation):
        checkpoint.commit_generation(self._checkpoint_root(), generation, self.size,
                                     self.config.to_yaml(), self._identity(),
                                     keep=self.config.checkpoint.keep)
        self.committed = generation

    def _schedule_next_checkpoint(self):
        every = self.config.checkpoint
        self._next_checkpoint_time = self.clock() + (every.every_seconds or math.inf)
        self._next_checkpoint_iteration = self.engine.k + (every.every_iterations or 0)

    def _restore(self):
        """Load this rank's state from the checkpoint being resumed (collective)."""
        arrays, info = checkpoint.read_rank_state(self.manifest, self.rank)
        self.params.load_(arrays["params"])
        self.x[:] = arrays["params"]
        if "momentum" in arrays:
            offset = 0
            for p in self.model.parameters():
                n = p.numel()
                buffer = torch.from_numpy(arrays["momentum"][offset:offset + n]).view_as(p)
                self.optimizer.state[p]["momentum_buffer"] = buffer.to(self.device).clone()
                offset += n
        torch.set_rng_state(torch.from_numpy(arrays["torch_rng"]))
        self.batches.load_state_dict(info["loader"])
        self.policy.load_state_dict(info["policy"])
        self.straggler.load_state_dict(info["straggler"])
        self.own_samples = info["own_samples"]
        self.engine.k = info["iteration"]
        if self.policy.synchronous:
            # Ranks checkpoint a step or so apart; a synchronous policy
            # matches iteration numbers, so all continue from the largest.
            self.engine.k = self.comm.allreduce(self.engine.k, op=MPI.MAX)
        self.time_offset = self.comm.allreduce(info["training_seconds"], op=MPI.MAX)
        # Evaluations go on from the checkpoint's; with a new interval
        # (eval.every_*), from the points already passed, not a burst of them.
        passed = [self.time_offset // self.schedule.eval_seconds if self.schedule.eval_seconds
                  else 0, self.comm.allreduce(self.own_samples) // self.schedule.eval_samples
                  if self.schedule.eval_samples else 0]
        self.evals_before = max(self.comm.allreduce(info["evaluations"], op=MPI.MAX),
                                *(int(p) for p in passed))
        self.generation = self.committed = self.manifest.generation

    # ---- the run ------------------------------------------------------------

    def run(self):
        """Train until the budget is used or a preemption signal; returns the exit code."""
        config = self.config
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._on_signal)
        self.log = RankLog(self.folder, self.rank, trace=config.output.trace)
        self.progress = Progress(self.schedule, enabled=config.output.progress and self.rank == 0)
        self.loss, self.delay, self.step_lr = math.nan, 0.0, config.optim.lr
        self.last_accuracy, self.time_to_target = None, None
        self.samples = self.comm.allreduce(self.own_samples)
        self._polled = -math.inf
        self._agreed_progress = self.schedule.progress(self.samples, 0.0)
        self._waiting_since, self._reported = None, False
        idle = (self._idle if self.policy.uses_mailbox
                else lambda: self._watch("the gradient Allreduce"))
        self._schedule_next_checkpoint()
        wait = sleep = 0.0
        iterations = neighbours = 0
        self.comm.Barrier()
        self.started = self.world.clock()
        stop = False
        while not stop:
            record = self.engine.step(self._compute, self._apply_step, idle)
            self._waiting_since, self._reported = None, False
            self.own_samples += config.data.batch_size
            self.samples, word = self.control.add_samples(config.data.batch_size)
            word = self._announce(word)
            if not self.policy.uses_mailbox:
                # Lock-step ranks must serve the same events after the same
                # step, and take identical steps: agree on both.
                agreed = np.array([word, self.schedule.progress(self.samples, self.clock())])
                self.comm.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MAX)
                word, self._agreed_progress = int(agreed[0]), float(agreed[1])
            stop = self._serve(word, stop_allowed=True)
            iterations += 1
            neighbours += len(record.averaged)
            wait += record.wait_seconds
            sleep += self.delay
            memory = ({"rss_mb": resident_megabytes()}
                      if record.iteration % MEMORY_EVERY == 0 else {})
            self.log.iteration(record, loss=self.loss, delay=self.delay, samples=self.samples,
                               lr=self.step_lr, **memory)
            if not stop and self._checkpoint_due():
                self._write_checkpoint()
                self._schedule_next_checkpoint()
            self.progress.update(self.samples, self.clock(), self.loss, self.last_accuracy)
        self.progress.update(self.samples, self.clock(), self.loss, self.last_accuracy, force=True)
        self.progress.close()
        seconds = self.clock() - self.time_offset
        _, reason = events_announced(self.word)
        mailbox = self.engine.mailbox.stats if self.engine.mailbox else {}
        return self._finish(reason, {"iterations": self.engine.k, "mailbox": mailbox,
                                     "neighbours": neighbours / max(iterations, 1),
                                     "wait_share": wait / max(seconds, 1e-9),
                                     "sleep_share": sleep / max(seconds, 1e-9)})

    def _on_signal(self, signum, frame):
        # Only set a flag: the loop announces the stop at its next service point.
        self.preempted = True

    def _finish(self, reason, stats):
        """Collective: average, checkpoint, evaluate, save; returns the exit code."""
        self._waiting_since, self._reported = None, False
        average = self.engine.finish(lambda: self._watch("the final average"))
        # The job's totals: its last rank to stop, every rank's samples.
        seconds = self.comm.allreduce(self.clock(), op=MPI.MAX)
        self.samples = self.comm.allreduce(self.own_samples)
        if not np.isfinite(self.x).all() or not np.isfinite(average).all():
            raise UserError(f"training diverged: the parameters hold NaN or inf at the end: "
                            f"lower optim.lr; {self._checkpoint_hint()}")
        if self.config.checkpoint.enabled:
            # Ranks that wrote a periodic checkpoint the others did not reach
            # are a generation ahead: the final one is numbered past them all.
            self.generation = self.comm.allreduce(self.generation, op=MPI.MAX) + 1
            arrays, info = self._rank_state()
            checkpoint.write_rank_state(self._checkpoint_root(), self.generation, self.rank,
                                        self.size, arrays, info)
            self.comm.Barrier()
            if self.rank == 0:
                self._commit(self.generation)
        self.control.close()
        self.log.close()
        preempted = reason == PREEMPTED
        rows = self.comm.gather(stats, root=0)

        # The final model: x_bar, evaluated on the whole test set.
        self.params.load_(average)
        loss, correct = loss_and_correct(self.model, self.x_test, self.y_test,
                                         self.config.data.eval_batch_size)
        if self.rank == 0:
            n = len(self.y_test)
            summary = {"policy": self.config.policy.name, "topology": self.graph.name,
                       "world_size": self.size, "accuracy": correct / n, "loss": loss / n,
                       "seconds": seconds, "samples": self.samples,
                       "iterations": [r["iterations"] for r in rows],
                       "neighbours": [r["neighbours"] for r in rows],
                       "wait_share": [r["wait_share"] for r in rows],
                       "sleep_share": [r["sleep_share"] for r in rows],
                       "mailbox": [r["mailbox"] for r in rows],
                       "stragglers": self.straggler.describe(),
                       "target_accuracy": self.config.eval.target_accuracy,
                       "time_to_target": self.time_to_target,
                       "exit": "preempted" if preempted else "finished"}
            if not preempted:
                checkpoint.save_model(self.folder / "model.h5", self.model, self._model_meta())
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
    world = init_world()
    install_abort_hook(world.comm)
    world.set_torch_threads()
    config = resolve_config(args)
    if world.rank == 0:
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        print(config.to_yaml(), flush=True)
    trainer = Trainer(world, config, args.config, args.resume)
    if world.rank == 0:
        print(f"{world.size} ranks, {trainer.graph.name}, policy {config.policy.name}, "
              f"device {trainer.device}, {world.threads_per_rank()} torch thread(s) per rank; "
              f"run folder {trainer.folder}", flush=True)
    return trainer.run()


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
