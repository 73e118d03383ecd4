"""Models by name (the config's `model.name`), and the model file that rebuilds one.

Each factory takes (input_shape, num_classes, **params). `save_model` writes a
model's weights with the meta that names its factory; `load_model` rebuilds it
(<run>/model.h5, docs/checkpoints.md).
"""

import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import Registry
from aau_mpi.decentralized.checkpoint import (FORMAT_VERSION, atomic_h5, one_line, open_h5,
                                              read_arrays, set_texts, text, write_arrays)

MODELS = Registry("model")
MODEL_FORMAT = "aau_mpi.model"
MODEL_META_KEYS = ("model", "model_params", "input_shape", "num_classes")


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
    channels = checks.integer("cnn1d channels", channels, 1)
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

    norm="group" (default): GroupNorm with 32 groups (no buffers). norm="batch":
    BatchNorm; its running statistics are floating buffers, which the flat
    vector of aau_mpi.decentralized.parameters holds beside the weights, so they are mixed
    and averaged with them.
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


# ---- the model file -----------------------------------------------------------

def save_model(path, module_or_state_dict, meta):
    """Write a model's state_dict and the meta that rebuilds it (see load_model) atomically."""
    missing = [key for key in MODEL_META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"save_model meta lacks {', '.join(missing)}")
    state = module_or_state_dict
    if hasattr(state, "state_dict"):
        state = state.state_dict()
    path = Path(path)
    with atomic_h5(path) as file:
        file.attrs.update(format_version=FORMAT_VERSION, created=time.time())
        set_texts(file.attrs, format=MODEL_FORMAT, meta=json.dumps(meta))
        write_arrays(file.create_group("state"),
                     {name: tensor.detach().cpu().numpy() for name, tensor in state.items()})


def load_model(path, device="cpu"):
    """The model that save_model wrote, rebuilt by name, weights loaded (strict), in eval mode."""
    hint = "save the model again, or load another model file"
    with open_h5(path, MODEL_FORMAT, hint) as file:
        meta = json.loads(text(file.attrs, "meta"))
        name, params, input_shape, num_classes = (meta[key] for key in MODEL_META_KEYS)
        state = read_arrays(file["state"], path, hint)
    model = build_model(name, input_shape, num_classes, params)
    try:
        model.load_state_dict({key: torch.from_numpy(array) for key, array in state.items()})
    except RuntimeError as err:
        raise UserError(f"{path} does not fit model {name!r} ({one_line(err)}): {hint}") from None
    return model.to(device).eval()
