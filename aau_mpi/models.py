"""Models by name, and FlatParameters: a module's parameters as one contiguous vector.

Decentralized averaging mixes whole parameter vectors, so FlatParameters lays
every parameter (and its gradient) out inside one float32 buffer: a deposit
or a mix is then a single transfer, with no per-step copy of each tensor.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aau_mpi.errors import UserError
from aau_mpi.registry import Registry

MODELS = Registry("model")


def build_model(name, input_shape, num_classes, params=None):
    """The module that factory MODELS[name] builds for (input_shape, num_classes, **params)."""
    input_shape = tuple(int(size) for size in input_shape)
    return MODELS.build(name, params, input_shape, num_classes)


def require_image_shape(model, input_shape, min_size):
    if len(input_shape) != 3 or min(input_shape[1:]) < min_size:
        raise UserError(f"{model} needs image input (channels, height, width) with height and "
                        f"width >= {min_size}, got {input_shape}: use logreg or mlp for this data")
    return input_shape


def require_sequence_shape(model, input_shape, min_length):
    if len(input_shape) != 2 or input_shape[1] < min_length:
        raise UserError(f"{model} needs sequence input (channels, length) with length >= "
                        f"{min_length}, got {input_shape}: use logreg or mlp for this data")
    return input_shape


@MODELS.register("logreg")
def logreg(input_shape, num_classes):
    """Multinomial logistic regression: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@MODELS.register("mlp")
def mlp(input_shape, num_classes, hidden=(256, 128)):
    """Fully connected ReLU network with the given hidden layer sizes."""
    if isinstance(hidden, int):
        hidden = [hidden]
    if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0
               for size in hidden):
        raise UserError(f"mlp hidden must be a list of positive integers (got {hidden!r}): "
                        f"e.g. hidden: [256, 128]")
    sizes = [math.prod(input_shape), *hidden]
    layers = [nn.Flatten()]
    for size_in, size_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(size_in, size_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


@MODELS.register("lenet")
def lenet(input_shape, num_classes):
    """LeNet-5 style CNN; 'same' padded convs make it fit 8x8, 28x28 and 32x32 inputs alike."""
    channels, height, width = require_image_shape("lenet", input_shape, 4)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (height // 4) * (width // 4), 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes))


def conv_output_length(length, kernel, stride, padding):
    return (length + 2 * padding - kernel) // stride + 1


# (kernel, stride, padding) of the three convolutions of MNIST-1D's ConvBase.
CNN1D_CONVS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))


