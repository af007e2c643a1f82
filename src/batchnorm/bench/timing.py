"""Interleaved timing: the machines are noisy, so A and B alternate within one run and the
result is the median of the per-round ratios, never a ratio of absolute times taken apart."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    median_ratio: float  # median over rounds of time(candidate) / time(baseline)
    candidate_median_s: float
    baseline_median_s: float
    rounds: int


def _time_once(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def calibrate(fn: Callable[[], object], target_s: float = 0.02) -> int:
    """How many calls make one timed sample last about ``target_s``."""
    fn()
    elapsed = _time_once(fn, 1)
    return max(1, int(target_s / max(elapsed, 1e-7)))


def compare(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int = 15,
    warmup: int = 3,
    seed: int = 0,
) -> Comparison:
    """Time ``candidate`` and ``baseline`` alternately (order shuffled each round)."""
    for _ in range(warmup):
        candidate()
        baseline()
    inner = max(1, min(calibrate(candidate), calibrate(baseline)))
    order = random.Random(seed)
    ratios, cand_times, base_times = [], [], []
    for _ in range(rounds):
        if order.random() < 0.5:
            c = _time_once(candidate, inner)
            b = _time_once(baseline, inner)
        else:
            b = _time_once(baseline, inner)
            c = _time_once(candidate, inner)
        ratios.append(c / b)
        cand_times.append(c)
        base_times.append(b)
    return Comparison(
        median_ratio=statistics.median(ratios),
        candidate_median_s=statistics.median(cand_times),
        baseline_median_s=statistics.median(base_times),
        rounds=rounds,
    )
