"""Model factories and FlatParameters (parameters and grads as views into one buffer)."""

import copy

import numpy as np
import pytest
import torch

from aau_mpi.errors import UserError
from aau_mpi.models import MODELS, FlatParameters, build_model


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
    ("cnn1d", (1, 40), {"channels": 0}, "channels must be a positive integer"),
])
def test_bad_model_name_or_params(name, input_shape, params, expected):
    with pytest.raises(UserError, match=expected):
        build_model(name, input_shape, 10, params)


def test_models_registered():
    assert MODELS.names() == ["cnn1d", "lenet", "logreg", "mlp", "resnet18"]


# ---------------------------------------------------------- FlatParameters

def small_model(seed=0):
    torch.manual_seed(seed)
    return build_model("lenet", (1, 8, 8), 10)


def test_parameters_become_views_of_flat():
    model = small_model()
    original = torch.cat([param.detach().reshape(-1).clone() for param in model.parameters()])
    flat = FlatParameters(model)
    assert flat.numel == original.numel() == flat.flat.numel() == flat.flat_grad.numel()
    assert torch.equal(flat.flat, original)
    start = flat.flat.data_ptr()
    end = start + flat.numel * flat.flat.element_size()
    for param in model.parameters():
        assert start <= param.data_ptr() < end
        assert param.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr()
    assert flat.views_intact()

    inputs = torch.randn(3, 1, 8, 8)
    before = model(inputs).detach()
    flat.flat.mul_(0.5)
    assert not torch.allclose(model(inputs), before)
    flat.flat.zero_()
    assert torch.count_nonzero(model(inputs)) == 0  # all weights and biases are zero


def test_backward_accumulates_into_flat_grad():
    model = small_model()
    reference = copy.deepcopy(model)
    flat = FlatParameters(model)
    inputs, targets = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    torch.nn.functional.cross_entropy(reference(inputs), targets).backward()
    expected = torch.cat([param.grad.reshape(-1) for param in reference.parameters()])
    assert torch.count_nonzero(flat.flat_grad) > 0
    assert torch.allclose(flat.flat_grad, expected, atol=1e-6)
    assert flat.views_intact()
    flat.zero_grad()
    assert torch.count_nonzero(flat.flat_grad) == 0 and flat.views_intact()


def test_sgd_with_momentum_and_weight_decay_updates_flat_in_place():
    model = small_model()
    reference = copy.deepcopy(model)
    flat = FlatParameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9,
                                          weight_decay=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        inputs = torch.randn(4, 1, 8, 8, generator=generator)
        targets = torch.randint(0, 10, (4,), generator=generator)
        flat.zero_grad()
        reference_optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        torch.nn.functional.cross_entropy(reference(inputs), targets).backward()
        optimizer.step()
        reference_optimizer.step()
        assert flat.views_intact()
    expected = torch.cat([param.detach().reshape(-1) for param in reference.parameters()])
    assert torch.allclose(flat.flat, expected, atol=1e-6)


def test_views_intact_detects_grads_set_to_none():
    model = small_model()
    flat = FlatParameters(model)
    model.zero_grad()  # set_to_none=True: the grads no longer live in flat_grad
    assert not flat.views_intact()


def test_host_view_shares_memory_on_cpu():
    model = small_model()
    flat = FlatParameters(model)
    host = flat.host_view()
    assert isinstance(host, np.ndarray) and host.dtype == np.float32 and host.shape == (flat.numel,)
    assert np.shares_memory(host, flat.host_view())
    host[0] = 123.0
    assert flat.flat[0].item() == 123.0
    assert next(model.parameters()).reshape(-1)[0].item() == 123.0


def test_load_round_trips():
    model = small_model()
    flat = FlatParameters(model)
    values = np.random.default_rng(0).standard_normal(flat.numel).astype(np.float32)
    flat.load_(values)
    assert np.array_equal(flat.host_view(), values)
    assert torch.equal(next(model.parameters()).reshape(-1)[:5], torch.from_numpy(values[:5]))
    other_model = small_model(seed=1)
    FlatParameters(other_model).load_(flat.host_view())
    inputs = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(inputs), other_model(inputs))
    with pytest.raises(ValueError, match=f"{flat.numel} values"):
        flat.load_(values[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_view_uses_one_pinned_staging_buffer():
    model = small_model().cuda()
    flat = FlatParameters(model)
    host = flat.host_view()
    assert np.array_equal(host, flat.flat.cpu().numpy())
    assert flat._staging.is_pinned()
    staging = flat._staging.data_ptr()
    flat.flat.add_(1.0)
    assert np.array_equal(flat.host_view(), flat.flat.cpu().numpy())
    assert flat._staging.data_ptr() == staging  # allocated once
    values = np.arange(flat.numel, dtype=np.float32)
    flat.load_(values)
    assert np.array_equal(flat.flat.cpu().numpy(), values) and flat.views_intact()
