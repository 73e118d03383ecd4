"""The virtual-time simulator: N workers in one process, no MPI (docs/simulator.md).

    python -m aau_mpi.simulate --config jobs/compare/aau.yaml --ranks 256 \\
        [--step-seconds 0.002] [--bandwidth-gbs 10] [--latency-us 20] [section.key=value ...]

Each virtual worker holds its own copy of the config's model (the same x_0
on all, as the broadcast gives), computes real gradients on its real shard
(the trainer's partition and loader seeds) and steps its own torch SGD with
the learning-rate schedule on global progress. Each worker's REAL policy
decides over header snapshots built as the mailbox builds them and mixes
the payloads its neighbours deposited (a payload is the sender's x at its
deposit). The allreduce policy averages the gradients in lock step.

Time is virtual. A compute phase lasts the step time (measured at start-up:
the median of TIMED_STEPS real steps of this model and batch size here, or
--step-seconds) plus the straggler model's delay; a deposit into one target
takes bytes / bandwidth + latency, the targets one after another, and
overlaps the sender's next compute as on the communication thread; the
allreduce baseline waits for the slowest worker, then pays a ring
allreduce. An event heap ordered by virtual time (ties in order of
creation) drives the clock, so a run is deterministic given the seed and
the timing parameters.

Speed: a worker needs its gradient only when it steps, and its x does not
change before, so gradients are computed lazily and together: when one
worker needs its gradient, every worker still owing one gets it in the same
vmapped call over the stacked parameters (all workers' x are the rows of
one (N, numel) tensor; each worker's torch SGD steps its own row).

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
import heapq
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.func import functional_call, grad, vmap

from aau_mpi.training.config_loading import load_config
from aau_mpi.training.datasets import load_dataset
from aau_mpi.training.partitions import partition, shard_loader
from aau_mpi.base.errors import UserError, section
from aau_mpi.training.evaluation import loss_and_correct
from aau_mpi.comm.header import header_dtype
from aau_mpi.training.models import build_model, save_model
from aau_mpi.algorithms.policies import build_policy
from aau_mpi.training.runlog import Progress, RankLog, append_json_line, summary_table, write_json
from aau_mpi.algorithms.schedule import events_announced
from aau_mpi.algorithms.stragglers import build_straggler
from aau_mpi.algorithms.topology import load_topology

BANDWIDTH_RESULTS = (Path(__file__).resolve().parent.parent / "bench" / "results"
                     / "mailbox_bandwidth.json")
DEFAULT_BANDWIDTH_GBS = 10.0
DEFAULT_LATENCY_US = 20.0
TIMED_STEPS = 20           # the start-up measurement: median of this many steps
WARM_UP_STEPS = 3          # ... after this many untimed ones
POLL_FRACTION = 0.01       # a waiting time-dependent policy is polled every 1 % of a step
STALL_STEPS = 1000         # nothing but polls for this many step times: a deadlock
ALL_LOGGED = 64            # up to this many workers, every one is logged and evaluated
SAMPLED = 16               # beyond, this many evenly spaced ones
WORKER_CHUNK = 256         # workers per vmapped gradient call (bounds its memory)
EVAL_CHUNK = 16            # workers per vmapped evaluation call

LAND, COMPUTED, MIX, POLL, TICK = range(5)   # event kinds


@dataclass(frozen=True)
class Timing:
    """The virtual clock's parameters (config.yaml's `simulation:`, summary's "timing")."""
    step_seconds: float
    step_seconds_from: str
    bandwidth_gbs: float
    bandwidth_from: str
    latency_us: float
    payload_bytes: int

    @property
    def link_seconds(self):
        """One deposit into one target."""
        return self.payload_bytes / (self.bandwidth_gbs * 1e9) + self.latency_us * 1e-6

    def allreduce_seconds(self, n):
        """A ring allreduce of the gradient (as many bytes as the payload) over n workers."""
        return (2 * (n - 1) / n * self.payload_bytes / (self.bandwidth_gbs * 1e9)
                + 2 * (n - 1) * self.latency_us * 1e-6)

    def describe(self, n):
        return {**asdict(self), "link_seconds": self.link_seconds,
                "allreduce_seconds": self.allreduce_seconds(n),
                "poll_seconds": POLL_FRACTION * self.step_seconds}


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


