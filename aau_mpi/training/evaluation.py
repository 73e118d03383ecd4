"""Evaluation: test loss and accuracy of the ranks' models and of their average.

`evaluate_job` is collective (spec section 6): every rank evaluates its own
model x_i on the test set (unless `rank_models` is False: that is N times the
work of the rest), the ranks average their parameters into x_bar (the
optimizer's `averaged()`) and measure the consensus distance
(1/N) sum_i ||x_i - x_bar||^2, and x_bar is evaluated with the test set split
across the ranks so that each evaluates 1/N of it. Rank 0 gets the record;
the other ranks get None.

The module does not import mpi4py (that would initialise MPI), so code that
is not an MPI job, such as the DDP reference, can use `loss_and_correct`.
"""

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def loss_and_correct(model, x, y, batch_size):
    """Summed cross-entropy and number of correct predictions over (x, y)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return loss, correct


def evaluate_job(opt, comm, x_test, y_test, batch_size, rank_models=True):
    """Collective. Returns rank 0's record dict (None elsewhere).

    `opt` is the rank's DecentralizedOptimizer: `opt.averaged()` loads x_bar
    into the model for its share of the test set and puts the rank's own
    parameters back after. `comm`: the communicator for the sums (any but
    the optimizer's own). `rank_models`: also evaluate each rank's own model
    (rank_accuracy, rank_loss in the record).
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    n = len(y_test)
    model = opt.model
    if rank_models:
        own_loss, own_correct = loss_and_correct(model, x_test, y_test, batch_size)
    with opt.averaged() as averaged:
        distance = float(torch.sum((averaged.own.to(opt.params.device)
                                    - opt.params.shared) ** 2))
        share = slice(rank, n, size)
        bar_loss, bar_correct = loss_and_correct(model, x_test[share], y_test[share], batch_size)
    local = np.array([bar_loss, bar_correct, distance], np.float64)
    sums = np.empty_like(local)
    comm.Allreduce(local, sums)
    per_rank = comm.gather((own_loss / n, own_correct / n), root=0) if rank_models else None
    if rank != 0:
        return None
    record = {"accuracy": sums[1] / n, "loss": sums[0] / n, "consensus_distance": sums[2] / size}
    if rank_models:
        record.update(rank_accuracy=[a for _, a in per_rank], rank_loss=[l for l, _ in per_rank])
    return record
