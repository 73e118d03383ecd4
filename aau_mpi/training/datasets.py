"""Datasets by name: loaders that read files already on disk, and generators.

Every rank loads the whole dataset; aau_mpi.training.partitions then gives
each rank its part. Nothing is ever downloaded: loaders read files that are
already on disk (or generate the data, as for mnist1d) and say where to get
them when they are missing.
"""

import gzip
import hashlib
import importlib.metadata
import importlib.resources
import json
import math
import os
import pickle
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from aau_mpi.base import checks
from aau_mpi.base.errors import UserError
from aau_mpi.base.registry import Registry
from aau_mpi.decentralized.checkpoint import atomic_h5, one_line

DATASETS = Registry("dataset")

MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
MNIST1D_MISSING = "data.name mnist1d needs the mnist1d package: pip install mnist1d"
MNIST1D_CACHE_FORMAT = "aau_mpi.mnist1d"


@dataclass
class Dataset:
    """Features as float32 tensors shaped (N, *input_shape); labels as int64 tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple
    name: str


def load_dataset(name, params=None):
    """The Dataset that the loader registered as `name` returns for `params`."""
    return DATASETS.build(name, params)


# ---------------------------------------------------------------- validation

def require_fraction(name, value):
    return checks.number(name, value, above=0, below=1)


def split_train_test(labels, test_fraction, seed):
    """Seeded stratified split: each class gives round(test_fraction * its size) test samples."""
    rng = np.random.default_rng(seed)
    shuffled_classes = [rng.permutation(np.flatnonzero(labels == label))
                        for label in np.unique(labels)]
    test = np.sort(np.concatenate([members[:round(test_fraction * len(members))]
                                   for members in shuffled_classes]))
    train = np.setdiff1d(np.arange(len(labels)), test)
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"test_fraction={test_fraction} leaves an empty train or test set "
                        f"for {len(labels)} samples: choose a test_fraction nearer 0.2")
    return train, test


def dataset_from_arrays(name, x, y, train, test, num_classes):
    """A Dataset from numpy features/labels and the train/test index arrays."""
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return Dataset(x[train], y[train], x[test], y[test], int(num_classes),
                   tuple(x.shape[1:]), name)


# ------------------------------------------------------------------- loaders

@DATASETS.register("synthetic")
def load_synthetic(*, samples=6000, features=32, classes=10, separation=4.0,
                   noise=1.0, test_fraction=0.2, seed=0):
    """Gaussian clusters: one mean per class plus isotropic noise, shape (N, features).

    The class means are random, rescaled so that the root-mean-square distance
    between two class means is `separation`; the noise has standard deviation
    `noise` per feature. Lower separation (or higher noise) = harder.
    """
    samples = checks.integer("samples", samples, 2)
    features = checks.integer("features", features, 1)
    classes = checks.integer("classes", classes, 2)
    separation = checks.number("separation", separation, 0)
    noise = checks.number("noise", noise, 0)
    test_fraction = require_fraction("test_fraction", test_fraction)
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, features))
    pairwise = np.linalg.norm(means[:, None] - means[None], axis=-1)
    rms_distance = np.sqrt((pairwise ** 2).sum() / (classes * (classes - 1)))
    means *= separation / rms_distance
    labels = rng.permutation(np.arange(samples) % classes)  # balanced classes
    x = means[labels] + noise * rng.standard_normal((samples, features))
    train, test = split_train_test(labels, test_fraction, seed)
    return dataset_from_arrays("synthetic", x, labels, train, test, classes)


@DATASETS.register("digits")
def load_digits(*, test_fraction=0.2, seed=0):
    """The 1797 8x8 handwritten digits shipped in aau_mpi/data, shape (N, 1, 8, 8) in [0, 1]."""
    test_fraction = require_fraction("test_fraction", test_fraction)
    resource = importlib.resources.files("aau_mpi") / "data" / "digits.csv.gz"
    with resource.open("rb") as compressed, gzip.open(compressed, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    x = table[:, :64].reshape(-1, 1, 8, 8) / 16.0  # pixels count set bits in 4x4 blocks: 0..16
    labels = table[:, 64].astype(np.int64)
    train, test = split_train_test(labels, test_fraction, seed)
    return dataset_from_arrays("digits", x, labels, train, test, 10)


def absolute(path):
    return Path(path).expanduser().absolute()


def read_idx(path, ndims):
    """The uint8 array stored in IDX file `path` (plain or .gz) with `ndims` dimensions."""
    refetch = f"re-download it from {MNIST_URL}"
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as err:  # bad or truncated gzip stream
        raise UserError(f"cannot read IDX file {path} ({err}): {refetch}") from None
    header_size = 4 + 4 * ndims
    if len(raw) < header_size:
        raise UserError(f"IDX file {path} is truncated ({len(raw)} bytes, "
                        f"shorter than its header): {refetch}")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = 0x0800 + ndims  # unsigned bytes, ndims dimensions
    if magic != expected_magic:
        raise UserError(f"IDX file {path} has magic number 0x{magic:08x}, expected "
                        f"0x{expected_magic:08x}: it is corrupt or the wrong file; {refetch}")
    shape = struct.unpack(f">{ndims}I", raw[4:header_size])
    if len(raw) - header_size != math.prod(shape):
        raise UserError(f"IDX file {path} is truncated or corrupt: its header promises "
                        f"{math.prod(shape)} values {shape}, it holds {len(raw) - header_size}; "
                        f"{refetch}")
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape)


def find_mnist_file(root, name):
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"MNIST file {root / name} (or .gz) not found: download the four IDX "
                    f"files from {MNIST_URL} into {root} (nothing is downloaded at run time)")


def read_mnist_split(root, prefix):
    """(images (N, 1, rows, cols) in [0, 1], labels) from root/<prefix>-{images,labels}-*."""
    images_path = find_mnist_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = find_mnist_file(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} "
                        f"holds {len(labels)} labels: re-download both from {MNIST_URL}")
    if labels.max(initial=0) > 9:
        raise UserError(f"{labels_path} holds label {labels.max()} outside 0..9: "
                        f"re-download it from {MNIST_URL}")
    x = torch.from_numpy(images.astype(np.float32)).div_(255).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


@DATASETS.register("mnist")
def load_mnist(*, root):
    """MNIST from the four IDX files (plain or .gz) in `root`, shape (N, 1, 28, 28) in [0, 1]."""
    root = absolute(root)
    x_train, y_train = read_mnist_split(root, "train")
    x_test, y_test = read_mnist_split(root, "t10k")
    return Dataset(x_train, y_train, x_test, y_test, 10, tuple(x_train.shape[1:]), "mnist")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path):
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) from one CIFAR-10 pickle batch."""
    refetch = f"re-download cifar-10-python.tar.gz from {CIFAR10_URL}"
    try:
        with open(path, "rb") as stream:
            batch = NumpyOnlyUnpickler(stream, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # any unpickling failure means a damaged file
        raise UserError(f"cannot read CIFAR-10 batch {path} ({type(err).__name__}: {err}): "
                        f"{refetch}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(f"CIFAR-10 batch {path} holds data {data.shape} and {len(labels)} "
                        f"labels, expected (N, 3072) and N: {refetch}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"CIFAR-10 batch {path} holds labels outside 0..9: {refetch}")
    return data.reshape(-1, 3, 32, 32), labels


@DATASETS.register("cifar10")
def load_cifar10(*, root):
    """CIFAR-10 from the python batches in `root` (or root/cifar-10-batches-py).

    Shape (N, 3, 32, 32): scaled to [0, 1], then normalised per channel with
    the training set's mean and standard deviation.
    """
    root = absolute(root)
    folder = next((candidate for candidate in (root, root / "cifar-10-batches-py")
                   if (candidate / "data_batch_1").is_file()), None)
    if folder is None:
        raise UserError(f"CIFAR-10 batches not found in {root} or {root / 'cifar-10-batches-py'}: "
                        f"download and extract cifar-10-python.tar.gz from {CIFAR10_URL} "
                        f"into {root} (nothing is downloaded at run time)")
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if not (folder / name).is_file():
            raise UserError(f"CIFAR-10 batch {folder / name} not found: extract all of "
                            f"cifar-10-python.tar.gz from {CIFAR10_URL} into {root}")
        batches.append(read_cifar_batch(folder / name))
    x = torch.from_numpy(np.concatenate([images for images, _ in batches])).float().div_(255)
    y = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
    train_size = sum(len(labels) for _, labels in batches[:5])
    x_train, x_test = x[:train_size], x[train_size:]
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x.sub_(mean).div_(std)  # x_train and x_test are views of x
    return Dataset(x_train, y[:train_size], x_test, y[train_size:], 10, (3, 32, 32), "cifar10")


@DATASETS.register("hdf5")
def load_hdf5(*, path, test_fraction=0.2, seed=0):
    """Features 'X' and integer labels 'y' from an HDF5 file, as stored (cast to float32).

    The test set is 'X_test'/'y_test' when the file has them, else a seeded
    stratified split of test_fraction of the samples.
    """
    path = absolute(path)
    if not path.is_file():
        raise UserError(f"HDF5 file {path} not found: set path to an HDF5 file holding "
                        f"datasets 'X' and 'y' (nothing is downloaded at run time)")
    try:
        with h5py.File(path, "r") as file:
            names = sorted(file.keys())
            arrays = {name: file[name][()] for name in ("X", "y", "X_test", "y_test")
                      if name in file and isinstance(file[name], h5py.Dataset)}
    except OSError as err:
        raise UserError(f"cannot read {path} as HDF5 ({err}): "
                        f"point path at a valid HDF5 file") from None
    for name in ("X", "y"):
        if name not in arrays:
            raise UserError(f"HDF5 file {path} has no dataset {name!r} (found: "
                            f"{', '.join(names) or 'nothing'}): store features as 'X' "
                            f"and integer labels as 'y'")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise UserError(f"HDF5 file {path} has only one of 'X_test' and 'y_test': "
                        f"store both or neither")
    pairs = [("X", "y")] + ([("X_test", "y_test")] if "X_test" in arrays else [])
    for x_name, y_name in pairs:
        x, y = arrays[x_name], arrays[y_name]
        if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"HDF5 file {path}: {x_name!r} has shape {x.shape} and {y_name!r} "
                            f"has shape {y.shape}: store one label per sample ('{y_name}' 1-D, "
                            f"same length as '{x_name}')")
        if not np.issubdtype(y.dtype, np.number) or np.any(y < 0) or np.any(y != np.round(y)):
            raise UserError(f"HDF5 file {path}: {y_name!r} must hold class indices 0, 1, ...: "
                            f"store integer labels")
    if "X_test" in arrays and arrays["X_test"].shape[1:] != arrays["X"].shape[1:]:
        raise UserError(f"HDF5 file {path}: 'X_test' samples have shape "
                        f"{arrays['X_test'].shape[1:]}, 'X' samples {arrays['X'].shape[1:]}: "
                        f"store both with the same per-sample shape")
    x = arrays["X"].reshape(len(arrays["X"]), -1) if arrays["X"].ndim == 1 else arrays["X"]
    y = arrays["y"].astype(np.int64)
    if "X_test" in arrays:
        x_test = arrays["X_test"].reshape(len(arrays["X_test"]), *x.shape[1:])
        train = np.arange(len(y))
        test = np.arange(len(y), len(y) + len(x_test))
        x = np.concatenate([x, x_test])
        y = np.concatenate([y, arrays["y_test"].astype(np.int64)])
    else:
        train, test = split_train_test(y, require_fraction("test_fraction", test_fraction), seed)
    return dataset_from_arrays("hdf5", x, y, train, test, y.max() + 1)


@DATASETS.register("mnist1d")
def load_mnist1d(*, num_samples=5000, test_fraction=0.2, seed=0, cache=None):
    """MNIST-1D (Greydanus & Kobak, ICML 2024), generated offline: shape (N, 1, 40), 10 classes.

    mnist1d.data.make_dataset with the package's default arguments except
    num_samples and seed; it makes num_samples // 10 samples per class, and
    the last test_fraction of its shuffled samples is the test set (its
    train_split = 1 - test_fraction). `cache`: a folder; the first load stores
    the arrays there (mnist1d-<hash>.h5) and later loads read that file
    without importing mnist1d. See docs/datasets.md.
    """
    num_samples = checks.integer("num_samples", num_samples, 10)
    test_fraction = require_fraction("test_fraction", test_fraction)
    seed = checks.integer("seed", seed, 0)
    if seed >= 2**32:  # the package seeds numpy's legacy generator
        raise UserError(f"seed must be below 2**32 for mnist1d (got {seed}): set a smaller seed")
    if cache is None:
        x, y = generate_mnist1d(num_samples, seed)
    elif isinstance(cache, (str, os.PathLike)):
        x, y = cached_mnist1d(absolute(cache), num_samples, seed)
    else:
        raise UserError(f"cache must be a folder path (got {cache!r}): set cache to a folder "
                        f"such as /scratch/mnist1d-cache, or leave it unset")
    split = int(len(y) * (1 - test_fraction))  # the package's train/test rule
    if split == 0 or split == len(y):
        raise UserError(f"test_fraction={test_fraction} leaves an empty train or test set for "
                        f"{len(y)} samples: choose a test_fraction nearer 0.2 or more num_samples")
    return dataset_from_arrays("mnist1d", x, y, np.arange(split), np.arange(split, len(y)), 10)


def mnist1d_version():
    # From the installed metadata: cheap, and it imports nothing.
    try:
        return importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(MNIST1D_MISSING) from None


def generate_mnist1d(num_samples, seed):
    """(float32 x (N, 1, 40), int64 y) from mnist1d's make_dataset, train and test in its order."""
    try:
        # Imported here only: it pulls in matplotlib, scipy and requests (seconds).
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise UserError(MNIST1D_MISSING) from None
    args = get_dataset_args()  # an attribute object: make_dataset reads args.seed etc.
    args.num_samples, args.seed = num_samples, seed
    # make_dataset reseeds numpy's and Python's global generators: put them back.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def cached_mnist1d(folder, num_samples, seed):
    """generate_mnist1d's arrays, read from folder or generated and stored there once."""
    # The package's version is part of the key: another version may generate other data.
    # The split is not: one file serves every test_fraction.
    key = json.dumps({"num_samples": num_samples, "seed": seed, "mnist1d": mnist1d_version()},
                     sort_keys=True)
    path = folder / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.h5"
    if not path.is_file():
        x, y = generate_mnist1d(num_samples, seed)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create mnist1d cache folder {folder} ({one_line(err)}): "
                            f"set cache to a writable folder") from None
        # Atomic: ranks that generate at once each rename a complete file onto path.
        with atomic_h5(path) as file:
            file.attrs["format"] = MNIST1D_CACHE_FORMAT
            file.attrs["key"] = key
            file.create_dataset("x", data=x)
            file.create_dataset("y", data=y)
        return x, y
    fix = "delete it and load again to regenerate it"
    try:
        with h5py.File(path, "r", locking=False) as file:
            stored_format, stored_key = file.attrs.get("format"), file.attrs.get("key")
            x, y = file["x"][()], file["y"][()]
    except (OSError, KeyError) as err:
        raise UserError(f"cannot read mnist1d cache file {path} ({one_line(err)}): "
                        f"{fix}") from None
    if stored_format != MNIST1D_CACHE_FORMAT or stored_key != key:
        raise UserError(f"mnist1d cache file {path} holds {stored_key}, not {key}: {fix}")
    if x.dtype != np.float32 or x.ndim != 3 or x.shape[:2] != (len(y), 1) or y.ndim != 1:
        raise UserError(f"mnist1d cache file {path} holds x {x.shape} {x.dtype} and y "
                        f"{y.shape}, expected (N, 1, 40) float32 and (N,): {fix}")
    return x, y
