"""The detector aau_mpi.comm.survivors uses: a receive from ANY_SOURCE that nobody sends to.

    mpirun --with-ft ulfm -n 4 python bench/ulfm/probe_anysource.py

Rank 2 SIGKILLs itself 1 s after a barrier; every other rank tests its pending
receive every millisecond and prints when (and with which error class) it
failed, then revokes, shrinks and runs an Allreduce on the survivors.
Observed here (Open MPI 5.0.11, 2 loaded cores): MPI_ERR_PROC_FAILED_PENDING
0.3-0.4 s after the death on every survivor; Shrink to 3 ranks and the
Allreduce work.
"""

import os
import signal
import time

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD
rank = world.rank
detector = world.Dup()
detector.Set_errhandler(MPI.ERRORS_RETURN)  # fail the call, not the job
request = detector.Irecv(bytearray(1), source=MPI.ANY_SOURCE, tag=77)
world.Barrier()
start = time.time()
if rank == 2:
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
seen = "nothing within 6 s"
while time.time() - start < 6:
    try:
        if request.Test():
            seen = "completed (unexpected: nobody sends)"
            break
    except MPI.Exception as error:
        seen = (f"error class {error.Get_error_class()} "
                f"({MPI.Get_error_string(error.Get_error_code())[:50]}) "
                f"{time.time() - start - 1.0:.3f} s after the death")
        break
    time.sleep(0.001)
print(rank, "detector:", seen, flush=True)
detector.Revoke()
world.Set_errhandler(MPI.ERRORS_RETURN)
world.Revoke()
survivors = world.Shrink()
total = np.zeros(1)
survivors.Allreduce(np.ones(1), total)
print(rank, f"shrunk to {survivors.Get_size()} ranks (now rank {survivors.Get_rank()}), "
      f"allreduce {total[0]:.0f}", flush=True)
