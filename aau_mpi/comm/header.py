"""The mailbox slot header record (layout documented in `aau_mpi.comm.mailbox`).

Pure numpy, no MPI: policies read snapshots of these records, and their unit
tests build synthetic ones with `empty_headers`.
"""

import numpy as np

LAYOUT_VERSION = 2


def header_dtype(world_size):
    """The header record for a job of `world_size` ranks."""
    reach_words = max(1, -(-world_size // 64))
    return np.dtype([
        ("version", "<i8"),
        ("seq", "<i8"),
        ("iteration", "<i8"),
        ("time", "<f8"),
        ("done", "<i8"),
        ("weight", "<f8"),
        ("checksum", "<i8"),
        ("epoch", "<i8"),
        ("reach", "<u8", (reach_words,)),
    ])


def empty_headers(num_neighbours, slots_per_neighbour, world_size):
    """A zeroed header snapshot of the shape `Mailbox.headers` returns.

    For building synthetic snapshots (policy unit tests, simulations).
    """
    return np.zeros((num_neighbours, slots_per_neighbour), dtype=header_dtype(world_size))
