"""FlatParameters: a model's parameters and floating buffers as views into one flat tensor."""

import copy

import numpy as np
import pytest
import torch

from aau_mpi.errors import UserError
from aau_mpi.models import build_model
from aau_mpi.parameters import FlatParameters


def small_model(seed=0, name="lenet", params=None):
    torch.manual_seed(seed)
    return build_model(name, (1, 8, 8), 10, params)


def test_parameters_become_views_of_flat():
    model = small_model()
    original = torch.cat([param.detach().reshape(-1).clone() for param in model.parameters()])
    flat = FlatParameters(model)
    assert flat.numel == flat.param_numel == original.numel() == flat.flat.numel()
    assert torch.equal(flat.flat, original)
    start = flat.flat.data_ptr()
    end = start + flat.numel * flat.flat.element_size()
    for param in model.parameters():
        assert start <= param.data_ptr() < end
    assert flat.views_intact()

    inputs = torch.randn(3, 1, 8, 8)
    before = model(inputs).detach()
    flat.flat.mul_(0.5)
    assert not torch.allclose(model(inputs), before)
    flat.flat.zero_()
    assert torch.count_nonzero(model(inputs)) == 0  # all weights and biases are zero


def test_batchnorm_running_statistics_live_in_flat_and_counters_do_not():
    model = build_model("resnet18", (3, 8, 8), 10, {"norm": "batch"})
    params = sum(p.numel() for p in model.parameters())
    floating = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    flat = FlatParameters(model)
    assert flat.param_numel == params and flat.numel == params + floating
    model.train()
    model(torch.randn(4, 3, 8, 8))  # a forward pass in training mode updates running stats
    assert flat.views_intact(), "running stats are updated in place, inside flat"
    bn = model[1]
    assert torch.equal(bn.running_mean, flat.flat[flat.param_numel:][:bn.running_mean.numel()])
    assert bn.num_batches_tracked.dtype == torch.int64 and bn.num_batches_tracked.item() == 1


def test_user_optimizers_and_zero_grad_to_none_keep_the_views():
    """Gradients are not flattened, so any optimizer and zero_grad() work as usual."""
    model = small_model()
    reference = copy.deepcopy(model)
    flat = FlatParameters(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        inputs = torch.randn(4, 1, 8, 8, generator=generator)
        targets = torch.randint(0, 10, (4,), generator=generator)
        for opt, net in ((optimizer, model), (reference_optimizer, reference)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(inputs), targets).backward()
            opt.step()
        assert flat.views_intact()
    expected = torch.cat([param.detach().reshape(-1) for param in reference.parameters()])
    assert torch.allclose(flat.flat, expected, atol=1e-6)


def test_views_intact_detects_a_model_moved_after_flattening():
    model = small_model()
    flat = FlatParameters(model)
    model.double().float()  # new tensors: the parameters no longer live in flat
    assert not flat.views_intact()


def test_gradients_round_trip_through_a_flat_tensor():
    model = small_model()
    flat = FlatParameters(model)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 8, 8)),
                                      torch.tensor([1, 2])).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    out = torch.empty(flat.param_numel)
    flat.gradients(out)
    assert torch.equal(out, expected)
    model.zero_grad(set_to_none=True)
    flat.set_gradients(out * 2)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected * 2)


def test_load_round_trips_and_checks_the_size():
    model = small_model()
    flat = FlatParameters(model)
    values = np.random.default_rng(0).standard_normal(flat.numel).astype(np.float32)
    flat.load_(values)
    assert np.array_equal(flat.host_copy(), values)
    other_model = small_model(seed=1)
    FlatParameters(other_model).load_(flat.host_copy())
    inputs = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(inputs), other_model(inputs))
    with pytest.raises(ValueError, match=f"{flat.numel} values"):
        flat.load_(values[:-1])


def test_a_half_precision_model_is_a_user_error():
    with pytest.raises(UserError, match="float32"):
        FlatParameters(small_model().half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none visible here)")
def test_cuda_staging_copies_asynchronously_into_pinned_memory():
    from aau_mpi.parameters import HostStaging
    model = small_model().cuda()
    flat = FlatParameters(model)
    staging = HostStaging(flat.flat)
    assert staging.buffer.is_pinned()
    staging.stage()
    staging.wait_copied()
    assert np.array_equal(staging.array, flat.flat.cpu().numpy())
