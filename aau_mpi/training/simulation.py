"""The simulator's engine: N virtual workers trained on a virtual clock, one process,
no MPI (the command that builds a job for it: aau_mpi.simulate; docs/simulator.md).

Each worker steps SGD (torch's, in the same operations: sgd_step) on its
row of the stacked parameters, with the learning-rate schedule on global
progress. Each worker's REAL policy
decides over header snapshots built as the mailbox builds them and mixes the
payloads its neighbours deposited (a payload is the sender's x at its
deposit). The allreduce policy averages the gradients in lock step.

Time is virtual. A compute phase lasts the step time plus the straggler
model's delay, or, for a job on an emulated accelerator (`emulate:`), what
the trainer's EmulatedAccelerator models, with the same jitter draws; after
the mix and the local step, the iteration's overhead (a calibration's, 0
without one: aau_mpi.calibrate) passes before the next one starts; a
deposit into one target takes bytes / bandwidth + latency, the targets one
after another, and overlaps the sender's next compute as on the
communication thread; the allreduce baseline waits for the slowest worker,
then pays the collective (the calibration's, or the faster of a ring and a
tree allreduce, as NCCL chooses). An event heap ordered by virtual time
(ties in order of creation) drives the clock, so a run is deterministic
given the seed and the timing parameters.

Speed: a worker needs its gradient only when it steps, and its x does not
change before, so gradients are computed lazily and together: when one
worker needs its gradient, every worker still owing one gets it in the same
batched call over the stacked parameters (all workers' x are the rows of
one (N, numel) tensor, their shards slices of one tensor, so a call's
batches are one gather; each worker's torch SGD steps its own row). A
worker step then costs little more than its rows' trips through memory
(docs/simulator.md, "Speed"); none of this changes a bit of a run.
"""

import heapq
import itertools
import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from aau_mpi.algorithms.schedule import events_announced
from aau_mpi.base.errors import UserError
from aau_mpi.comm.header import header_dtype

POLL_FRACTION = 0.01       # a waiting time-dependent policy is polled every 1 % of a step
STALL_STEPS = 1000         # nothing but polls for this many step times: a deadlock
WORKER_CHUNK = 256         # workers per vmapped gradient call (bounds its memory)

LAND, COMPUTED, MIX, STEPPED, POLL, TICK = range(6)   # event kinds


@dataclass(frozen=True)
class Timing:
    """The virtual clock's parameters (config.yaml's `simulation:`, summary's "timing").

    overhead_seconds: every iteration's cost beyond compute and waiting (mix,
    local step, control), and collective_seconds: the allreduce baseline's
    collective (None: modelled from bandwidth and latency), both from a
    calibration (calibration_from) or 0 / None without one."""
    step_seconds: float
    step_seconds_from: str
    bandwidth_gbs: float
    bandwidth_from: str
    latency_us: float
    payload_bytes: int
    overhead_seconds: float = 0.0
    collective_seconds: float = None
    calibration_from: str = None

    @property
    def link_seconds(self):
        """One deposit into one target."""
        return self.payload_bytes / (self.bandwidth_gbs * 1e9) + self.latency_us * 1e-6

    def allreduce_seconds(self, n):
        """The gradient allreduce (as many bytes as the payload) over n workers: the
        calibration's, else the faster of a ring (2(n-1) latencies, 2(n-1)/n of the
        bytes through each link) and a pipelined binary tree (2 log2 n latencies,
        twice the bytes), as NCCL picks between them by size and n."""
        if self.collective_seconds is not None:
            return self.collective_seconds
        if n == 1:
            return 0.0
        transfer = self.payload_bytes / (self.bandwidth_gbs * 1e9)
        latency = self.latency_us * 1e-6
        ring = 2 * (n - 1) / n * transfer + 2 * (n - 1) * latency
        tree = 2 * transfer + 2 * math.ceil(math.log2(n)) * latency
        return min(ring, tree)

    def describe(self, n):
        return {**asdict(self), "link_seconds": self.link_seconds,
                "allreduce_seconds": self.allreduce_seconds(n),
                "poll_seconds": POLL_FRACTION * self.step_seconds}


