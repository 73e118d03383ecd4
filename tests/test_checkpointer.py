"""The state codec of aau_mpi.checkpointer: what a rank's checkpoint keeps comes back as it was."""

import json

import numpy as np
import torch

from aau_mpi.checkpointer import decode, encode


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
