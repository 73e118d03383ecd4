"""Model factories: every registered model builds, runs and names bad input."""


import pytest
import torch

from aau_mpi.base.errors import UserError
from aau_mpi.training.models import MODELS, build_model


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
    ("cnn1d", (1, 40), {}),
    ("cnn1d", (3, 17), {"channels": 4}),
    ("cnn1d", (1, 3), {}),
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


def test_cnn1d_is_mnist1d_convbase():
    """Conv1d(1, 25, 5, stride 2, padding 1), then two Conv1d(25, 25, 3, 2, 1), ReLU after
    each, and a linear layer on the flattened 25 x 5 features: 5,210 parameters."""
    model = build_model("cnn1d", (1, 40), 10)
    convs = [layer for layer in model if isinstance(layer, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] \
        == [(1, 25, (5,), (2,), (1,)), (25, 25, (3,), (2,), (1,)), (25, 25, (3,), (2,), (1,))]
    assert sum(isinstance(layer, torch.nn.ReLU) for layer in model) == 3
    linear = model[-1]
    assert (linear.in_features, linear.out_features) == (125, 10)
    assert sum(param.numel() for param in model.parameters()) == 5210
    assert build_model("cnn1d", (1, 100), 10)[-1].in_features == 25 * 13  # 49, 25, 13


@pytest.mark.parametrize("name, input_shape, params, expected", [
    ("lenett", (1, 8, 8), {}, "did you mean 'lenet'"),
    ("mlp", (4,), {"hiden": [3]}, "it takes: hidden"),
    ("mlp", (4,), {"hidden": [3, -1]}, "positive integers"),
    ("lenet", (32,), {}, "lenet needs image input"),
    ("lenet", (1, 2, 2), {}, "height and width >= 4"),
    ("resnet18", (3, 32, 32), {"norm": "layer"}, "norm must be one of group, batch"),
    ("cnn1d", (40,), {}, r"cnn1d needs sequence input \(channels, length\)"),
    ("cnn1d", (1, 8, 8), {}, "cnn1d needs sequence input"),
    ("cnn1d", (1, 2), {}, "length >= 3"),
    ("cnn1d", (1, 40), {"channels": 0}, "cnn1d channels must be an integer >= 1"),
])
def test_bad_model_name_or_params(name, input_shape, params, expected):
    with pytest.raises(UserError, match=expected):
        build_model(name, input_shape, 10, params)


def test_models_registered():
    assert MODELS.names() == ["cnn1d", "lenet", "logreg", "mlp", "resnet18"]
