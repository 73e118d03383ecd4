"""Checkpoints of a decentralized job, without stopping the world.

Each rank writes its own state (the DecentralizedOptimizer's `state_dict()`:
its model, the wrapped optimizer's state, the policy's, the straggler's,
the progress counters, plus whatever `extra_state()` adds, such as a data
loader's position) when its own schedule says so, as its next *generation*
(aau_mpi.checkpoint: one HDF5 file per rank per generation, atomic). It then
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
"""

import math
import threading
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from aau_mpi import checkpoint, checks
from aau_mpi.errors import UserError


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
        if not torch.isfinite(state["parameters"]).all():
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
        if self._pruning is not None:
            self._pruning.join()
        self._pruning = threading.Thread(target=checkpoint.prune,
                                         args=(self.root, generation, self.keep), daemon=True)
        self._pruning.start()
        if wait:
            self._pruning.join()

    def restore(self, source):
        """Collective: load every rank's state from the newest complete generation
        under `source` (a run folder, checkpoints folder, gen folder or manifest);
        returns this rank's extra state."""
        opt = self.opt
        manifest = checkpoint.read_manifest(checkpoint.find_checkpoint(source))
        checkpoint.check_compatible(manifest, opt.size, self.meta)
        arrays, info = checkpoint.read_rank_state(manifest, opt.rank)
        state = decode(info, arrays)
        extra = state.pop("extra")
        opt.load_state_dict({**state, "parameters": torch.from_numpy(arrays["params"])})
        newest = max((number for number, _ in checkpoint.generations(self.root)),
                     default=manifest.generation)
        self.generation = self.committed = opt.comm.allreduce(newest, op=MPI.MAX)
        self._schedule_next()
        return extra, manifest