class StackedModel:
    """One architecture applied to many flat parameter vectors at once.

    A stack of Flatten, Linear and ReLU layers (logreg, mlp) runs as batched
    matrix products over the workers, one autograd pass for all of them (the
    sum of the workers' losses: each worker's gradient is its own, as no
    parameter is shared); any other model through torch.func's vmap of grad,
    which costs several times more per worker at these sizes (docs/simulator.md).
    """

    def __init__(self, module):
        named = list(module.named_parameters())
        self.module = module
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.starts = np.cumsum([0, *self.sizes[:-1]]).tolist()  # in a flat vector
        self.layers = _dense_layers(module)
        self._gradients = vmap(grad(self._loss, has_aux=True))
        self._logits = vmap(self._forward, in_dims=(0, None))

    def _forward(self, flat, x):
        params = {name: piece.view(shape) for name, piece, shape
                  in zip(self.names, flat.split(self.sizes), self.shapes)}
        return functional_call(self.module, params, (x,))

    def _loss(self, flat, x, y):
        loss = F.cross_entropy(self._forward(flat, x), y)
        return loss, loss

    def _pieces(self, flats):
        """Each parameter of W flat vectors (W, numel) as a (W, *shape) view."""
        return [piece.view(-1, *shape) for piece, shape in
                zip(flats.split(self.sizes, dim=1), self.shapes)]

    def _dense_forward(self, pieces, x):
        """Logits (W, batch, classes) of W models given as their parameters `pieces`
        ((W, *shape) each, in order) on x (W, batch, ...)."""
        pieces = iter(pieces)
        h = x
        for layer in self.layers:
            if isinstance(layer, nn.Flatten):
                h = h.flatten(2)
            elif isinstance(layer, nn.ReLU):
                h = h.relu()
            else:
                h = torch.bmm(h, next(pieces).transpose(1, 2))
                if layer.bias is not None:
                    h = h + next(pieces).unsqueeze(1)
        return h

    def gradients(self, parameters, rows, x, y, out):
        """Into out[rows]: the gradients of the flat vectors parameters[rows] (W of the
        (N, numel)), each on its own batch x[w], y[w]; returns their losses (W,).

        Dense layers take their parameters as leaves of their own shape (views of
        the gathered rows): a weight's gradient comes back as the transpose of a
        matrix product, and goes to its rows of `out` in one strided copy (one
        flat leaf would cost a contiguous copy of it and a concatenation more)."""
        if self.layers is None:
            gradients, losses = self._gradients(parameters[rows], x, y)
            out[rows] = gradients
            return losses
        with torch.enable_grad():
            leaves = [piece.detach().requires_grad_() for piece in self._pieces(parameters[rows])]
            logits = self._dense_forward(leaves, x)
            losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
            gradients = torch.autograd.grad(losses.sum(), leaves)
        for start, size, shape, gradient in zip(self.starts, self.sizes, self.shapes, gradients):
            out.narrow(1, start, size).view(-1, *shape).index_copy_(0, rows, gradient)
        return losses.detach()

    @torch.no_grad()
    def loss_and_correct(self, flats, x, y, batch_size):
        """Summed cross-entropy and correct predictions of each of W flat vectors on (x, y)."""
        loss = torch.zeros(len(flats), dtype=torch.float64)
        correct = torch.zeros(len(flats), dtype=torch.int64)
        for start in range(0, len(y), batch_size):
            part = x[start:start + batch_size]
            logits = (self._logits(flats, part) if self.layers is None else       # (W, b, classes)
                      self._dense_forward(self._pieces(flats),
                                          part.expand(len(flats), *part.shape)))
            target = y[start:start + batch_size].expand(len(flats), -1)
            loss += F.cross_entropy(logits.transpose(1, 2), target,
                                    reduction="none").sum(1).double()
            correct += (logits.argmax(2) == target).sum(1)
        return loss, correct


def _dense_layers(module):
    """The layers of a Sequential of Flatten (whole sample), Linear and ReLU only, or None."""
    layers = list(module) if isinstance(module, nn.Sequential) else []
    dense = all(isinstance(layer, (nn.Linear, nn.ReLU)) or
                (isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) == (1, -1))
                for layer in layers)
    return layers if layers and dense else None


