"""A small real job over the mailbox: wait-free gossip averaging on a ring.

    mpiexec -n 4 python -m aau_mpi.demo

Every rank starts from a different vector, deposits it into its ring
neighbours without waiting, and averages in whatever its neighbours have
deposited so far. Ranks run at different speeds (rank r sleeps r ms per
round), so they do different numbers of rounds, yet all converge to the same
vector (not exactly the initial mean: wait-free averaging with ranks at
different speeds does not conserve it; push-sum would). Rank 0 prints what
happened.
"""

import time

import numpy as np

from aau_mpi.mailbox import Mailbox
from aau_mpi.world import init_world, install_abort_hook

ROUNDS = 200
FLOATS = 100_000


def main():
    world = init_world()
    install_abort_hook(world.comm)
    n, rank = world.size, world.rank
    neighbours = sorted({(rank - 1) % n, (rank + 1) % n} - {rank})
    x = np.full(FLOATS, float(rank), np.float32)
    used = 0
    buffer = np.empty(FLOATS, np.float32)
    with Mailbox(world.comm, neighbours, neighbours, FLOATS, clock=world.clock) as mailbox:
        start = world.clock()
        for k in range(ROUNDS):
            mailbox.deposit(x, iteration=k, done=k == ROUNDS - 1)
            time.sleep(0.001 * rank)  # a slower rank, to show nobody waits
            total, count = x.astype(np.float64), 1
            for j in range(len(neighbours)):
                got = mailbox.read(j, out=buffer)
                if got is not None and got[0]["seq"] > 0:
                    total, count = total + buffer, count + 1
                    used += 1
            x = (total / count).astype(np.float32)
        elapsed = world.clock() - start
        world.comm.Barrier()  # all deposits are in: headers are final
        headers = mailbox.headers()[:, 0]
    mean = world.comm.allreduce(x.astype(np.float64)) / n
    report = world.comm.gather((rank, neighbours, float(np.abs(x - mean).max()), used,
                                [int(s) for s in headers["seq"]], elapsed), root=0)
    if rank == 0:
        print(f"gossip averaging over the mailbox: {n} ranks on a ring, "
              f"{FLOATS} floats per deposit, {ROUNDS} rounds each, rank r sleeps r ms per round")
        print(f"{'rank':>4} {'neighbours':>11} {'deposits seen':>14} {'copies averaged':>16} "
              f"{'max |x - x_avg|':>16} {'seconds':>8}")
        for r, nbrs, err, copies, seqs, secs in report:
            print(f"{r:>4} {str(nbrs):>11} {str(seqs):>14} {copies:>16} {err:>16.2e} {secs:>8.2f}")
        worst = max(row[2] for row in report)
        print(f"consensus {'reached' if worst < 1e-3 else 'NOT reached'}: all ranks within "
              f"{worst:.1e} of their average {mean[0]:.3f} (the start values averaged "
              f"{(n - 1) / 2:.3f})")


if __name__ == "__main__":
    main()
