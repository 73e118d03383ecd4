"""Checkpoints of a decentralized job, without stopping the world.

Each rank writes its own state (the DecentralizedOptimizer's `state_dict()`:
its model, the wrapped optimizer's state, the policy's, the straggler's,
the progress counters, plus whatever `extra_state()` adds, such as a data
loader's position) when its own schedule says so, as its next *generation*
(aau_mpi.decentralized.checkpoint: one HDF5 file per rank per generation, atomic). It then
records the generation in the control window on rank 0; the rank whose
write completes a generation (the last one, which sees every rank at that
generation) commits it by writing the manifest. No rank waits for another,
and committing costs the committer one small file: the ranks' reports
through the control window say that their files are complete (each is
renamed into place before it is reported), and every array's crc32 is
checked when a checkpoint is read. Old generations are deleted on a
background thread.

A resumed run numbers its new generations after the largest generation
directory present, complete or not, so it never writes into a generation
of the timeline it abandoned (resuming from gen 3 while gen 5 exists
writes gen 6 next).

A checkpoint of N ranks resumes on another number M (`restore_resized`):
every new rank starts from the average of the N saved models, the consensus
point the job converges to (a rank-to-rank mapping would give some new
ranks the same model and others none); see docs/checkpoints.md, "Resuming
on another number of ranks".
"""

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from aau_mpi.decentralized import checkpoint
from aau_mpi.base import checks
from aau_mpi.base.errors import UserError


