"""aau_mpi.decentralized.checkpointer without MPI: the state codec (what a rank's checkpoint keeps comes
back as it was), and the averaging that resumes N saved ranks on M."""

import json

import numpy as np
import pytest
import torch
from mpi4py import MPI

from aau_mpi.decentralized import checkpoint
from aau_mpi.decentralized import checkpointer
from aau_mpi.decentralized.checkpointer import SavedTotals, decode, encode


def test_optimizer_state_round_trips_with_int_keys_tensors_and_arrays():
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    adam.step()
    state = {"optimizer": adam.state_dict(), "policy": {"last_used": [1, 2], "interval": [None]},
             "rng": np.arange(5, dtype=np.uint32), "iteration": np.int64(7)}
    arrays = {}
    info = json.loads(json.dumps(encode(state, arrays)))  # what the HDF5 attribute holds
    back = decode(info, arrays)
    assert set(back["optimizer"]["state"]) == {0, 1}, "torch keys its state by int"
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"],
                       adam.state_dict()["state"][0]["exp_avg"])
    assert isinstance(back["rng"], np.ndarray) and back["iteration"] == 7
    assert back["policy"] == {"last_used": [1, 2], "interval": [None]}
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.01 and list(fresh.param_groups[0]["betas"]) == [0.8, 0.9]
    assert torch.equal(fresh.state_dict()["state"][1]["exp_avg_sq"],
                       adam.state_dict()["state"][1]["exp_avg_sq"])


SAVED = 5  # ranks of the saved job


def write_saved_job(root, momentum_on=range(SAVED)):
    """A committed generation of SAVED ranks, as Checkpointer.write leaves it: each
    rank its own model and SGD momentum (those in `momentum_on`), and counters."""
    torch.manual_seed(0)
    models = []
    for rank in range(SAVED):
        model = torch.nn.Linear(3, 2)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if rank in momentum_on else 0)
        model(torch.randn(4, 3)).sum().backward()
        sgd.step()
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        state = {"optimizer": sgd.state_dict(), "policy": {"last_used": [rank]}, "straggler": {},
                 "iteration": 40 + rank, "own_samples": 100 * rank + 7,
                 "training_seconds": 3.0 - rank / 10, "evaluations": 2 + rank % 2,
                 "extra": {"loader": {"offset": rank}}}
        arrays = {"params": params}
        info = encode(state, arrays)
        checkpoint.write_rank_state(root, 4, rank, SAVED, arrays, info)
        models.append((params, sgd.state_dict()))
    manifest = checkpoint.commit_generation(root, 4, SAVED, "", {})
    return checkpoint.read_manifest(manifest), models


def resume_on(manifest, size, numel, monkeypatch):
    """Every new rank's state_dict() and the saved files each read, as
    Checkpointer.restore_resized makes them; the Allreduce done by hand."""
    reads = {rank: [] for rank in range(size)}
    real = checkpointer.saved_state
    parts = []
    for rank in range(size):
        monkeypatch.setattr(checkpointer, "saved_state",
                            lambda m, n, rank=rank: reads[rank].append(n) or real(m, n))
        first = real(manifest, 0) if rank == 0 else None
        layout, rest = checkpointer.optimizer_layout(real(manifest, 0)["optimizer"])
        parts.append(SavedTotals.read(manifest, rank, size, numel, layout, first))
    totals = parts[0]
    totals.vector = sum(part.vector for part in parts)
    for name, op in SavedTotals.REDUCTIONS:
        combine = sum if op == MPI.SUM else max
        setattr(totals, name, combine(getattr(part, name) for part in parts))
    fresh = {"optimizer": {"state": {}, "param_groups": []}, "policy": "fresh", "straggler": "fresh"}
    return [totals.averaged_state(SAVED, layout, rest, rank, size, fresh)
            for rank in range(size)], reads


@pytest.mark.parametrize("size", [2, 3, 7])
def test_a_resize_averages_all_saved_ranks_read_in_pieces(tmp_path, monkeypatch, size):
    manifest, models = write_saved_job(tmp_path)
    numel = models[0][0].size
    states, reads = resume_on(manifest, size, numel, monkeypatch)

    # New rank r reads saved files r, r+size, ...: each file once, by one rank
    # (rank 0's own file was read once already, for the layout).
    assert {rank: files for rank, files in reads.items()} == {
        rank: [n for n in range(rank, SAVED, size) if n != 0] for rank in range(size)}

    average = np.mean([params.astype(np.float64) for params, _ in models], axis=0)
    momentum = np.mean([sgd["state"][0]["momentum_buffer"].numpy().astype(np.float64)
                        for _, sgd in models], axis=0)
    for state in states:
        assert state["parameters"].dtype == torch.float64
        np.testing.assert_allclose(state["parameters"].numpy(), average, rtol=0, atol=1e-12)
        np.testing.assert_allclose(state["optimizer"]["state"][0]["momentum_buffer"].numpy(),
                                   momentum, rtol=0, atol=1e-7)
        assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
        assert state["policy"] == state["straggler"] == "fresh", "reset: they do not map"
        assert state["iteration"] == 40 + SAVED - 1, "the largest saved"
        assert state["training_seconds"] == 3.0 and state["evaluations"] == 3
    samples = [state["own_samples"] for state in states]
    assert sum(samples) == sum(100 * rank + 7 for rank in range(SAVED)), "the job total goes on"
    assert len(set(samples[1:])) <= 1 and samples[0] >= samples[-1]


def test_a_resize_resets_the_optimizer_unless_every_saved_rank_has_its_tensors(tmp_path,
                                                                                monkeypatch):
    manifest, models = write_saved_job(tmp_path, momentum_on=[0, 1, 2, 4])  # rank 3: no momentum
    states, _ = resume_on(manifest, 2, models[0][0].size, monkeypatch)
    assert all(state["optimizer"] == {"state": {}, "param_groups": []} for state in states)
    average = np.mean([params.astype(np.float64) for params, _ in models], axis=0)
    np.testing.assert_allclose(states[1]["parameters"].numpy(), average, rtol=0, atol=1e-12)
