"""CIFAR-10 from the standard python batches, loaded with the restricted unpickler.

The folder may be ``cifar-10-batches-py`` itself or its parent (the torchvision layout).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from batchnorm.lab.data.dataset import DataError, Dataset, make_dataset
from batchnorm.lab.data.unpickler import restricted_loads

TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)


def find_cifar_folder(path: Path) -> Path:
    for folder in (path, path / FOLDER):
        if all((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
            return folder
    if not path.is_dir():
        raise DataError(f"cifar10: folder '{path}' does not exist")
    expected = ", ".join((*TRAIN_BATCHES, TEST_BATCH))
    raise DataError(
        f"cifar10: '{path}' does not hold the python batches: expected {expected} "
        f"in it or in {FOLDER}/ under it"
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (images (N, 3, 32, 32) uint8, labels (N,))."""
    try:
        batch = restricted_loads(path.read_bytes(), source=str(path))
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # a truncated or garbled pickle raises many kinds of errors
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({error!r})") from error
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {type(batch)}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    size = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != size:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: expected b'data' of shape (N, {size}), got {shape}")
    if labels is None or len(labels) != len(data):
        raise DataError(f"{path}: expected b'labels' with one label per image ({len(data)})")
    return data.reshape(-1, *IMAGE_SHAPE).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def load_cifar10(path: Path) -> Dataset:
    folder = find_cifar_folder(path)
    train = [read_batch(folder / name) for name in TRAIN_BATCHES]
    test_images, test_labels = read_batch(folder / TEST_BATCH)
    return make_dataset(
        "cifar10",
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )
