"""Interleaved timing: the machines are noisy, so A and B alternate within one run and the
result is the median of the per-round ratios, never a ratio of absolute times taken apart.

Each timed sample also counts the process's minor page faults (first touches of memory the
allocator took back from the operating system). On the virtual machine of BENCHMARKS.md a fault
cost 0.7-1.8 us per 4 KiB page, several times the time to stream that page, and whether a
freed tensor's memory faults back in depends on the C allocator's heap state, which differs
between processes: the counts show when a ratio is an allocator effect rather than arithmetic."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

try:
    import resource  # Unix: the process's page-fault counters
except ImportError:  # Windows
    resource = None


@dataclass(frozen=True)
class Comparison:
    median_ratio: float  # median over rounds of time(candidate) / time(baseline)
    candidate_median_s: float
    baseline_median_s: float
    rounds: int
    # minor page faults per call, averaged over the timed samples (None where the platform
    # does not count them)
    candidate_faults: float | None = None
    baseline_faults: float | None = None


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of the population ``values`` were drawn
    from: the order statistics ``x_(k) <= x_(n + 1 - k)`` with the largest ``k`` whose
    coverage ``1 - 2 P(Binomial(n, 1/2) < k)`` is at least ``confidence`` (exact, whatever the
    distribution, for independent draws). Per-round timing ratios have heavy tails (a burst of
    load on the host lands in one round), which a t-interval on their mean would let decide;
    ranks are not moved by them. ``(nan, nan)`` where no such pair exists (fewer than six
    values at 95%)."""
    ordered = sorted(values)
    n = len(ordered)
    below = 0.0  # P(Binomial(n, 1/2) < k), for k = 1, 2, ...
    best = 0
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1) / 2.0**n
        if 1.0 - 2.0 * below < confidence:
            break
        best = k
    if best == 0:
        return math.nan, math.nan
    return ordered[best - 1], ordered[n - best]


def _minor_faults() -> int | None:
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


Clock = Callable[[], float]


def _time_once(fn: Callable[[], object], inner: int, clock: Clock = time.perf_counter) -> float:
    start = clock()
    for _ in range(inner):
        fn()
    return (clock() - start) / inner


def _sample(
    fn: Callable[[], object], inner: int, clock: Clock = time.perf_counter
) -> tuple[float, int | None]:
    """Seconds per call and page faults over the ``inner`` calls of one sample."""
    before = _minor_faults()
    seconds = _time_once(fn, inner, clock)
    after = _minor_faults()
    return seconds, None if before is None or after is None else after - before


def calibrate(fn: Callable[[], object], target_s: float = 0.02) -> int:
    """How many calls make one timed sample last about ``target_s``."""
    fn()
    elapsed = _time_once(fn, 1)
    return max(1, int(target_s / max(elapsed, 1e-7)))


def per_call(
    fn: Callable[[], object], rounds: int = 15, target_s: float = 0.005,
    clock: Clock = time.perf_counter,
) -> float:
    """Median seconds per call of ``fn`` over ``rounds`` samples of about ``target_s``."""
    inner = calibrate(fn, target_s)
    return statistics.median(_time_once(fn, inner, clock) for _ in range(rounds))


def compare(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int = 15,
    warmup: int = 3,
    seed: int = 0,
    clock: Clock = time.perf_counter,
) -> Comparison:
    """Time ``candidate`` and ``baseline`` alternately (order shuffled each round).

    ``clock``: wall time by default; ``time.thread_time`` counts only the time the calling
    thread ran, which keeps other processes' load out of single-threaded timings (it misses the
    work of any other thread, so it suits ``torch.set_num_threads(1)`` only)."""
    for _ in range(warmup):
        candidate()
        baseline()
    inner = max(1, min(calibrate(candidate), calibrate(baseline)))
    order = random.Random(seed)
    ratios, cand_times, base_times = [], [], []
    cand_faults: list[int | None] = []
    base_faults: list[int | None] = []
    for _ in range(rounds):
        if order.random() < 0.5:
            c, cf = _sample(candidate, inner, clock)
            b, bf = _sample(baseline, inner, clock)
        else:
            b, bf = _sample(baseline, inner, clock)
            c, cf = _sample(candidate, inner, clock)
        ratios.append(c / b)
        cand_times.append(c)
        base_times.append(b)
        cand_faults.append(cf)
        base_faults.append(bf)
    return Comparison(
        median_ratio=statistics.median(ratios),
        candidate_median_s=statistics.median(cand_times),
        baseline_median_s=statistics.median(base_times),
        rounds=rounds,
        candidate_faults=_per_call(cand_faults, inner),
        baseline_faults=_per_call(base_faults, inner),
    )


def _per_call(faults: list[int | None], inner: int) -> float | None:
    if not faults or any(f is None for f in faults):
        return None
    return sum(faults) / (len(faults) * inner)
