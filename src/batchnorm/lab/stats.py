"""Effect sizes across seeds: the mean and its 95% t-interval, on a plain or a log scale."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its 95% confidence interval (nan bounds when ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean; the seeds are the independent replicates."""
    values = [float(value) for value in values]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    half_width = student_t.ppf(0.5 + confidence / 2, n - 1) * math.sqrt(variance / n)
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
