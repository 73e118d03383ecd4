"""Dataset loaders on small files written in the real formats, partitions and shard loaders."""

import gzip
import importlib.metadata
import os
import pickle
import struct
import sys

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aau_mpi.training.datasets import DATASETS, Dataset, load_dataset
from aau_mpi.training.partitions import PARTITIONS, partition, shard_loader
from aau_mpi.base.errors import UserError


# ------------------------------------------------------------------ helpers

def write_idx(path, array, compress=False):
    """An IDX file: magic (0, 0, 0x08 = unsigned byte, ndim), big-endian sizes, then the data."""
    array = np.asarray(array, dtype=np.uint8)
    raw = (bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
           + array.tobytes())
    with (gzip.open if compress else open)(path, "wb") as stream:
        stream.write(raw)
    return path


def write_mnist(root, compress=False, train=12, test=6, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    suffix = ".gz" if compress else ""
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar(folder, per_batch=4, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as stream:
            pickle.dump(batch, stream)
        batches[name] = batch
    return batches


def write_hdf5(path, **arrays):
    with h5py.File(path, "w") as file:
        for name, array in arrays.items():
            file.create_dataset(name, data=array)
    return path


def check_dataset(dataset):
    assert isinstance(dataset, Dataset)
    for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == dataset.input_shape and len(x) == len(y) > 0
        assert 0 <= int(y.min()) and int(y.max()) < dataset.num_classes


# -------------------------------------------------------------------- mnist

@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress)
    dataset = load_dataset("mnist", {"root": str(tmp_path)})
    check_dataset(dataset)
    assert dataset.x_train.shape == (12, 1, 28, 28) and dataset.x_test.shape == (6, 1, 28, 28)
    assert dataset.num_classes == 10 and dataset.input_shape == (1, 28, 28)
    images, labels = arrays["train"]
    assert torch.allclose(dataset.x_train[:, 0], torch.from_numpy(images / 255).float())
    assert torch.equal(dataset.y_test, torch.from_numpy(arrays["t10k"][1].astype(np.int64)))
    assert torch.equal(dataset.y_train, torch.from_numpy(labels.astype(np.int64)))


def test_mnist_missing_dir_names_path_and_source(tmp_path):
    root = tmp_path / "no" / "mnist"
    with pytest.raises(UserError) as error:
        load_dataset("mnist", {"root": str(root)})
    message = str(error.value)
    assert str(root) in message and "yann.lecun.com/exdb/mnist" in message
    assert "nothing is downloaded" in message and "\n" not in message


def test_mnist_missing_test_files_names_the_file(tmp_path):
    write_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", {"root": tmp_path})


def test_mnist_truncated_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated") as error:
        load_dataset("mnist", {"root": tmp_path})
    assert str(path) in str(error.value)


def test_mnist_truncated_header(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(UserError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", {"root": tmp_path})


def test_mnist_truncated_gzip(tmp_path):
    write_mnist(tmp_path, compress=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", {"root": tmp_path})


def test_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 3  # claims 3 dimensions: an images file where labels belong
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="magic") as error:
        load_dataset("mnist", {"root": tmp_path})
    assert str(path) in str(error.value)


def test_mnist_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(UserError, match="12 images"):
        load_dataset("mnist", {"root": tmp_path})


# ------------------------------------------------------------------ cifar10

@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_reads_pickle_batches(tmp_path, nested):
    batches = write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    dataset = load_dataset("cifar10", {"root": str(tmp_path)})
    check_dataset(dataset)
    assert dataset.x_train.shape == (20, 3, 32, 32) and dataset.x_test.shape == (4, 3, 32, 32)
    assert dataset.input_shape == (3, 32, 32) and dataset.num_classes == 10
    train_pixels = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    scaled = train_pixels.reshape(-1, 3, 32, 32) / 255.0
    mean = scaled.mean(axis=(0, 2, 3), keepdims=True)
    std = scaled.std(axis=(0, 2, 3), keepdims=True, ddof=1)
    assert np.allclose(dataset.x_train.numpy(), (scaled - mean) / std, atol=1e-4)
    test_scaled = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32) / 255.0
    assert np.allclose(dataset.x_test.numpy(), (test_scaled - mean) / std, atol=1e-4)
    assert dataset.y_test.tolist() == batches["test_batch"][b"labels"]
    assert dataset.y_train[:4].tolist() == batches["data_batch_1"][b"labels"]


def test_cifar10_missing_names_path_and_source(tmp_path):
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", {"root": tmp_path / "cifar"})
    message = str(error.value)
    assert str(tmp_path / "cifar") in message and "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message


def test_cifar10_missing_batch_names_it(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3"):
        load_dataset("cifar10", {"root": tmp_path})


def test_cifar10_corrupt_batch(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", {"root": tmp_path})


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_batch_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as stream:
        pickle.dump({b"data": RunsCode(), b"labels": []}, stream)
    with pytest.raises(UserError, match="refusing to load"):
        load_dataset("cifar10", {"root": tmp_path})


# --------------------------------------------------------------------- hdf5

def test_hdf5_with_seeded_split(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 3, 4)), np.arange(50) % 5
    path = write_hdf5(tmp_path / "data.h5", X=x, y=y)
    dataset = load_dataset("hdf5", {"path": str(path), "test_fraction": 0.2, "seed": 3})
    check_dataset(dataset)
    assert len(dataset.x_train) == 40 and len(dataset.x_test) == 10
    assert dataset.input_shape == (3, 4) and dataset.num_classes == 5
    again = load_dataset("hdf5", {"path": str(path), "test_fraction": 0.2, "seed": 3})
    assert torch.equal(dataset.x_test, again.x_test)
    all_x = torch.cat([dataset.x_train, dataset.x_test]).reshape(50, -1)
    assert sorted(map(tuple, all_x.tolist())) == sorted(map(tuple, x.astype(np.float32)
                                                            .reshape(50, -1).tolist()))


def test_hdf5_with_stored_test_set(tmp_path):
    path = write_hdf5(tmp_path / "data.h5", X=np.ones((6, 2)), y=[0, 1, 2, 0, 1, 2],
                      X_test=np.zeros((3, 2)), y_test=[3, 0, 1])
    dataset = load_dataset("hdf5", {"path": path})
    check_dataset(dataset)
    assert len(dataset.x_train) == 6 and len(dataset.x_test) == 3
    assert dataset.num_classes == 4 and dataset.y_test.tolist() == [3, 0, 1]
    assert dataset.x_test.abs().sum() == 0


@pytest.mark.parametrize("arrays, expected", [
    ({"X": np.ones((4, 2))}, "no dataset 'y'"),
    ({"features": np.ones((4, 2)), "y": np.zeros(4)}, "no dataset 'X'.*features"),
    ({"X": np.ones((4, 2)), "y": np.zeros(3)}, "same length"),
    ({"X": np.ones((4, 2)), "y": np.zeros(4), "X_test": np.ones((2, 2))}, "both or neither"),
    ({"X": np.ones((4, 2)), "y": np.zeros(4), "X_test": np.ones((2, 2)), "y_test": np.zeros(3)},
     "same length"),
    ({"X": np.ones((4, 2)), "y": np.full(4, 0.5)}, "integer labels"),
])
def test_hdf5_bad_contents(tmp_path, arrays, expected):
    path = write_hdf5(tmp_path / "bad.h5", **arrays)
    with pytest.raises(UserError, match=expected):
        load_dataset("hdf5", {"path": path})


def test_hdf5_missing_or_not_hdf5(tmp_path):
    with pytest.raises(UserError) as error:
        load_dataset("hdf5", {"path": tmp_path / "absent.h5"})
    assert str(tmp_path / "absent.h5") in str(error.value)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="text.h5"):
        load_dataset("hdf5", {"path": tmp_path / "text.h5"})


# ------------------------------------------------------ synthetic and digits

def nearest_mean_accuracy(dataset):
    means = torch.stack([dataset.x_train[dataset.y_train == c].mean(0)
                         for c in range(dataset.num_classes)])
    predicted = torch.cdist(dataset.x_test, means).argmin(1)
    return (predicted == dataset.y_test).float().mean().item()


def test_synthetic_is_deterministic_per_seed():
    params = {"samples": 300, "features": 8, "classes": 3, "seed": 5}
    first, second = load_dataset("synthetic", params), load_dataset("synthetic", params)
    check_dataset(first)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    other = load_dataset("synthetic", {**params, "seed": 6})
    assert not torch.equal(first.x_train, other.x_train)
    assert first.input_shape == (8,) and first.num_classes == 3
    assert len(first.x_train) + len(first.x_test) == 300 and len(first.x_test) == 60


def test_synthetic_separation_controls_difficulty():
    params = {"samples": 1000, "features": 16, "classes": 5, "seed": 0}
    easy = nearest_mean_accuracy(load_dataset("synthetic", {**params, "separation": 10.0}))
    hard = nearest_mean_accuracy(load_dataset("synthetic", {**params, "separation": 0.5}))
    assert easy > 0.95 and hard < 0.6


def test_digits_bundled_file():
    dataset = load_dataset("digits")
    check_dataset(dataset)
    assert len(dataset.x_train) + len(dataset.x_test) == 1797
    assert dataset.num_classes == 10 and dataset.input_shape == (1, 8, 8)
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() == 1.0
    assert abs(len(dataset.x_test) - 0.2 * 1797) < 10
    assert set(dataset.y_test.tolist()) == set(range(10))  # stratified
    again = load_dataset("digits", {"seed": 0})
    assert torch.equal(dataset.y_test, again.y_test)
    assert not torch.equal(dataset.y_test, load_dataset("digits", {"seed": 1}).y_test)


@pytest.mark.parametrize("name, params, expected", [
    ("synthetic", {"sampels": 10}, "it takes: samples, features"),
    ("synthetic", {"samples": 0}, "samples must be an integer >= 2"),
    ("synthetic", {"test_fraction": 1.5}, "test_fraction"),
    ("synthetic", {"separation": "far"}, "separation must be a number"),
    ("digits", {"root": "x"}, "it takes: test_fraction, seed"),
    ("mnist", {}, "missing a required argument: 'root'"),
    ("hdf5", {"file": "x.h5"}, "it takes: path, test_fraction, seed"),
    ("mnsit", {}, "did you mean 'mnist'"),
    ("mnist1d", {"samples": 100}, "did you mean 'num_samples'"),
    ("mnist1d", {"num_samples": 9}, "num_samples must be an integer >= 10"),
    ("mnist1d", {"test_fraction": 0}, "test_fraction must be a number > 0"),
    ("mnist1d", {"seed": -1}, "seed must be an integer >= 0"),
    ("mnist1d", {"seed": 2**32}, "seed must be below 2\\*\\*32"),
    ("mnist1d", {"num_samples": 10, "test_fraction": 0.95}, "empty train or test set"),
    ("mnist1d", {"cache": 5}, "cache must be a folder path"),
])
def test_bad_loader_name_or_params(name, params, expected):
    with pytest.raises(UserError, match=expected) as error:
        load_dataset(name, params)
    assert "\n" not in str(error.value)


def test_registries_list_everything():
    assert DATASETS.names() == ["cifar10", "digits", "hdf5", "mnist", "mnist1d", "synthetic"]
    assert PARTITIONS.names() == ["dirichlet", "iid", "shards"]


# ------------------------------------------------------------------ mnist1d

def package_mnist1d(num_samples, seed, train_split=0.8):
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    return make_dataset(args)


def test_mnist1d_is_the_packages_data_as_float32_sequences():
    dataset = load_dataset("mnist1d", {"num_samples": 200, "seed": 3})
    check_dataset(dataset)
    assert dataset.input_shape == (1, 40) and dataset.num_classes == 10
    assert dataset.x_train.shape == (160, 1, 40) and dataset.x_test.shape == (40, 1, 40)
    reference = package_mnist1d(200, 3)
    assert torch.equal(dataset.x_train[:, 0], torch.from_numpy(reference["x"]).float())
    assert torch.equal(dataset.x_test[:, 0], torch.from_numpy(reference["x_test"]).float())
    assert torch.equal(dataset.y_test, torch.from_numpy(reference["y_test"]))
    assert torch.bincount(torch.cat([dataset.y_train, dataset.y_test])).tolist() == [20] * 10


def test_mnist1d_is_deterministic_per_seed_and_keeps_global_generators():
    import random
    np.random.seed(123)
    random.seed(123)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    first = load_dataset("mnist1d", {"num_samples": 100})
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert random.getstate() == python_state
    second = load_dataset("mnist1d", {"num_samples": 100, "seed": 0})
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    other = load_dataset("mnist1d", {"num_samples": 100, "seed": 1})
    assert not torch.equal(first.x_train, other.x_train)


def test_mnist1d_test_fraction_is_the_packages_train_split():
    dataset = load_dataset("mnist1d", {"num_samples": 105, "test_fraction": 0.3})
    reference = package_mnist1d(105, 0, train_split=0.7)  # 105 // 10 per class: 100 samples
    assert len(dataset.y_train) == len(reference["y"]) == 70
    assert torch.equal(dataset.y_test, torch.from_numpy(reference["y_test"]))


def block_mnist1d_import(monkeypatch):
    for module in ("mnist1d", "mnist1d.data"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError


def test_mnist1d_cache_is_written_once_and_read_without_the_package(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "mnist1d"  # created on first use
    generated = load_dataset("mnist1d", {"num_samples": 100, "cache": str(cache)})
    (file,) = cache.iterdir()  # one file, no temp file left behind
    assert file.name.startswith("mnist1d-") and file.suffix == ".h5"
    block_mnist1d_import(monkeypatch)
    cached = load_dataset("mnist1d", {"num_samples": 100, "cache": cache})
    assert torch.equal(cached.x_train, generated.x_train)
    assert torch.equal(cached.y_test, generated.y_test)
    other_split = load_dataset("mnist1d", {"num_samples": 100, "test_fraction": 0.5,
                                           "cache": cache})
    assert len(other_split.y_test) == 50 and list(cache.iterdir()) == [file]
    with pytest.raises(UserError, match="pip install mnist1d"):
        load_dataset("mnist1d", {"num_samples": 100, "seed": 1, "cache": cache})


def test_mnist1d_cache_file_per_generation_arguments(tmp_path):
    for params in ({"num_samples": 20}, {"num_samples": 30}, {"num_samples": 20, "seed": 1}):
        load_dataset("mnist1d", {**params, "cache": tmp_path})
    assert len(list(tmp_path.glob("mnist1d-*.h5"))) == 3


def test_mnist1d_bad_cache_file_says_delete_it(tmp_path):
    load_dataset("mnist1d", {"num_samples": 20, "cache": tmp_path})
    (file,) = tmp_path.iterdir()
    file.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="delete it") as error:
        load_dataset("mnist1d", {"num_samples": 20, "cache": tmp_path})
    assert str(file) in str(error.value) and "\n" not in str(error.value)


def test_mnist1d_missing_package_names_the_fix(monkeypatch, tmp_path):
    block_mnist1d_import(monkeypatch)
    with pytest.raises(UserError, match="^data.name mnist1d needs the mnist1d package: "
                                        "pip install mnist1d$"):
        load_dataset("mnist1d", {"num_samples": 20})

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(UserError, match="pip install mnist1d"):
        load_dataset("mnist1d", {"num_samples": 20, "cache": tmp_path})


# --------------------------------------------------------------- partitions

def check_partition(parts, num_samples, num_parts):
    assert len(parts) == num_parts
    assert all(len(part) > 0 and part.dtype == np.int64 for part in parts)
    everything = np.concatenate(parts)
    assert len(everything) == num_samples  # disjoint ...
    assert np.array_equal(np.sort(everything), np.arange(num_samples))  # ... and complete


@settings(max_examples=150, deadline=None)
@given(scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
       num_parts=st.integers(1, 16), num_classes=st.integers(1, 10),
       extra=st.integers(0, 300), alpha=st.floats(0.01, 10.0),
       classes_per_part=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_partition_is_disjoint_complete_nonempty(scheme, num_parts, num_classes, extra, alpha,
                                                 classes_per_part, seed):
    num_samples = num_parts * classes_per_part + extra
    labels = np.random.default_rng(seed).integers(0, num_classes, num_samples)
    params = {"dirichlet": {"alpha": alpha},
              "shards": {"classes_per_part": classes_per_part}}.get(scheme, {})
    parts = partition(labels, num_parts, scheme, seed=seed, **params)
    check_partition(parts, num_samples, num_parts)
    again = partition(labels.copy(), num_parts, scheme, seed=seed, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_parts_have_near_equal_sizes():
    sizes = [len(part) for part in partition(np.zeros(103), 10, "iid", seed=1)]
    assert max(sizes) - min(sizes) <= 1


def mean_label_entropy(labels, parts):
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=10)
        p = counts[counts > 0] / len(part)
        entropies.append(-(p * np.log(p)).sum())
    return np.mean(entropies)


def test_small_alpha_dirichlet_is_skewed():
    labels = np.arange(2000) % 10
    iid = mean_label_entropy(labels, partition(labels, 8, "iid", seed=0))
    skewed = mean_label_entropy(labels, partition(labels, 8, "dirichlet", alpha=0.05, seed=0))
    assert skewed < 0.5 * iid


def test_dirichlet_tiny_alpha_still_nonempty():
    labels = np.arange(40) % 2
    check_partition(partition(labels, 16, "dirichlet", alpha=1e-3, seed=0), 40, 16)


def test_shards_give_each_part_few_classes():
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 10, "shards", classes_per_part=2, seed=0)
    assert all(len(np.unique(labels[part])) <= 2 for part in parts)


def test_partition_seed_changes_result():
    labels = np.arange(100) % 4
    first = partition(labels, 4, "iid", seed=0)
    assert not all(np.array_equal(a, b) for a, b in zip(first, partition(labels, 4, "iid", seed=1)))


@pytest.mark.parametrize("scheme, params, expected", [
    ("dirichlet", {"alpha": 0}, "alpha must be a number > 0"),
    ("dirichlet", {"alpha": -1.0}, "alpha must be a number > 0"),
    ("shards", {"classes_per_part": 20}, "cannot cut 100 samples into 200 shards"),
    ("iid", {"alpha": 0.5}, "it takes: no parameters"),
    ("dirichlet", {"alhpa": 0.5}, "it takes: alpha"),
    ("dirchlet", {}, "did you mean 'dirichlet'"),
])
def test_partition_bad_params(scheme, params, expected):
    with pytest.raises(UserError, match=expected):
        partition(np.arange(100) % 10, 10, scheme, **params)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_more_parts_than_samples(scheme):
    with pytest.raises(UserError, match="cannot split 3 samples into 4.*use fewer ranks"):
        partition(np.zeros(3), 4, scheme)


@pytest.mark.parametrize("scheme, params", [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 0.01}),
    ("shards", {"classes_per_part": 2}),
    ("shards", {"classes_per_part": 7}),  # 448 shards of 500 samples
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_64_parts_of_500_samples_are_all_nonempty(scheme, params, seed):
    labels = np.random.default_rng(seed).integers(0, 10, 500)
    check_partition(partition(labels, 64, scheme, seed=seed, **params), 500, 64)


def test_dirichlet_one_class_many_parts_nonempty():
    check_partition(partition(np.zeros(64, dtype=int), 64, "dirichlet", alpha=0.1), 64, 64)


def test_shards_too_many_for_the_samples_names_the_fixes():
    with pytest.raises(UserError, match="500 samples into 512 shards.*more samples"):
        partition(np.arange(500) % 10, 64, "shards", classes_per_part=8)


# ------------------------------------------------------------- shard loader

def make_loader(batch_size=4, seed=7, samples=10):
    x = torch.arange(samples * 2, dtype=torch.float32).reshape(samples, 2)
    y = torch.arange(samples)
    indices = np.arange(0, samples, 2)  # the rank's shard: even samples
    return shard_loader(x, y, indices, batch_size, seed=seed)


def test_shard_loader_covers_shard_each_epoch_and_reshuffles():
    loader = make_loader(batch_size=5)
    epochs = [next(loader)[1].tolist() for _ in range(4)]
    assert all(sorted(epoch) == [0, 2, 4, 6, 8] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    x, y = next(loader)
    assert torch.equal(x[:, 0], 2 * y.float())  # features stay with their labels


def test_shard_loader_batches_span_epochs_and_small_shards():
    loader = make_loader(batch_size=12)  # shard has 5 samples
    x, y = next(loader)
    assert x.shape == (12, 2) and sorted(y[:10].tolist()) == sorted([0, 2, 4, 6, 8] * 2)


def test_shard_loader_resume_gives_identical_batches():
    loader = make_loader(batch_size=3)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    assert all(isinstance(value, int) for value in state.values())
    expected = [next(loader) for _ in range(6)]
    resumed = make_loader(batch_size=3)
    resumed.load_state_dict(dict(state))
    for (x, y), (x_expected, y_expected) in zip((next(resumed) for _ in range(6)), expected):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_shard_loader_rejects_state_of_other_shard():
    state = make_loader(samples=10).state_dict()
    with pytest.raises(UserError, match="same dataset"):
        make_loader(samples=12).load_state_dict(state)
