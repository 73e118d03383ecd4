"""Partitions of the training set over ranks, and the loader of one rank's shard.

Every rank computes the same partition (it depends only on the labels and the
seed, never on the rank) and trains on its own part through a ShardLoader.
"""

import numpy as np
import torch

from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import Registry

PARTITIONS = Registry("partition scheme")


# ---------------------------------------------------------------- partitions

def partition(labels, num_parts, scheme="iid", *, seed=0, **params):
    """Split sample indices 0..N-1 into `num_parts` disjoint, non-empty, covering parts.

    Schemes (PARTITIONS): 'iid' (shuffle, near-equal sizes); 'dirichlet'
    (alpha=0.5: each class's samples split over the parts by proportions drawn
    from Dirichlet(alpha); smaller alpha = more skewed); 'shards'
    (classes_per_part=2: sort by class, cut into num_parts * classes_per_part
    shards, deal classes_per_part shards to each part).

    The result depends only on the labels, the scheme, its params and the seed,
    so every rank computes the same partition and takes parts[rank].
    Returns a list of sorted int64 index arrays.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"partition needs a 1-D label array, got shape {labels.shape}: "
                        f"pass the training labels")
    num_parts = checks.integer("num_parts", num_parts, 1)
    if len(labels) < num_parts:
        raise UserError(f"cannot split {len(labels)} samples into {num_parts} non-empty "
                        f"parts: use fewer ranks or a larger dataset")
    rng = np.random.default_rng(seed)
    parts = PARTITIONS.build(scheme, params, labels, num_parts, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


@PARTITIONS.register("iid")
def partition_iid(labels, num_parts, rng):
    return np.array_split(rng.permutation(len(labels)), num_parts)


@PARTITIONS.register("dirichlet")
def partition_dirichlet(labels, num_parts, rng, alpha=0.5):
    alpha = checks.number("alpha", alpha, above=0)
    parts = [[] for _ in range(num_parts)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_parts, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for part, piece in zip(parts, np.split(members, cuts)):
            part.append(piece)
    parts = [np.concatenate(pieces) for pieces in parts]
    # Small alpha leaves some parts empty: give each one sample from the largest part.
    for empty in [i for i, part in enumerate(parts) if len(part) == 0]:
        largest = max(range(num_parts), key=lambda i: len(parts[i]))
        parts[empty], parts[largest] = parts[largest][-1:], parts[largest][:-1]
    return parts


@PARTITIONS.register("shards")
def partition_shards(labels, num_parts, rng, classes_per_part=2):
    classes_per_part = checks.integer("classes_per_part", classes_per_part, 1)
    num_shards = num_parts * classes_per_part
    if len(labels) < num_shards:
        raise UserError(f"cannot cut {len(labels)} samples into {num_shards} shards "
                        f"({num_parts} parts x classes_per_part={classes_per_part}): "
                        f"lower classes_per_part, use fewer ranks or more samples")
    shuffled = rng.permutation(len(labels))  # random order within each class
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_class, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_parts, classes_per_part)
    return [np.concatenate([shards[s] for s in shard_ids]) for shard_ids in dealt]


# ------------------------------------------------------------- shard loader

class ShardLoader:
    """An endless stream of seeded mini-batches over one rank's shard.

    Each epoch visits the shard in a fresh permutation drawn from (seed, epoch),
    so the position {seed, epoch, offset} is the whole state: state_dict() /
    load_state_dict() resume the exact same batch sequence. A batch that runs
    past the end of an epoch continues into the next one, so every batch has
    batch_size samples (even when the shard is smaller than a batch).
    """

    def __init__(self, x, y, batch_size, *, seed=0):
        if len(x) != len(y) or len(x) == 0:
            raise UserError(f"shard has {len(x)} samples and {len(y)} labels: "
                            f"give every rank a non-empty part")
        self.x, self.y = x, y
        self.size = len(x)
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.seed = int(seed)
        self.epoch, self.offset = 0, 0
        self._order, self._order_epoch = None, None

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            self._order = torch.from_numpy(order).to(self.x.device)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.next_positions()
        return self.x[batch], self.y[batch]

    def next_positions(self):
        """The next batch's positions in the shard (what __next__ gathers); advances."""
        pieces, needed = [], self.batch_size
        while needed:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
            take = min(needed, self.size - self.offset)
            pieces.append(self._epoch_order()[self.offset:self.offset + take])
            self.offset += take
            needed -= take
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset,
                "size": self.size}

    def load_state_dict(self, state):
        if int(state["size"]) != self.size:
            raise UserError(f"loader state is for a shard of {int(state['size'])} samples, "
                            f"this shard has {self.size}: resume with the same dataset, "
                            f"partition and number of ranks")
        self.seed, self.epoch, self.offset = (int(state[key])
                                              for key in ("seed", "epoch", "offset"))


def shard_loader(x, y, indices, batch_size, *, seed=0, device=None):
    """A ShardLoader over samples x[indices], y[indices], gathered once and moved to
    `device` (default: where x is): only the shard goes there, never the whole set.

    Give each rank its own seed (e.g. seed + rank) so that ranks shuffle differently.
    """
    indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64, device=x.device)
    device = x.device if device is None else device
    return ShardLoader(x[indices].to(device), y[indices].to(device), batch_size, seed=seed)
