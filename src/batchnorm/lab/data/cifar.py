"""CIFAR-10 from the standard python batches, loaded with the restricted unpickler.

The folder may be ``cifar-10-batches-py`` itself or its parent (the torchvision layout).

Every batch is checked before it is used: at most ``MAX_BATCH_BYTES`` on disk (a real one is
31 MB), unpickled without running code, a dict whose ``b'data'`` is an integer array of shape
(N, 3072) with values in 0..255 and N >= 1, and whose ``b'labels'`` are N integers in 0..9.
``batches.meta`` is not needed, but when it is there it must be a dict of 10 label names.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from batchnorm.lab.data.dataset import (
    DataError,
    Dataset,
    check_labels,
    check_training_size,
    make_dataset,
)
from batchnorm.lab.data.files import check_file, find_files
from batchnorm.lab.data.unpickler import UnsafePickleError, restricted_loads

TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
FOLDER = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10
# A real batch is 31 MB; a larger file is not one, and unpickling it could take far more memory.
MAX_BATCH_BYTES = 64 << 20


def find_cifar_files(path: Path) -> dict[str, Path]:
    """The six batch files, in ``path`` or in ``path/cifar-10-batches-py``."""
    names = (*TRAIN_BATCHES, TEST_BATCH)
    return find_files(
        "cifar10",
        path,
        [path, path / FOLDER],
        {name: (name,) for name in names},
        f"the python batches: expected {', '.join(names)} in it or in {FOLDER}/ under it",
    )


def _unpickle(path: Path, what: str):
    """A file's unpickled contents, refusing large files, code and garbled pickles."""
    check_file(path)
    try:
        size = path.stat().st_size
        if size > MAX_BATCH_BYTES:
            raise DataError(
                f"{path}: {size} bytes, more than the {MAX_BATCH_BYTES >> 20} MiB {what} "
                "may hold (a real batch is 31 MB)"
            )
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    try:
        return restricted_loads(raw, source=str(path))
    except UnsafePickleError:
        raise
    except Exception as error:  # a truncated or garbled pickle raises many kinds of errors
        raise DataError(f"{path}: not a readable {what} ({error!r})") from None


def _entry(batch: dict, key: str):
    return batch.get(key.encode(), batch.get(key))


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    batch = _unpickle(path, "CIFAR-10 batch")
    if not isinstance(batch, dict):
        raise DataError(
            f"{path}: expected a dict with b'data' and b'labels', got {type(batch).__name__}"
        )
    data, labels = _entry(batch, "data"), _entry(batch, "labels")
    size = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != size:
        shape = data.shape if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise DataError(f"{path}: expected b'data' of shape (N, {size}), an array, got {shape}")
    if data.dtype.kind not in "iu":
        raise DataError(f"{path}: expected b'data' of bytes 0..255, got dtype {data.dtype}")
    if len(data) == 0:
        raise DataError(f"{path}: holds no images")
    low, high = int(data.min()), int(data.max())
    if low < 0 or high > 255:
        raise DataError(f"{path}: b'data' holds values from {low} to {high}, outside 0..255")
    if labels is None:
        raise DataError(f"{path}: no b'labels' beside b'data'")
    labels = check_labels(labels, str(path), CLASSES)
    if len(labels) != len(data):
        raise DataError(f"{path}: holds {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, *IMAGE_SHAPE).astype(np.uint8), labels


def check_meta(path: Path) -> None:
    """``batches.meta``, if present: a dict whose b'label_names' are the 10 class names."""
    meta = _unpickle(path, "CIFAR-10 batches.meta")
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a dict with b'label_names', got {type(meta).__name__}")
    names = _entry(meta, "label_names")
    if not isinstance(names, list) or len(names) != CLASSES:
        count = len(names) if isinstance(names, list) else type(names).__name__
        raise DataError(
            f"{path}: expected b'label_names' to list {CLASSES} label names, got {count}"
        )


def load_cifar10(path: Path, min_train: int = 1) -> Dataset:
    """The train and test split as 3x32x32 images; training needs ``min_train`` images."""
    files = find_cifar_files(path)
    folder = files[TEST_BATCH].parent
    if os.path.lexists(folder / META):  # a dangling link or loop is refused too
        check_meta(folder / META)
    train = [read_batch(files[name]) for name in TRAIN_BATCHES]
    test_images, test_labels = read_batch(files[TEST_BATCH])
    train_images = np.concatenate([images for images, _ in train])
    check_training_size(len(train_images), min_train, f"{folder} (data_batch_1..5)")
    return make_dataset(
        "cifar10",
        train_images,
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
        classes=CLASSES,
    )
