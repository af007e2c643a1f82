"""Train / validation / test: the validation part comes from the training set, stratified, fixed;
MNIST-1D is generated offline from the mnist1d package's defaults."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from batchnorm.lab.data import describe_spec
from batchnorm.lab.data.dataset import DataError, Dataset
from batchnorm.lab.data.splits import load_splits, split_validation


def _dataset(train: int, test: int, classes: int = 4) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset(
        name="toy",
        train_images=torch.arange(train, dtype=torch.float32).reshape(train, 1, 1, 1),
        train_labels=torch.randint(0, classes, (train,), generator=generator),
        test_images=torch.zeros(test, 1, 1, 1),
        test_labels=torch.zeros(test, dtype=torch.long),
        classes=classes,
    )


def test_validation_is_carved_from_training_stratified_and_fixed():
    dataset = _dataset(400, 50)
    splits = split_validation(dataset)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (320, 80, 50)
    train_ids = set(splits.train.images.flatten().tolist())
    validation_ids = set(splits.validation.images.flatten().tolist())
    assert not train_ids & validation_ids and len(train_ids | validation_ids) == 400
    assert torch.equal(splits.test.images, dataset.test_images)  # the test part is untouched
    for label in range(4):
        everywhere = int((dataset.train_labels == label).sum())
        held = int((splits.validation.labels == label).sum())
        assert held == round(0.2 * everywhere)
    again = split_validation(dataset)
    assert torch.equal(again.validation.images, splits.validation.images)
    assert "320 train / 80 validation / 50 test" in splits.describe()


def test_too_few_training_examples_is_a_data_error():
    with pytest.raises(DataError, match="too few"):
        split_validation(_dataset(2, 2, classes=2))
    with pytest.raises(DataError, match="fewer than one batch of 2000"):
        load_splits("digits", min_train=2000)


def test_digits_splits():
    splits = load_splits("digits")
    assert splits.sizes() == {"train": 1007, "validation": 250, "test": 540}
    assert describe_spec("digits") == {"name": "digits", "path": None}


def test_mnist1d_is_generated_offline_with_its_published_sizes(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    numpy_before = np.random.get_state()[1].copy()
    python_before = random.getstate()
    from batchnorm.lab.data.mnist1d import load_mnist1d

    load_mnist1d.cache_clear()
    dataset = load_mnist1d()
    assert (np.random.get_state()[1] == numpy_before).all()  # global RNGs left as they were
    assert random.getstate() == python_before
    assert dataset.train_images.shape == (4000, 1, 1, 40)
    assert dataset.test_images.shape == (1000, 1, 1, 40)
    assert dataset.classes == 10
    assert sorted(torch.bincount(dataset.test_labels).tolist())[0] > 80  # all ten classes
    splits = load_splits("mnist1d")
    assert splits.sizes() == {"train": 3200, "validation": 800, "test": 1000}
    assert describe_spec("mnist1d") == {"name": "mnist1d", "path": None}
    with pytest.raises(DataError, match="data 'mnist1d' takes no path"):
        load_splits("mnist1d:/somewhere")
    # Deterministic: the same arrays every time.
    load_mnist1d.cache_clear()
    assert torch.equal(load_mnist1d().train_images, dataset.train_images)