@torch.no_grad()
def sgd_step(x, gradient, buffer, lr, optim):
    """torch.optim.SGD's step (its single-tensor path, dampening 0) on one worker's row
    x, in the same operations, so the same bits, without the optimizer's per-call
    overhead (most of a worker step's cost at many workers). Returns the momentum
    buffer, None until the first step with momentum."""
    if optim.weight_decay:
        gradient = gradient.add(x, alpha=optim.weight_decay)
    if optim.momentum:
        if buffer is None:
            buffer = torch.clone(gradient).detach()
        else:
            buffer.mul_(optim.momentum).add_(gradient)
        gradient = gradient.add(buffer, alpha=optim.momentum) if optim.nesterov else buffer
    x.add_(gradient, alpha=-lr)
    return buffer


class Worker:
    """One virtual worker: its row of the parameters, optimizer, policy, window, clocks."""

    def __init__(self, rank, policy, straggler, loader, x, gradient, optim, dtype, log,
                 emulator=None):
        self.rank, self.policy, self.straggler, self.loader = rank, policy, straggler, loader
        self.emulator = emulator  # the trainer's EmulatedAccelerator for this rank, or None
        self.x = x
        self.gradient = gradient  # a row of VirtualCluster.gradients, filled batched
        self.optim, self.momentum_buffer = optim, None
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


