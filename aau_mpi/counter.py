"""A job-wide counter that any rank adds to one-sidedly (the global sample budget).

The count lives in an 8-byte window on rank 0. `add` is one `Fetch_and_op`:
an atomic read-modify-write at the target that completes without rank 0
making an MPI call (passive progress, as for the mailbox), inside a
`Lock_all` epoch opened collectively for the counter's life.
"""

import numpy as np
from mpi4py import MPI


class SharedCounter:
    def __init__(self, comm):
        self.comm = comm
        self.win = MPI.Win.Allocate(8 if comm.Get_rank() == 0 else 0, disp_unit=8, comm=comm)
        if comm.Get_rank() == 0:
            np.frombuffer(self.win.tomemory(), np.int64)[:] = 0
        self._add = np.zeros(1, np.int64)
        self._old = np.zeros(1, np.int64)
        comm.Barrier()  # zeroed before anyone adds
        self.win.Lock_all()
        comm.Barrier()

    def add(self, amount):
        """Add `amount`; return the total before this addition."""
        self._add[0] = amount
        self.win.Fetch_and_op([self._add, 1, MPI.INT64_T], [self._old, 1, MPI.INT64_T],
                              0, 0, MPI.SUM)
        self.win.Flush(0)
        return int(self._old[0])

    def close(self):
        """Collective."""
        self.win.Unlock_all()
        self.win.Free()
