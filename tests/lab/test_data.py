"""The data loaders on the bundled digits and on tiny files written in the real formats."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from batchnorm.lab.data import DataError, describe_spec, load_data
from batchnorm.lab.data.cifar import read_batch
from batchnorm.lab.data.idx import read_idx
from tests.lab.conftest import make_cifar_folder, make_idx_folder


def test_digits_fixed_stratified_split():
    data = load_data("digits")
    assert data.image_shape == (1, 8, 8)
    assert (len(data.train_labels), len(data.test_labels)) == (1257, 540)
    assert data.train_vectors.shape == (1257, 64)
    counts = torch.bincount(data.test_labels, minlength=10)
    assert counts.min() >= 50 and counts.max() <= 56  # stratified: about 54 per class
    assert abs(float(data.train_images.mean())) < 1e-4  # standardized on the training set
    again = load_data("digits")
    assert torch.equal(again.test_labels, data.test_labels)


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_idx_folders_read_back(tmp_path, gzipped, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = make_idx_folder(folder, gzipped, shape=(28, 28))
    data = load_data(f"fashion-mnist:{tmp_path}")
    assert data.image_shape == (1, 28, 28) and data.classes == 10
    assert data.train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    raw = arrays["train-images-idx3-ubyte"].astype(np.float64)
    expected = (raw - raw.mean()) / (raw.std() + 1e-8)
    np.testing.assert_allclose(data.train_images[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_mnist_torchvision_layout(tmp_path):
    make_idx_folder(tmp_path / "MNIST" / "raw", gzipped=True, shape=(28, 28))
    assert load_data(f"mnist:{tmp_path}").classes == 10


def test_idx_images_must_be_28x28(tmp_path):
    make_idx_folder(tmp_path, gzipped=False, shape=(6, 5))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: expected 28x28 images"):
        load_data(f"mnist:{tmp_path}")


def test_classes_are_ten_even_when_the_last_is_absent(tmp_path):
    make_idx_folder(tmp_path, gzipped=False, shape=(28, 28))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1, 0, 0, 0, 20]) + bytes((np.arange(20) % 3).tolist())
    )
    assert load_data(f"mnist:{tmp_path}").classes == 10


def test_a_training_set_must_hold_one_batch(tmp_path):
    make_idx_folder(tmp_path, gzipped=True, train=20, shape=(28, 28))
    assert len(load_data(f"mnist:{tmp_path}", min_train=20).train_labels) == 20
    with pytest.raises(DataError, match="20 training images, fewer than one batch of 21"):
        load_data(f"mnist:{tmp_path}", min_train=21)
    with pytest.raises(DataError, match="^digits: 1257 training images"):
        load_data("digits", min_train=5000)


def test_largest_batch_size_of_the_experiment_configs():
    from batchnorm.lab.data import largest_batch_size
    from batchnorm.lab.experiments import EXPERIMENTS

    assert largest_batch_size(e.config(quick=True) for e in EXPERIMENTS.values()) == 128
    assert largest_batch_size(e.config() for e in EXPERIMENTS.values()) == 128
    assert largest_batch_size([]) == 1


def test_idx_errors_say_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"mnist:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_data(f"mnist:{tmp_path}")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # declares 5 bytes, holds 2
    with pytest.raises(DataError, match="expected 5 bytes"):
        read_idx(bad)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(garbage)
    wrong_type = tmp_path / "float.gz"
    wrong_type.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd"))
    with pytest.raises(DataError, match="unsigned-byte"):
        read_idx(wrong_type)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_folders_read_back(tmp_path, layout, protocol):
    folder = tmp_path if layout == "flat" else tmp_path / "cifar-10-batches-py"
    batches = make_cifar_folder(folder, protocol=protocol)
    data = load_data(f"cifar10:{tmp_path}")
    assert data.image_shape == (3, 32, 32)
    assert len(data.train_labels) == 20 and len(data.test_labels) == 4
    assert data.test_labels.tolist() == batches["test_batch"][b"labels"]
    images, _ = read_batch(folder / "test_batch")
    assert np.array_equal(images.reshape(4, -1), batches["test_batch"][b"data"])


def test_cifar_errors_say_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="data_batch_1"):
        load_data(f"cifar10:{tmp_path}")
    make_cifar_folder(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch"):
        load_data(f"cifar10:{tmp_path}")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagenet:/x", "unknown data 'imagenet:/x': expected one of digits, mnist"),
        ("mnist", "needs a folder"),
        ("digits:/x", "takes no path"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        describe_spec(spec)


def test_large_sets_are_cut_to_a_fixed_subset():
    data = load_data("digits")
    small = data.subset(100, 30)
    assert (len(small.train_labels), len(small.test_labels)) == (100, 30)
    assert torch.equal(small.train_images, data.subset(100, 30).train_images)
    assert "fixed subset" in small.describe()
    assert data.subset(5000, 5000) is data