@MODELS.register("cnn1d")
def cnn1d(input_shape, num_classes, channels=25):
    """MNIST-1D's CNN (ConvBase in the mnist1d repository): three strided ReLU Conv1d, one linear.

    On length 40 the convolutions leave 19, 10, then 5 positions: a 25 * 5 -> classes
    linear layer and 5,210 parameters in all for 10 classes.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise UserError(f"cnn1d channels must be a positive integer (got {channels!r}): "
                        f"e.g. channels: 25")
    in_channels, length = require_sequence_shape("cnn1d", input_shape, 3)
    layers = []
    for kernel, stride, padding in CNN1D_CONVS:
        layers += [nn.Conv1d(in_channels, channels, kernel, stride, padding), nn.ReLU()]
        in_channels, length = channels, conv_output_length(length, kernel, stride, padding)
    layers += [nn.Flatten(), nn.Linear(channels * length, num_classes)]
    return nn.Sequential(*layers)


NORM_LAYERS = {
    "group": lambda channels: nn.GroupNorm(min(32, channels), channels),
    "batch": nn.BatchNorm2d,
}


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 conv when the shape changes)."""

    def __init__(self, in_channels, out_channels, stride, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = norm_layer(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = norm_layer(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                norm_layer(out_channels))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@MODELS.register("resnet18")
def resnet18(input_shape, num_classes, norm="group"):
    """ResNet-18, CIFAR variant: 3x3 stem conv, no max-pool, BasicBlocks [2, 2, 2, 2].

    norm="group" (default): GroupNorm with 32 groups. It has no buffers, so the
    flat parameter vector is the whole model state and decentralized averaging
    is exact. norm="batch": BatchNorm; its running statistics are buffers, NOT
    part of the flat parameter vector, so each rank keeps its own and they are
    only reconciled if the trainer averages them separately (e.g. at the end).
    """
    if norm not in NORM_LAYERS:
        raise UserError(f"resnet18 norm must be one of {', '.join(NORM_LAYERS)} "
                        f"(got {norm!r}): set norm to 'group' or 'batch'")
    channels = require_image_shape("resnet18", input_shape, 1)[0]
    norm_layer = NORM_LAYERS[norm]
    layers = [nn.Conv2d(channels, 64, 3, padding=1, bias=False), norm_layer(64), nn.ReLU()]
    in_channels = 64
    for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(in_channels, out_channels, stride, norm_layer),
                   BasicBlock(out_channels, out_channels, 1, norm_layer)]
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class FlatParameters:
    """All of a module's parameters as views into one contiguous float32 tensor.

    After FlatParameters(module), every parameter's data is a view into `flat`
    and its .grad a view into `flat_grad` (both numel long, on the module's
    device). Autograd accumulates into the existing .grad in place and
    torch.optim optimizers update parameters in place, so `flat` always holds
    the current model and `flat_grad` the current gradient.

    Keep the sharing intact: move the module to its device BEFORE flattening
    (module.to() makes new tensors), and clear gradients with zero_grad() here,
    never with module.zero_grad() or optimizer.zero_grad() at their default
    set_to_none=True (that detaches .grad from flat_grad). views_intact() checks.

    host_view() is the host copy that MPI transfers: on CPU it is flat.numpy(),
    sharing memory with the model (no copy; writes to it change the model). On
    CUDA it copies flat into a pinned host staging buffer, allocated once, and
    returns that buffer as numpy; the next host_view() call overwrites it.
    load_(vector) writes a host vector into flat (host-to-device copy on CUDA).
    """

    def __init__(self, module):
        params = list(module.parameters())
        if not params:
            raise ValueError("module has no parameters to flatten")
        if any(param.dtype != torch.float32 for param in params):
            raise ValueError("FlatParameters needs float32 parameters")
        device = params[0].device
        if any(param.device != device for param in params):
            raise ValueError("FlatParameters needs all parameters on one device")
        self.numel = sum(param.numel() for param in params)
        self.flat = torch.empty(self.numel, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self._slots = []  # (parameter, offset into flat)
        offset = 0
        with torch.no_grad():
            for param in params:
                size = param.numel()
                self.flat[offset:offset + size].copy_(param.reshape(-1))
                param.data = self.flat[offset:offset + size].view_as(param)
                param.grad = self.flat_grad[offset:offset + size].view_as(param)
                self._slots.append((param, offset))
                offset += size
        self._staging = None  # pinned host buffer, CUDA only

    def zero_grad(self):
        self.flat_grad.zero_()

    def views_intact(self):
        """True while every parameter and its grad still live at their place in flat / flat_grad."""
        element = self.flat.element_size()
        return all(
            param.data_ptr() == self.flat.data_ptr() + offset * element
            and param.grad is not None
            and param.grad.data_ptr() == self.flat_grad.data_ptr() + offset * element
            for param, offset in self._slots)

    def host_view(self):
        """flat as a numpy array: shared memory on CPU, a pinned staging copy on CUDA."""
        if self.flat.device.type == "cpu":
            return self.flat.numpy()
        if self._staging is None:
            self._staging = torch.empty(self.numel, dtype=torch.float32, pin_memory=True)
        self._staging.copy_(self.flat)
        return self._staging.numpy()

    def load_(self, vector):
        """Overwrite flat (and so the model) with a host vector of numel float32 values."""
        values = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        if values.shape != (self.numel,):
            raise ValueError(f"expected a vector of {self.numel} values, got shape "
                             f"{tuple(values.shape)}")
        self.flat.copy_(values)