class StackedModel:
    """One architecture applied to many flat parameter vectors at once (torch.func)."""

    def __init__(self, module):
        named = list(module.named_parameters())
        self.module = module
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self._gradients = vmap(grad(self._loss, has_aux=True))
        self._logits = vmap(self._forward, in_dims=(0, None))

    def _forward(self, flat, x):
        params = {name: piece.view(shape) for name, piece, shape
                  in zip(self.names, flat.split(self.sizes), self.shapes)}
        return functional_call(self.module, params, (x,))

    def _loss(self, flat, x, y):
        loss = F.cross_entropy(self._forward(flat, x), y)
        return loss, loss

    def gradients(self, flats, x, y):
        """(gradients (W, numel), losses (W,)) of W flat vectors, each on its own batch
        x[w], y[w]."""
        return self._gradients(flats, x, y)

    @torch.no_grad()
    def loss_and_correct(self, flats, x, y, batch_size):
        """Summed cross-entropy and correct predictions of each of W flat vectors on (x, y)."""
        loss = torch.zeros(len(flats), dtype=torch.float64)
        correct = torch.zeros(len(flats), dtype=torch.int64)
        for start in range(0, len(y), batch_size):
            logits = self._logits(flats, x[start:start + batch_size])     # (W, b, classes)
            target = y[start:start + batch_size].expand(len(flats), -1)
            loss += F.cross_entropy(logits.transpose(1, 2), target,
                                    reduction="none").sum(1).double()
            correct += (logits.argmax(2) == target).sum(1)
        return loss, correct


class Worker:
    """One virtual worker: its row of the parameters, optimizer, policy, window, clocks."""

    def __init__(self, rank, policy, straggler, loader, x, gradient, optim, dtype, log):
        self.rank, self.policy, self.straggler, self.loader = rank, policy, straggler, loader
        self.x = x
        x.grad = gradient  # a row of Simulator.gradients, filled by the batched computation
        self.opt = torch.optim.SGD([x], lr=optim.lr, momentum=optim.momentum,
                                   weight_decay=optim.weight_decay, nesterov=optim.nesterov)
        self.in_neighbours = policy.neighbours
        slots = policy.slots_per_neighbour
        # The window as Mailbox.headers() shows it, and the payload behind each slot.
        self.headers = np.zeros((len(self.in_neighbours), slots), dtype)
        self.payloads = [[None] * slots for _ in self.in_neighbours]
        self.log = log
        self.k = 0
        self.lr = optim.lr
        self.delay = self.compute = 0.0
        self.computed_at = self.selected_at = 0.0
        self.deposit_end = self.deposit_seconds = 0.0
        self.selection = None
        self.waiting = self.poll_pending = self.needs_gradient = self.finished = False
        self.end = self.finish_time = 0.0
        self.own_samples = self.neighbours = 0
        self.wait = self.sleep = 0.0


