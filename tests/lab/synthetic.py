"""Synthetic saved runs whose answer is known, for testing each experiment's ``findings``.

A run's test outcome is a boolean vector over a shared test set; ``outcome(accuracy, seed)``
marks a given fraction of examples right, in an order that depends on the seed (so seeds and
settings differ example by example, as real runs do).
"""

from __future__ import annotations

import numpy as np

from batchnorm.lab.stats import encode_correct

TEST_SIZE = 1000
VALIDATION_SIZE = 800
SEEDS = (0, 1, 2, 3, 4)


def outcome(accuracy: float, seed: int, salt: int = 0, size: int = TEST_SIZE) -> np.ndarray:
    rng = np.random.default_rng(1000 * seed + salt)
    correct = np.zeros(size, dtype=bool)
    correct[rng.permutation(size)[: int(round(accuracy * size))]] = True
    return correct


def result(accuracy: float, seed: int, salt: int = 0, **fields) -> dict:
    """A run's result with its test record (and any other fields the analysis reads)."""
    return {
        "data": "synthetic",
        "validation_size": VALIDATION_SIZE,
        "test_accuracy": accuracy,
        "test_size": TEST_SIZE,
        "test_correct": encode_correct(outcome(accuracy, seed, salt)),
        "nonfinite": False,
        **fields,
    }


def jitter(seed: int, scale: float) -> float:
    """A small deterministic per-seed offset, so that seeds give distinct values."""
    return scale * (((seed * 7919) % 11) / 10 - 0.5)
