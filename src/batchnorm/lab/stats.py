"""Effect sizes and their 95% intervals, with the two sources of noise the lab's numbers carry.

* Seeds: every seed trains a fresh model (initial weights, batch order, dropout). The seeds are
  the independent replicates; their spread gives a Student-t interval.
* Test examples: every run is scored on the same test set, so the luck of which examples were
  drawn into it is shared by all seeds and does not average away over them. For a measure that is
  a weighted sum of test accuracies (a difference, a difference of differences) that noise is the
  standard error of the mean of per-example scores, computed exactly (paired: every model sees the
  same examples); it is what a bootstrap over test examples converges to.

The two are independent, so the interval's half-width is the root of the sum of their squares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm as normal
from scipy.stats import t as student_t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its 95% confidence interval (nan bounds when ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def width(self) -> float:
        return self.high - self.low


def _quantile(confidence: float, degrees: int | None = None) -> float:
    level = 0.5 + confidence / 2
    return float(normal.ppf(level) if degrees is None else student_t.ppf(level, degrees))


def seed_standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean across seeds (nan below 2 seeds)."""
    values = [float(value) for value in values]
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1) / n)


def mean_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, example_se: float = 0.0
) -> Interval:
    """Mean over seeds with a Student-t interval, widened by ``example_se`` (the standard error
    that the shared test examples add) in quadrature."""
    values = [float(value) for value in values]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    seed_half = _quantile(confidence, n - 1) * seed_standard_error(values)
    example_half = _quantile(confidence) * example_se
    half_width = math.hypot(seed_half, example_half)
    return Interval(mean, mean - half_width, mean + half_width, n)


def ratio_interval(ratios: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Geometric mean of positive ratios with the interval taken on the log scale."""
    if any(not ratio > 0 for ratio in ratios):
        raise ValueError(f"ratios must be positive, got {list(ratios)}")
    on_log = mean_interval([math.log(ratio) for ratio in ratios], confidence)
    return Interval(
        math.exp(on_log.mean),
        math.exp(on_log.low) if on_log.n >= 2 else math.nan,
        math.exp(on_log.high) if on_log.n >= 2 else math.nan,
        on_log.n,
    )


def largest_binomial_se(examples: int) -> float:
    """The largest standard error of one accuracy on ``examples`` examples, in percentage points
    (at 50% accuracy: 50 / sqrt(n))."""
    return 50.0 / math.sqrt(examples)


# ---- Per-example outcomes: which test examples a run got right -------------------------------


def encode_correct(correct: torch.Tensor | np.ndarray) -> str:
    """A boolean vector as hex text (8 examples a byte), to keep in a run's JSON result."""
    bits = np.asarray(correct, dtype=bool)
    return np.packbits(bits).tobytes().hex()


def decode_correct(text: str, count: int) -> np.ndarray:
    """The boolean vector of ``count`` examples that :func:`encode_correct` wrote."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))
    if len(bits) < count or bits[count:].any():
        raise ValueError(f"encoded outcomes do not hold {count} examples")
    return bits[:count].astype(bool)


@dataclass(frozen=True)
class AccuracyEffect:
    """A weighted sum of test accuracies, per seed, in percentage points, and the standard error
    that the test examples add to its mean over seeds."""

    per_seed: list[float]
    example_se: float
    accuracies: int  # how many accuracies enter (for the largest binomial noise)


def accuracy_effect(
    terms: Sequence[tuple[float, Sequence[np.ndarray]]],
    offsets: Sequence[float] | None = None,
) -> AccuracyEffect:
    """``sum_k weight_k * accuracy_k`` (in pp) per seed, plus an optional per-seed offset.

    ``terms`` pairs a weight with one boolean vector of test outcomes per seed (the same seeds in
    the same order for every term, all scored on the same examples). An offset carries a part of
    the measure that is not a test accuracy (a training accuracy, in the train/test gap).
    """
    if not terms:
        raise ValueError("an accuracy effect needs at least one term")
    seeds = len(terms[0][1])
    if any(len(outcomes) != seeds for _, outcomes in terms):
        raise ValueError("every term needs one outcome vector per seed")
    offsets = [0.0] * seeds if offsets is None else [float(value) for value in offsets]
    matrices = [(weight, np.stack([np.asarray(o, dtype=float) for o in outcomes]))
                for weight, outcomes in terms]
    per_seed = [
        100.0 * sum(weight * float(matrix[seed].mean()) for weight, matrix in matrices)
        + offsets[seed]
        for seed in range(seeds)
    ]
    # Each example's contribution to the seed-averaged effect; its standard error over examples.
    scores = 100.0 * sum(weight * matrix.mean(axis=0) for weight, matrix in matrices)
    examples = len(scores)
    example_se = float(np.std(scores, ddof=1) / math.sqrt(examples)) if examples > 1 else math.nan
    return AccuracyEffect(per_seed, example_se, len(terms))
