"""Train / validation / test: the validation part is carved from the training set, never the test.

Every choice an experiment makes (a learning rate, a run's length, any tuned value) is made on
the validation part; the test part is scored once per run, at its end, for the reported figure.
Tuning runs get the splits without their test part (:meth:`Splits.without_test`), so a choice
cannot even see the test set.
The carving is stratified by class and fixed (the same examples on every machine and every run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from batchnorm.lab.data.dataset import DataError, Dataset

VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class Part:
    """One split: images (N, C, H, W) and labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def vectors(self) -> torch.Tensor:
        return self.images.flatten(1)

    def inputs(self, images: bool) -> torch.Tensor:
        """Images for a CNN, flat vectors for an MLP."""
        return self.images if images else self.vectors

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Splits:
    """A data set in three parts, as every experiment sees it."""

    name: str
    train: Part
    validation: Part
    test: Part | None  # None in the splits a tuning run gets
    classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def input_size(self) -> int:
        channels, height, width = self.image_shape
        return channels * height * width

    def without_test(self) -> Splits:
        """The same splits with no test part: what a tuning run is given."""
        return replace(self, test=None)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation),
                "test": 0 if self.test is None else len(self.test)}

    def describe(self) -> str:
        channels, height, width = self.image_shape
        sizes = self.sizes()
        return (
            f"{self.name}: {sizes['train']} train / {sizes['validation']} validation / "
            f"{sizes['test']} test, {channels}x{height}x{width}, {self.classes} classes"
        )


def validation_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A fixed, class-stratified choice of ``fraction`` of the examples (sorted indices)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        count = int(round(fraction * len(members)))
        order = torch.randperm(len(members), generator=generator)
        chosen.append(members[order[:count]])
    return torch.sort(torch.cat(chosen)).values


def split_validation(
    dataset: Dataset, fraction: float = VALIDATION_FRACTION, seed: int = SPLIT_SEED
) -> Splits:
    """Hold out ``fraction`` of ``dataset``'s training examples as the validation part."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must lie in (0, 1), got {fraction}")
    held_out = validation_indices(dataset.train_labels, fraction, seed)
    keep = torch.ones(len(dataset.train_labels), dtype=torch.bool)
    keep[held_out] = False
    if not keep.any() or len(held_out) == 0:
        raise DataError(
            f"{dataset.name}: {len(dataset.train_labels)} training examples are too few to hold "
            f"out a validation part of {fraction:.0%}"
        )
    return Splits(
        name=dataset.name,
        train=Part(dataset.train_images[keep], dataset.train_labels[keep]),
        validation=Part(dataset.train_images[held_out], dataset.train_labels[held_out]),
        test=Part(dataset.test_images, dataset.test_labels),
        classes=dataset.classes,
    )


def load_splits(spec: str, min_train: int = 1) -> Splits:
    """Read the data named by ``spec`` and carve its validation part; a bad spec or folder
    raises ``DataError``. The training part must hold at least ``min_train`` examples."""
    from batchnorm.lab.data import load_data

    dataset = load_data(spec, min_train)  # a set too small is refused before it is read
    splits = split_validation(dataset)
    if len(splits.train) < min_train:
        raise DataError(
            f"{spec}: {len(splits.train)} training examples after the validation part is held "
            f"out, fewer than one batch of {min_train} (the largest batch the chosen experiments "
            "train on)"
        )
    return splits
