"""Model factories: every registered model builds, runs and names bad input."""


import pytest
import torch

from aau_mpi.errors import UserError
from aau_mpi.models import MODELS, build_model


@pytest.mark.parametrize("name, input_shape, params", [
    ("logreg", (32,), {}),
    ("logreg", (1, 8, 8), {}),
    ("mlp", (32,), {}),
    ("mlp", (1, 8, 8), {"hidden": [16, 8]}),
    ("mlp", (5,), {"hidden": []}),
    ("lenet", (1, 8, 8), {}),
    ("lenet", (1, 28, 28), {}),
    ("lenet", (3, 32, 32), {}),
    ("resnet18", (3, 32, 32), {}),
    ("resnet18", (3, 32, 32), {"norm": "batch"}),
    ("resnet18", (1, 8, 8), {}),
])
def test_forward_gives_one_logit_per_class(name, input_shape, params):
    model = build_model(name, input_shape, 7, params)
    with torch.no_grad():
        logits = model(torch.randn(2, *input_shape))
    assert logits.shape == (2, 7)


def test_resnet18_has_about_11_2_million_parameters():
    for norm in ("group", "batch"):
        model = build_model("resnet18", (3, 32, 32), 10, {"norm": norm})
        assert sum(param.numel() for param in model.parameters()) == 11_173_962
    assert not list(build_model("resnet18", (3, 32, 32), 10).buffers())  # group norm: no buffers


@pytest.mark.parametrize("name, input_shape, params, expected", [
    ("lenett", (1, 8, 8), {}, "did you mean 'lenet'"),
    ("mlp", (4,), {"hiden": [3]}, "it takes: hidden"),
    ("mlp", (4,), {"hidden": [3, -1]}, "positive integers"),
    ("lenet", (32,), {}, "lenet needs image input"),
    ("lenet", (1, 2, 2), {}, "height and width >= 4"),
    ("resnet18", (3, 32, 32), {"norm": "layer"}, "norm must be one of group, batch"),
])
def test_bad_model_name_or_params(name, input_shape, params, expected):
    with pytest.raises(UserError, match=expected):
        build_model(name, input_shape, 10, params)


def test_models_registered():
    assert MODELS.names() == ["lenet", "logreg", "mlp", "resnet18"]
