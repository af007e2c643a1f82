"""The ``Dataset`` every experiment trains on: images (N, C, H, W) and integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """A data spec, folder or file that is not what the lab expects.

    Its message is one line that starts with the file (or folder) at fault, then the problem.
    """


def check_labels(labels: object, source: str, classes: int) -> np.ndarray:
    """``labels`` as an int64 array, if they are a flat sequence of integers in 0..classes-1.

    Floats, strings, bools and integers too large for int64 are refused rather than converted:
    a file that holds them is not the data set it claims to be.
    """
    try:
        array = np.asarray(labels)
    except (ValueError, TypeError) as error:  # ragged nesting
        raise DataError(f"{source}: labels are not a flat list of integers ({error})") from None
    if array.ndim != 1:
        raise DataError(f"{source}: expected labels of shape (N,), got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise DataError(f"{source}: expected integer labels, got {array.dtype} values")
    outside = np.flatnonzero((array < 0) | (array >= classes))
    if outside.size:
        index = int(outside[0])
        raise DataError(
            f"{source}: label {array[index]} at position {index} is outside 0..{classes - 1} "
            f"({outside.size} of the {array.size} labels are)"
        )
    return array.astype(np.int64)


def check_training_size(count: int, min_train: int, source: str) -> None:
    """Refuse a training set that cannot fill one batch of ``min_train`` images."""
    if count < min_train:
        raise DataError(
            f"{source}: {count} training images, fewer than one batch of {min_train} "
            "(the largest batch the chosen experiments train on)"
        )


@dataclass(frozen=True)
class Dataset:
    """Standardized float32 images and int64 labels, split into train and test.

    ``train_images`` has shape (N, C, H, W); ``train_vectors`` is the same data flattened for MLPs.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def input_size(self) -> int:
        channels, height, width = self.image_shape
        return channels * height * width

    @property
    def train_vectors(self) -> torch.Tensor:
        return self.train_images.flatten(1)

    @property
    def test_vectors(self) -> torch.Tensor:
        return self.test_images.flatten(1)

    def subset(self, train: int, test: int) -> Dataset:
        """At most ``train``/``test`` examples, drawn by a fixed shuffle (the same every time)."""
        if len(self.train_labels) <= train and len(self.test_labels) <= test:
            return self
        generator = torch.Generator().manual_seed(0)
        train_index = torch.randperm(len(self.train_labels), generator=generator)[:train]
        test_index = torch.randperm(len(self.test_labels), generator=generator)[:test]
        return Dataset(
            name=f"{self.name} (fixed subset)",
            train_images=self.train_images[train_index],
            train_labels=self.train_labels[train_index],
            test_images=self.test_images[test_index],
            test_labels=self.test_labels[test_index],
            classes=self.classes,
        )

    def describe(self) -> str:
        channels, height, width = self.image_shape
        return (
            f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test images, "
            f"{channels}x{height}x{width}, {self.classes} classes"
        )


def make_dataset(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    classes: int | None = None,
) -> Dataset:
    """Standardize per channel with the training set's mean and deviation, then wrap as tensors.

    Images come in as (N, C, H, W) arrays of any numeric type; labels as integer arrays in
    0..classes-1 (``classes`` defaults to the largest label plus one).
    """
    train = train_images.astype(np.float64)
    axes = (0, 2, 3)
    mean = train.mean(axis=axes, keepdims=True)
    deviation = train.std(axis=axes, keepdims=True) + 1e-8

    def standardize(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((images.astype(np.float64) - mean) / deviation).astype(np.float32))

    if classes is None:
        classes = int(max(train_labels.max(), test_labels.max())) + 1
    return Dataset(
        name=name,
        train_images=standardize(train_images),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)),
        test_images=standardize(test_images),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)),
        classes=classes,
    )
