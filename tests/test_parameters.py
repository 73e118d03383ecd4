"""FlatParameters: a model's parameters and floating buffers as views into one flat tensor."""

import copy

import numpy as np
import pytest
import torch

from aau_mpi.base.errors import UserError
from aau_mpi.training.models import build_model
from aau_mpi.decentralized.parameters import FlatParameters
from user_models import CONTEXT, VOCAB, WIDTH, FineTuned


def small_model(seed=0, name="lenet", params=None):
    torch.manual_seed(seed)
    return build_model(name, (1, 8, 8), 10, params)


def test_parameters_become_views_of_flat():
    model = small_model()
    original = torch.cat([param.detach().reshape(-1).clone() for param in model.parameters()])
    flat = FlatParameters(model)
    assert flat.numel == flat.shared_numel == flat.trainable_numel == original.numel()
    assert flat.flat.numel() == flat.numel
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
    assert flat.trainable_numel == params and flat.numel == params + floating
    model.train()
    model(torch.randn(4, 3, 8, 8))  # a forward pass in training mode updates running stats
    assert flat.views_intact(), "running stats are updated in place, inside flat"
    bn = model[1]
    assert torch.equal(bn.running_mean, flat.flat[flat.trainable_numel:][:bn.running_mean.numel()])
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
    out = torch.empty(flat.gradient_numel)
    flat.gradients(out)
    assert torch.equal(out[:flat.trainable_numel], expected)
    assert torch.equal(out[flat.trainable_numel:], torch.ones(len(list(model.parameters()))))
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
def test_cuda_deposit_source_snapshots_before_later_kernels_into_pinned_memory():
    from aau_mpi.decentralized.parameters import DepositSource
    model = small_model().cuda()
    flat = FlatParameters(model)
    source = DepositSource(flat.shared, threaded=True)
    assert source.buffer.is_pinned()
    expected = flat.shared.cpu().numpy()
    payload, before = source.take()
    flat.shared.add_(1.0)  # the loop's next kernels, queued before the copy finished
    before()
    assert np.array_equal(payload, expected)


def inside(tensor, part):
    start = part.data_ptr()
    return start <= tensor.data_ptr() < start + part.numel() * part.element_size()


def test_the_communicated_part_is_a_prefix_of_trainable_parameters_and_persistent_buffers():
    """Trainable parameters (a tied weight once) and persistent floating buffers come
    first, as `shared`; frozen parameters and non-persistent buffers after it."""
    torch.manual_seed(0)
    model = FineTuned()
    flat = FlatParameters(model)
    trainable = VOCAB * WIDTH + 2 * WIDTH + 3    # tied embedding once, BatchNorm's affine, unused
    assert flat.trainable_numel == trainable
    assert flat.shared_numel == trainable + 2 * WIDTH    # + running mean and variance
    assert flat.numel == flat.shared_numel + WIDTH * WIDTH + WIDTH + CONTEXT * CONTEXT
    assert flat.shared.data_ptr() == flat.flat.data_ptr()
    assert flat.shared.numel() == flat.shared_numel
    local = flat.flat[flat.shared_numel:]
    for tensor in (model.embed.weight, model.norm.weight, model.unused, model.norm.running_var):
        assert inside(tensor, flat.shared)
    for tensor in (model.backbone.weight, model.backbone.bias, model.blocks[0].mask):
        assert inside(tensor, local)
    assert model.out.weight is model.embed.weight
    assert model.blocks[1].mask.data_ptr() == model.blocks[0].mask.data_ptr(), \
        "a buffer that two modules share stays one tensor, laid out once"
    assert torch.isfinite(flat.shared).all() and torch.isinf(local).any()
    assert flat.views_intact()
    model(torch.randint(0, VOCAB, (4, CONTEXT)))  # running statistics change in place
    assert flat.views_intact()


def test_gradients_cover_the_trainable_parameters_and_none_stays_none():
    """A frozen parameter, and one that had no gradient on any rank, keep .grad None
    (zeros would let weight decay and momentum move them)."""
    torch.manual_seed(0)
    model = FineTuned()
    flat = FlatParameters(model)
    out = torch.empty(flat.gradient_numel)
    torch.nn.functional.cross_entropy(model(torch.randint(0, VOCAB, (4, CONTEXT))).flatten(0, 1),
                                      torch.randint(0, VOCAB, (4 * CONTEXT,))).backward()
    expected = [p.grad.clone() for p in (model.embed.weight, model.norm.weight, model.norm.bias)]
    flat.gradients(out)
    model.zero_grad(set_to_none=True)
    flat.set_gradients(out)
    for param, grad in zip((model.embed.weight, model.norm.weight, model.norm.bias), expected):
        assert torch.equal(param.grad, grad)
    assert model.unused.grad is None
    assert model.backbone.weight.grad is None and model.backbone.bias.grad is None


def test_a_vector_of_the_first_layout_loads_into_its_places():
    """Layout 1 (every parameter, then every floating buffer, as aau_mpi laid out and
    checkpointed models before) loads each value into the tensor it belonged to."""
    torch.manual_seed(0)
    model, source = FineTuned(), FineTuned()
    with torch.no_grad():
        for tensor in list(source.parameters()) + [source.norm.running_mean,
                                                   source.norm.running_var]:
            tensor.copy_(torch.randn_like(tensor))
    floating = [b for b in source.buffers() if b.is_floating_point()]  # each once
    legacy = torch.cat([t.detach().reshape(-1) for t in list(source.parameters()) + floating])
    flat = FlatParameters(model)
    flat.load_(legacy, layout=1)
    for name, value in source.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(model.state_dict()[name], value), name
    flat.load_(flat.flat.clone(), layout=2)
    with pytest.raises(ValueError, match="layout 3"):
        flat.load_(legacy, layout=3)


def test_a_model_with_nothing_to_train_is_a_user_error():
    with pytest.raises(UserError, match="requires_grad"):
        FlatParameters(small_model().requires_grad_(False))