class Simulator:
    """A simulated job of `ranks` workers for `config`; run() trains it and returns the summary.

    After run(), `parameters` holds every worker's final x (row i: worker i) and
    `workers[i].k` its iterations. `folder`: the run folder (default: under
    config.output.dir, named as the trainer names it).
    """

    def __init__(self, config, ranks, *, step_seconds=None, bandwidth_gbs=None,
                 latency_us=None, folder=None, config_path=None):
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
        self.lockstep = not policies[0].uses_mailbox

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

        step_from = "--step-seconds"
        if step_seconds is None:
            step_seconds = measure_step_seconds(self.model, data.x_train, data.y_train,
                                                self.batch_size, config.optim)
            step_from = (f"measured: median of {TIMED_STEPS} steps, "
                         f"{torch.get_num_threads()} thread(s)")
        x0 = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
        payload_bytes = x0.numel() * x0.element_size()
        if bandwidth_gbs is None:
            bandwidth_gbs, bandwidth_from = measured_bandwidth(payload_bytes)
        else:
            bandwidth_from = "--bandwidth-gbs"
        self.timing = Timing(step_seconds, step_from, bandwidth_gbs, bandwidth_from,
                             DEFAULT_LATENCY_US if latency_us is None else latency_us,
                             payload_bytes)
        self.poll_seconds = POLL_FRACTION * step_seconds
        self.schedule = config.schedule(self.train_size)
        self.learning_rate = config.optim.learning_rate(n * self.batch_size, self.batch_size)

        (self.folder / "config.yaml").write_text(
            config.to_yaml() + yaml.safe_dump({"simulation": {"ranks": n,
                                                              **self.timing.describe(n)}},
                                              sort_keys=False))
        self.logged = evaluated_ranks(n)
        # Every worker's x is a row of one tensor (the same x_0 on all, as the
        # broadcast gives), its gradient a row of another.
        self.parameters = x0.repeat(n, 1)
        self.gradients = torch.zeros_like(self.parameters)
        self.losses = np.zeros(n)
        self._mix = torch.empty_like(x0)
        dtype = header_dtype(n)
        logged = set(self.logged)
        self.workers = [Worker(i, policies[i], stragglers[i], loaders[i], self.parameters[i],
                               self.gradients[i], config.optim, dtype,
                               RankLog(self.folder, i) if i in logged else None)
                        for i in range(n)]
        # Where sender j sits in target t's window: index_in[j][t].
        self.index_in = [{} for _ in range(n)]
        for target in range(n):
            for index, sender in enumerate(self.graph.in_neighbours(target)):
                self.index_in[sender][target] = index

        self.events, self._order = [], itertools.count()
        self.pending = []                 # workers owing the gradient of their iteration
        self.samples = 0
        self.word = 0                     # the announced events (aau_mpi.algorithms.schedule's word)
        self.stopped = False
        self.unfinished = n
        self.last_activity = 0.0
        self.last_loss, self.last_accuracy, self.time_to_target = math.nan, None, None
        self.progress = Progress(self.schedule, enabled=config.output.progress)

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

    # ---- the run ---------------------------------------------------------------

    def run(self):
        """Train until the budget is used; write the run folder; return the summary."""
        if self.lockstep:
            self._run_lockstep()
        else:
            self._run_mailbox()
        self.progress.update(self.samples, self._seconds(), self.last_loss, self.last_accuracy,
                             force=True)
        self.progress.close()
        return self._finish()

    def _push(self, at, kind, worker, data=None):
        heapq.heappush(self.events, (at, next(self._order), kind, worker, data))

    def _run_mailbox(self):
        for worker in self.workers:
            self._start_iteration(worker, 0.0)
        self._push_tick(0.0)
        while self.unfinished:
            if not self.events:
                waiting = [w.rank for w in self.workers if w.waiting]
                raise RuntimeError(f"simulated deadlock: workers {waiting[:10]} wait and "
                                   f"nothing is in flight (a policy bug)")
            at, _, kind, worker, data = heapq.heappop(self.events)
            if kind == LAND:
                self._land(worker, at, *data)
            elif kind == COMPUTED:
                self._computed(worker, at)
            elif kind == MIX:
                self._mix_and_step(worker, at)
            elif kind == POLL:
                worker.poll_pending = False
                if worker.waiting:
                    if at - self.last_activity > STALL_STEPS * self.timing.step_seconds:
                        raise RuntimeError(f"simulated deadlock: worker {worker.rank} polled "
                                           f"for {STALL_STEPS} step times with nothing in "
                                           f"flight (a policy bug)")
                    self._select(worker, at)
            else:
                self._announce(at)
                self._push_tick(at)

    def _push_tick(self, now):
        """The next time an event may fall due with time alone: an evaluation every
        eval.every_seconds, or the time budget."""
        if self.stopped:
            return
        count, _ = events_announced(self.word)
        every, budget = self.schedule.eval_seconds, self.schedule.time_budget
        due = [t for t in ((count + 1) * every if every else None, budget)
               if t is not None and t > now]
        if due:
            self._push(min(due), TICK, None)

    def _start_iteration(self, worker, now):
        """Deposit x_k (it lands while the worker computes), then compute."""
        worker.lr = self.learning_rate(self.schedule.progress(self.samples, now))
        self._deposit(worker, now, self.graph.active_out(worker.rank, worker.k), done=False)
        worker.needs_gradient = True
        self.pending.append(worker)
        step = self.timing.step_seconds
        worker.delay = worker.straggler.delay(step, now + step)
        worker.compute = step + worker.delay
        self._push(now + worker.compute, COMPUTED, worker)

    def _deposit(self, worker, now, targets, done):
        """The targets in turn, one link time each, as the communication thread does."""
        worker.policy.deposited(now)
        link = self.timing.link_seconds
        if targets:
            slot = worker.policy.deposit_slot(worker.k)
            payload = worker.x.clone()
            where = self.index_in[worker.rank]
            for n, target in enumerate(targets):
                self._push(now + (n + 1) * link, LAND, self.workers[target],
                           (where[target], slot, worker.k, now, done, payload))
        worker.deposit_seconds = len(targets) * link
        worker.deposit_end = now + worker.deposit_seconds

    def _land(self, worker, now, index, slot, iteration, sent, done, payload):
        """A deposit completes in worker's window: the header as the mailbox writes it."""
        self.last_activity = now
        if worker.finished:
            return
        record = worker.headers[index, slot]  # a view into the window
        seq = record["seq"] + 1
        record["version"], record["seq"] = 2 * seq, seq
        record["iteration"], record["time"], record["done"] = iteration, sent, done
        record["weight"] = 1.0
        worker.payloads[index][slot] = payload
        if worker.waiting:
            self._select(worker, now)

    def _computed(self, worker, now):
        self.last_activity = now
        worker.computed_at = now
        worker.policy.computed(worker.compute)
        worker.waiting = True
        self._select(worker, now)

    def _select(self, worker, now):
        selection = worker.policy.select(worker.headers.copy(), worker.k, now)
        if selection is None:
            if worker.policy.time_dependent and not worker.poll_pending:
                worker.poll_pending = True
                self._push(now + self.poll_seconds, POLL, worker)
            return
        worker.waiting = False
        worker.selection, worker.selected_at = selection, now
        # The mix waits for this worker's own deposit of x_k, which reads x.
        if worker.deposit_end > now:
            self._push(worker.deposit_end, MIX, worker)
        else:
            self._mix_and_step(worker, now)

    def _mix_and_step(self, worker, now):
        """x <- self_weight x + sum w x_j (the payloads in the window now), then the step."""
        self.last_activity = now
        if worker.needs_gradient:
            self._compute_gradients()
        k, selection, x = worker.k, worker.selection, worker.x
        mix = torch.mul(x, selection.self_weight, out=self._mix)
        used, averaged, staleness = [], [], []
        for (index, slot), weight in zip(selection.slots, selection.weights):
            mix.add_(worker.payloads[index][slot], alpha=weight)
            record = worker.headers[index, slot].copy()
            used.append((index, slot, record))
            averaged.append(worker.in_neighbours[index])
            staleness.append(k - int(record["iteration"]))
        x.copy_(mix)
        worker.policy.mixed(used, k)
        scale = worker.policy.step_scale()
        self._local_step(worker, scale)
        self._count(worker, now, worker.selected_at - worker.computed_at,
                    now - worker.selected_at, averaged, staleness, scale)
        self._announce(now)
        if self.stopped:
            self._stop(worker, now)
        else:
            self._start_iteration(worker, now)

    def _run_lockstep(self):
        """The allreduce policy: all compute, the slowest sets the pace, then a ring
        allreduce of the gradients and the same step everywhere."""
        now, step = 0.0, self.timing.step_seconds
        allreduce = self.timing.allreduce_seconds(self.n)
        while not self.stopped:
            lr = self.learning_rate(self.schedule.progress(self.samples, now))
            for worker in self.workers:
                worker.lr, worker.needs_gradient = lr, True
                worker.delay = worker.straggler.delay(step, now + step)
                worker.compute = step + worker.delay
                worker.policy.computed(worker.compute)
            self.pending = list(self.workers)
            self._compute_gradients()
            end = now + max(w.compute for w in self.workers) + allreduce
            self.gradients[:] = self.gradients.sum(0) / self.n
            for worker in self.workers:
                self._local_step(worker, 1.0)
                self._count(worker, end, end - now - worker.compute, 0.0, [], [], 1.0)
            now = end
            self._announce(now)
        for worker in self.workers:
            worker.finished, worker.end, worker.finish_time = True, now, now
        self.unfinished = 0

    def _compute_gradients(self):
        """The gradient of every worker that owes one, in vmapped chunks."""
        owing, self.pending = self.pending, []
        for start in range(0, len(owing), WORKER_CHUNK):
            chunk = owing[start:start + WORKER_CHUNK]
            rows = torch.tensor([w.rank for w in chunk])
            xs, ys = zip(*(next(w.loader) for w in chunk))
            gradients, losses = self.stacked.gradients(self.parameters[rows], torch.stack(xs),
                                                       torch.stack(ys))
            self.gradients[rows] = gradients
            self.losses[rows.numpy()] = losses.numpy()
        for worker in owing:
            worker.needs_gradient = False
            if not math.isfinite(self.losses[worker.rank]):
                raise UserError(f"training diverged: loss is {self.losses[worker.rank]} at "
                                f"iteration {worker.k} on worker {worker.rank}: lower optim.lr "
                                f"(now {self.config.optim.lr:g}) or add optim.warmup")

    def _local_step(self, worker, scale):
        worker.opt.param_groups[0]["lr"] = worker.lr * scale
        worker.opt.step()

    def _count(self, worker, now, wait, deposit_wait, averaged, staleness, scale):
        """The step's samples, the worker's totals and its log line."""
        k = worker.k
        worker.k += 1
        self.samples += self.batch_size
        worker.own_samples += self.batch_size
        worker.neighbours += len(averaged)
        worker.wait += wait
        worker.sleep += worker.delay
        self.last_loss = float(self.losses[worker.rank])
        if worker.log is not None:
            record = SimpleNamespace(
                iteration=k, time=now, compute_seconds=worker.compute, wait_seconds=wait,
                deposit_seconds=worker.deposit_seconds, deposit_wait_seconds=deposit_wait,
                mix_seconds=0.0, step_seconds=0.0, copy_seconds=0.0, control_seconds=0.0,
                delay=worker.delay, averaged=averaged, staleness=staleness, step_scale=scale)
            worker.log.iteration(record, loss=self.last_loss, samples=self.samples,
                                 lr=worker.lr * scale)
        self.progress.update(self.samples, now, self.last_loss, self.last_accuracy)

    def _stop(self, worker, now):
        """The stop is taken after a step: a final deposit marked done, to every
        out-neighbour, so that nobody waits for this worker."""
        self._deposit(worker, now, self.graph.out_neighbours(worker.rank), done=True)
        worker.finished, worker.waiting = True, False
        worker.end, worker.finish_time = now, worker.deposit_end
        self.unfinished -= 1

    # ---- evaluations and the stop -----------------------------------------------

    def _announce(self, now):
        """Whatever aau_mpi.algorithms.schedule says is due now: evaluations, or the stop."""
        while (word := self.schedule.next_word(self.word, 0, self.samples, now)) is not None:
            self.word = word
            count, stop = events_announced(word)
            if stop:
                self.stopped = True
            else:
                self._evaluate(count, now)

    def _average(self):
        """x_bar, as the trainer's Allreduce of float64 copies gives it."""
        return (self.parameters.double().sum(0) / self.n).float()

    def _evaluate(self, number, now):
        average = self._average()
        distance = float(((self.parameters - average) ** 2).sum(1).double().sum()) / self.n
        batch = self.config.data.eval_batch_size
        torch.nn.utils.vector_to_parameters(average, self.model.parameters())
        loss, correct = loss_and_correct(self.model, self.x_test, self.y_test, batch)
        rank_loss, rank_correct = [], []
        for start in range(0, len(self.logged), EVAL_CHUNK):
            rows = torch.tensor(self.logged[start:start + EVAL_CHUNK])
            losses, corrects = self.stacked.loss_and_correct(self.parameters[rows],
                                                             self.x_test, self.y_test, batch)
            rank_loss += losses.tolist()
            rank_correct += corrects.tolist()
        m = len(self.y_test)
        record = {"evaluation": number, "time": round(now, 6), "samples": self.samples,
                  "epochs": self.samples / self.train_size, "accuracy": correct / m,
                  "loss": loss / m, "rank_accuracy": [c / m for c in rank_correct],
                  "rank_loss": [l / m for l in rank_loss], "consensus_distance": distance}
        if len(self.logged) < self.n:
            record["evaluated_ranks"] = self.logged
        append_json_line(self.folder / "eval.jsonl", record)
        self.last_accuracy = record["accuracy"]
        target = self.config.eval.target_accuracy
        if target is not None and self.time_to_target is None and record["accuracy"] >= target:
            self.time_to_target = record["time"]

    def _seconds(self):
        return max((w.finish_time for w in self.workers), default=0.0)

    def _finish(self):
        """The averaged model, the summary and model.h5, as the trainer writes them."""
        for worker in self.workers:
            if worker.log is not None:
                worker.log.close()
        torch.nn.utils.vector_to_parameters(self._average(), self.model.parameters())
        loss, correct = loss_and_correct(self.model, self.x_test, self.y_test,
                                         self.config.data.eval_batch_size)
        m = len(self.y_test)
        workers = self.workers
        summary = {"policy": self.config.policy.name, "topology": self.graph.name,
                   "world_size": self.n, "accuracy": correct / m, "loss": loss / m,
                   "seconds": self._seconds(), "samples": sum(w.own_samples for w in workers),
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
                   latency_us=_option("--latency-us", args.latency_us, float, 0, False, 20))
    config = load_config(args.config, args.overrides)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    simulator = Simulator(config, ranks, config_path=args.config, **options)
    timing = simulator.timing
    print(f"{ranks} virtual workers, {simulator.graph.name}, policy {config.policy.name}; "
          f"step {timing.step_seconds:g} s ({timing.step_seconds_from}), deposit "
          f"{timing.link_seconds * 1e6:.1f} us per link ({timing.bandwidth_gbs:g} GB/s, "
          f"{timing.latency_us:g} us); run folder {simulator.folder}", flush=True)
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
    """A UserError is one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