def encode(value, arrays, path="state"):
    """A JSON-able form of `value` whose tensors and arrays move into `arrays` by name.

    Dict keys keep their type (torch optimizers key their state by int), and a
    tensor comes back as a tensor, an ndarray as an ndarray.
    """
    if isinstance(value, torch.Tensor):
        arrays[path] = value.detach().cpu().numpy()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {"__ndarray__": path}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: encode(item, arrays, f"{path}.{key}") for key, item in value.items()}
        return {"__items__": [[encode(key, arrays, f"{path}.key{n}"),
                               encode(item, arrays, f"{path}.{n}")]
                              for n, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [encode(item, arrays, f"{path}.{n}") for n, item in enumerate(value)]
    return value


def decode(value, arrays):
    """The inverse of `encode`."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.from_numpy(np.array(arrays[value["__tensor__"]]))
        if "__ndarray__" in value:
            return arrays[value["__ndarray__"]]
        if "__items__" in value:
            return {decode(key, arrays): decode(item, arrays) for key, item in value["__items__"]}
        return {key: decode(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [decode(item, arrays) for item in value]
    return value


def saved_state(manifest, rank):
    """Saved rank `rank`'s state_dict() (its extra state under "extra"), every array crc32-checked."""
    arrays, info = checkpoint.read_rank_state(manifest, rank)
    return {**decode(info, arrays), "parameters": arrays["params"]}


def optimizer_layout(optimizer_state):
    """A torch optimizer's state_dict() split for averaging: its tensors as
    [(parameter key, name, shape, dtype)] (SGD's momentum buffers, Adam's
    moments), and the rest (param_groups and any non-tensor entry)."""
    tensors, rest = [], {"state": {}, "param_groups": optimizer_state["param_groups"]}
    for key, entry in optimizer_state["state"].items():
        rest["state"][key] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors.append((key, name, tuple(value.shape), value.dtype))
            else:
                rest["state"][key][name] = value
    return tensors, rest


@dataclass
class SavedTotals:
    """Saved ranks' states summed, to resume them on another number of ranks:
    each new rank adds the files it reads, `reduce` makes the job-wide totals."""
    vector: np.ndarray          # float64: the models, then the layout's optimizer tensors
    with_optimizer: int = 0     # states whose optimizer holds exactly the layout's tensors
    own_samples: int = 0        # summed
    iteration: int = 0          # the largest (as are the next two)
    training_seconds: float = 0.0
    evaluations: int = 0

    REDUCTIONS = (("with_optimizer", MPI.SUM), ("own_samples", MPI.SUM),
                  ("iteration", MPI.MAX), ("training_seconds", MPI.MAX),
                  ("evaluations", MPI.MAX))

    @classmethod
    def read(cls, manifest, rank, size, numel, layout, first=None):
        """New rank `rank` of `size`'s part: saved files rank, rank+size, rank+2*size, ...
        (`first`: saved rank 0's state, when already read)."""
        totals = cls(np.zeros(numel + sum(math.prod(shape) for _, _, shape, _ in layout)))
        for number in range(rank, manifest.world_size, size):
            totals.add(first if number == 0 and first is not None
                       else saved_state(manifest, number), layout)
        return totals

    def add(self, state, layout):
        params = state["parameters"]
        self.vector[:params.size] += params
        if optimizer_layout(state["optimizer"])[0] == layout:
            offset, tensors = params.size, state["optimizer"]["state"]
            for key, name, shape, _ in layout:
                size = math.prod(shape)
                self.vector[offset:offset + size] += tensors[key][name].numpy().ravel()
                offset += size
            self.with_optimizer += 1
        self.own_samples += int(state["own_samples"])
        self.iteration = max(self.iteration, int(state["iteration"]))
        self.training_seconds = max(self.training_seconds, float(state["training_seconds"]))
        self.evaluations = max(self.evaluations, int(state["evaluations"]))

    def reduce(self, comm):
        """Collective: the totals over every new rank's part."""
        comm.Allreduce(MPI.IN_PLACE, self.vector)
        for name, op in self.REDUCTIONS:
            setattr(self, name, comm.allreduce(getattr(self, name), op=op))

    def averaged_state(self, saved, layout, rest, rank, size, fresh):
        """The state_dict() of new rank `rank` of `size`, from the totals of `saved`
        ranks: the average model; the average optimizer tensors when every saved
        rank had the layout's, else `fresh`'s optimizer (the rank's as built), as
        its policy and straggler always are; the largest iteration, training
        time and evaluation number; the saved sample total split so that the
        new ranks' sum is that total (the remainder on rank 0)."""
        average = self.vector / saved
        numel = average.size - sum(math.prod(shape) for _, _, shape, _ in layout)
        optimizer = fresh["optimizer"]
        if self.with_optimizer == saved:
            optimizer = {"state": {key: dict(entry) for key, entry in rest["state"].items()},
                         "param_groups": rest["param_groups"]}
            offset = numel
            for key, name, shape, dtype in layout:
                count = math.prod(shape)
                optimizer["state"][key][name] = torch.from_numpy(
                    average[offset:offset + count].reshape(shape)).to(dtype)
                offset += count
        share, remainder = divmod(self.own_samples, size)
        return {"parameters": torch.from_numpy(average[:numel]), "optimizer": optimizer,
                "policy": fresh["policy"], "straggler": fresh["straggler"],
                "iteration": self.iteration,
                "own_samples": share + (remainder if rank == 0 else 0),
                "training_seconds": self.training_seconds, "evaluations": self.evaluations}


class Checkpointer:
    """HDF5 checkpoints of every rank of a DecentralizedOptimizer (pass it as `checkpoints=`).

    folder:           where the generations go (<folder>/gen-NNNNNN/).
    every_seconds:    write when this many training seconds passed since the last one.
    every_iterations: ... or this many of the rank's own iterations.
    keep:             complete generations kept.
    extra_state:      callable -> dict (tensors, arrays, JSON values) saved with each
                      rank's state and returned by `restore`.
    config_yaml, meta: stored in each manifest; a resume must match `meta`.
    """

    def __init__(self, folder, *, every_seconds=None, every_iterations=None, keep=2,
                 extra_state=None, config_yaml="", meta=None):
        self.root = Path(folder)
        self.every_seconds = None if every_seconds is None else checks.number(
            "checkpoint.every_seconds", every_seconds, above=0)
        self.every_iterations = None if every_iterations is None else checks.integer(
            "checkpoint.every_iterations", every_iterations, 1)
        self.keep = checks.integer("checkpoint.keep", keep, 1)
        self.extra_state = extra_state
        self.config_yaml, self.meta = config_yaml, meta or {}
        self.generation = 0       # this rank's newest generation
        self.committed = 0        # the newest generation this rank committed or resumed
        self.opt = None
        self.resized = None       # after a restore onto another number of ranks: what was done
        self._pruning = None

    def attach(self, opt):
        """Called by the optimizer it is given to."""
        self.opt = opt
        self._schedule_next()

    def _schedule_next(self):
        self._next_time = self.opt.training_seconds() + (self.every_seconds or math.inf)
        self._next_iteration = self.opt.iteration + (self.every_iterations or 0)

    def reconnect(self):
        """Collective among the survivors of a lost rank: go on numbering generations
        after every survivor's newest (they report to a new control window)."""
        self.generation = self.committed = self.opt.comm.allreduce(self.generation, op=MPI.MAX)

    def due(self):
        return ((self.every_seconds is not None
                 and self.opt.training_seconds() >= self._next_time)
                or (self.every_iterations is not None
                    and self.opt.iteration >= self._next_iteration))

    def hint(self):
        return f"the last complete checkpoint is kept under {self.root}"

    def write(self, final=False):
        """Write this rank's state as its next generation; commit it if every rank has.

        final=True is collective (the end of training): ranks that wrote a
        periodic generation the others did not reach are a generation ahead,
        so the final one is numbered past them all.
        """
        opt = self.opt
        state = opt.state_dict()
        # Only what is trained and mixed can diverge: a causal mask is -inf.
        if not torch.isfinite(state["parameters"][:opt.params.shared_numel]).all():
            raise UserError(f"training diverged: rank {opt.rank}'s parameters hold NaN or inf "
                            f"at iteration {opt.iteration}: lower the learning rate; "
                            f"{self.hint()}")
        if final:
            self.generation = opt.comm.allreduce(self.generation, op=MPI.MAX) + 1
        else:
            self.generation += 1
        arrays = {"params": state.pop("parameters").cpu().numpy()}
        extra = self.extra_state() if self.extra_state else {}
        info = encode({**state, "extra": extra}, arrays)
        checkpoint.write_rank_state(self.root, self.generation, opt.rank, opt.size, arrays, info)
        everyone = opt.events.control.checkpointed(self.generation)
        if everyone >= self.generation > self.committed:
            self._commit(self.generation, wait=final)
        self._schedule_next()

    def _commit(self, generation, wait):
        checkpoint.commit_generation(self.root, generation, self.opt.size, self.config_yaml,
                                     self.meta, keep=self.keep, prune_old=False)
        self.committed = generation
        self.settle()
        self._pruning = threading.Thread(target=checkpoint.prune,
                                         args=(self.root, generation, self.keep), daemon=True)
        self._pruning.start()
        if wait:
            self.settle()

    def settle(self):
        """Wait for the pruning of older generations still running: at the end of a job,
        which may end without a final write (a diverged average), nothing may still
        be deleting in the checkpoints folder."""
        if self._pruning is not None:
            self._pruning.join()

    def restore(self, source):
        """Collective: load every rank's state from the newest complete generation
        under `source` (a run folder, checkpoints folder, gen folder or manifest);
        returns (this rank's extra state, the manifest). A checkpoint of another
        number of ranks goes to `restore_resized`; the extra state is then None
        (it described the old ranks) and `resized` says what was done."""
        opt = self.opt
        manifest = checkpoint.read_manifest(checkpoint.find_checkpoint(source))
        checkpoint.check_compatible(manifest, self.meta)
        extra = None
        if manifest.world_size != opt.size:
            self.restore_resized(manifest)
        else:
            state = saved_state(manifest, opt.rank)
            extra = state.pop("extra")
            opt.load_state_dict({**state, "parameters": torch.from_numpy(state["parameters"])})
        newest = max((number for number, _ in checkpoint.generations(self.root)),
                     default=manifest.generation)
        self.generation = self.committed = opt.comm.allreduce(newest, op=MPI.MAX)
        self._schedule_next()
        return extra, manifest

    def restore_resized(self, manifest):
        """Collective: continue a checkpoint of N ranks on this job's M ranks.

        Every rank starts from the average of the N saved models, the consensus
        point the job converges to, and from the average of their optimizer
        tensors (momentum) when every saved rank has the same ones, else from
        its optimizer as built; policy and straggler state start afresh (they
        describe neighbours and per-rank random streams that do not map). See
        `SavedTotals.averaged_state` for the counters. Rank r reads saved files
        r, r+M, r+2M, ...: no rank reads all N, the partial sums meet in one
        Allreduce. Sets `resized`, one line saying what was done.
        """
        opt, saved = self.opt, manifest.world_size
        first = saved_state(manifest, 0) if opt.rank == 0 else None
        (layout, rest), parameters_layout = opt.comm.bcast(
            (optimizer_layout(first["optimizer"]), first.get("parameters_layout", 1))
            if first is not None else None, root=0)
        totals = SavedTotals.read(manifest, opt.rank, opt.size, opt.params.numel, layout, first)
        totals.reduce(opt.comm)
        fresh = {"optimizer": opt.optimizer.state_dict(), "policy": opt.policy.state_dict(),
                 "straggler": opt.straggler.state_dict()}
        opt.load_state_dict({**totals.averaged_state(saved, layout, rest, opt.rank, opt.size,
                                                     fresh),
                             "parameters_layout": parameters_layout})
        if totals.with_optimizer != saved:
            momentum = (f"; optimizer state reset ({saved - totals.with_optimizer} of the "
                        f"{saved} saved ranks' differed from rank 0's)")
        else:
            momentum = "; optimizer state (momentum) averaged" if layout else ""
        self.resized = (f"resuming {saved} ranks' checkpoint {manifest.path.parent.name} on "
                        f"{opt.size} ranks: every rank starts from the average of the {saved} "
                        f"models{momentum}; policy and straggler state reset")