class VirtualCluster:
    """The workers of one job on the virtual clock (see the module doc).

    run() trains them until the schedule announces the stop, calling
    evaluate(number, now) at each evaluation it announces (it returns the
    accuracy for the progress line). `parameters` holds every worker's x (row
    i: worker i, all x_0 at the start), `workers[i]` worker i's counters.
    """

    def __init__(self, graph, policies, stragglers, loaders, stacked, x0, optim, batch_size,
                 timing, schedule, learning_rate, logs, progress, evaluate, emulators=None):
        n = graph.n
        self.graph, self.n, self.stacked, self.optim = graph, n, stacked, optim
        self.batch_size, self.timing, self.schedule = batch_size, timing, schedule
        self.learning_rate, self.progress, self.evaluate = learning_rate, progress, evaluate
        self.lockstep = not policies[0].uses_mailbox
        self.poll_seconds = POLL_FRACTION * timing.step_seconds
        # Every worker's x is a row of one tensor (the same x_0 on all, as the
        # broadcast gives), its gradient a row of another.
        self.parameters = x0.repeat(n, 1)
        self.gradients = torch.zeros_like(self.parameters)
        self.losses = np.zeros(n)
        # Every worker's shard is a slice of one tensor, so that a chunk's batches
        # are one gather (the loaders read the same samples through views).
        self.shards_x = torch.cat([loader.x for loader in loaders])
        self.shards_y = torch.cat([loader.y for loader in loaders])
        sizes = torch.tensor([loader.size for loader in loaders])
        self.shard_starts = torch.cumsum(sizes, 0) - sizes
        for loader, start in zip(loaders, self.shard_starts.tolist()):
            loader.x = self.shards_x[start:start + loader.size]
            loader.y = self.shards_y[start:start + loader.size]
        dtype = header_dtype(n)
        emulators = emulators or [None] * n
        self.workers = [Worker(i, policies[i], stragglers[i], loaders[i], self.parameters[i],
                               self.gradients[i], optim, dtype, logs[i], emulators[i])
                        for i in range(n)]
        # Where sender j sits in target t's window: index_in[j][t].
        self.index_in = [{} for _ in range(n)]
        for target in range(n):
            for index, sender in enumerate(graph.in_neighbours(target)):
                self.index_in[sender][target] = index

        self.events, self._order = [], itertools.count()
        self.pending = []                 # workers owing the gradient of their iteration
        self.samples = 0
        self.word = 0                     # the announced events (aau_mpi.algorithms.schedule's word)
        self.stopped = False
        self.unfinished = n
        self.last_activity = 0.0
        self.last_loss, self.last_accuracy = math.nan, None

    def run(self):
        """Train until the schedule announces the stop."""
        if self.lockstep:
            self._run_lockstep()
        else:
            self._run_mailbox()
        self.progress.update(self.samples, self.seconds(), self.last_loss, self.last_accuracy,
                             force=True)

    def seconds(self):
        """The virtual time when the last worker finished."""
        return max((w.finish_time for w in self.workers), default=0.0)

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
            elif kind == STEPPED:
                self._stepped(worker, at, data)
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
        self._compute_time(worker, now)
        self._push(now + worker.compute, COMPUTED, worker)

    def _compute_time(self, worker, now):
        """worker.compute (and .delay, the straggler's share of it) for an iteration
        that starts at `now`."""
        step = self.timing.step_seconds
        if worker.emulator is not None:
            worker.compute = worker.emulator.modelled_seconds(worker.straggler, now)
            worker.delay = worker.compute - step
        else:
            worker.delay = worker.straggler.delay(step, now + step)
            worker.compute = step + worker.delay

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
        x.mul_(selection.self_weight)  # in place: every payload is a copy, never x
        used, averaged, staleness = [], [], []
        window = worker.headers.copy() if selection.slots else None  # the headers mixed
        for (index, slot), weight in zip(selection.slots, selection.weights):
            x.add_(worker.payloads[index][slot], alpha=weight)
            record = window[index, slot]
            used.append((index, slot, record))
            averaged.append(worker.in_neighbours[index])
            staleness.append(k - int(record["iteration"]))
        worker.policy.mixed(used, k)
        scale = worker.policy.step_scale()
        self._local_step(worker, scale)
        done = (worker.selected_at - worker.computed_at, now - worker.selected_at, averaged,
                staleness, scale)
        if self.timing.overhead_seconds:
            self._push(now + self.timing.overhead_seconds, STEPPED, worker, done)
        else:
            self._stepped(worker, now, done)

    def _stepped(self, worker, now, done):
        """The iteration's overhead has passed: count it, serve events, go on or stop."""
        self._count(worker, now, *done)
        self._announce(now)
        if self.stopped:
            self._stop(worker, now)
        else:
            self._start_iteration(worker, now)

    def _run_lockstep(self):
        """The allreduce policy: all compute, the slowest sets the pace, then a ring
        allreduce of the gradients and the same step everywhere."""
        now = 0.0
        allreduce = self.timing.allreduce_seconds(self.n) + self.timing.overhead_seconds
        while not self.stopped:
            lr = self.learning_rate(self.schedule.progress(self.samples, now))
            for worker in self.workers:
                worker.lr, worker.needs_gradient = lr, True
                self._compute_time(worker, now)
                worker.policy.computed(worker.compute)
            self.pending = list(self.workers)
            self._compute_gradients()
            end = now + max(w.compute for w in self.workers) + allreduce
            # Every worker holds the same x and lr and steps with the mean gradient:
            # one step, copied to all.
            self.gradients[0] = self.gradients.sum(0) / self.n
            self._local_step(self.workers[0], 1.0)
            self.parameters[1:] = self.parameters[0]
            for worker in self.workers:
                self._count(worker, end, end - now - worker.compute - self.timing.overhead_seconds,
                            0.0, [], [], 1.0)
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
            batch = torch.cat([w.loader.next_positions() for w in chunk])
            batch += self.shard_starts[rows].repeat_interleave(self.batch_size)
            shape = (len(chunk), self.batch_size)
            losses = self.stacked.gradients(
                self.parameters, rows, self.shards_x[batch].view(*shape, *self.shards_x.shape[1:]),
                self.shards_y[batch].view(shape), out=self.gradients)
            self.losses[rows.numpy()] = losses.numpy()
        for worker in owing:
            worker.needs_gradient = False
            if not math.isfinite(self.losses[worker.rank]):
                raise UserError(f"training diverged: loss is {self.losses[worker.rank]} at "
                                f"iteration {worker.k} on worker {worker.rank}: lower optim.lr "
                                f"(now {self.optim.lr:g}) or add optim.warmup")

    def _local_step(self, worker, scale):
        worker.momentum_buffer = sgd_step(worker.x, worker.gradient, worker.momentum_buffer,
                                          worker.lr * scale, self.optim)

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
                delay=worker.delay, overran=False, averaged=averaged, staleness=staleness,
                step_scale=scale)
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

    def _announce(self, now):
        """Whatever aau_mpi.algorithms.schedule says is due now: evaluations, or the stop."""
        while (word := self.schedule.next_word(self.word, 0, self.samples, now)) is not None:
            self.word = word
            count, stop = events_announced(word)
            if stop:
                self.stopped = True
            else:
                self.last_accuracy = self.evaluate(count, now)
