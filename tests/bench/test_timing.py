"""The interleaved timer: ratios from alternating samples, and page faults counted per call."""

from __future__ import annotations

import math
import mmap
import random
import statistics
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchnorm.bench.timing import compare, median_interval

PAGES = 64


def _touch_fresh_pages() -> None:
    """Map new anonymous memory and write one byte per page: each write is a first touch."""
    memory = mmap.mmap(-1, PAGES * mmap.PAGESIZE)
    for page in range(PAGES):
        memory[page * mmap.PAGESIZE] = 1
    memory.close()


def _nothing() -> None:
    return None


@pytest.mark.skipif(sys.platform == "win32", reason="page faults are counted through getrusage")
def test_faults_are_counted_per_call_for_each_side():
    result = compare(_touch_fresh_pages, _nothing, rounds=3, warmup=1)
    assert result.candidate_faults is not None and result.baseline_faults is not None
    assert result.candidate_faults >= PAGES
    assert result.baseline_faults < PAGES / 8
    # and the sides are not swapped when the order of a round is
    swapped = compare(_nothing, _touch_fresh_pages, rounds=3, warmup=1)
    assert swapped.baseline_faults >= PAGES and swapped.candidate_faults < PAGES / 8


def test_ratio_is_candidate_over_baseline():
    def slow() -> None:
        sum(range(20000))

    def fast() -> None:
        sum(range(200))

    result = compare(slow, fast, rounds=5, warmup=1)
    assert result.median_ratio > 5
    assert result.candidate_median_s > result.baseline_median_s


def test_median_interval_takes_the_ranks_of_the_exact_binomial_coverage():
    # n = 21: P(Bin(21, 1/2) <= 5) = 27896 / 2^21, coverage 0.973; rank 7 would give 0.922
    assert median_interval(list(range(1, 22))) == (6, 16)
    # n = 31: ranks 10 and 22 (coverage 0.971; 11 and 21 would give 0.929)
    assert median_interval(list(range(31, 0, -1))) == (10, 22)  # order of the draws is free
    assert median_interval(list(range(1, 7))) == (1, 6)  # n = 6: 1 - 2/64 = 0.969
    assert all(math.isnan(v) for v in median_interval([1.0, 2.0, 3.0, 4.0, 5.0]))  # 0.9375


@given(st.lists(st.floats(0.01, 100.0), min_size=6, max_size=60))
def test_median_interval_holds_the_sample_median(values):
    low, high = median_interval(values)
    assert low <= statistics.median(values) <= high


def test_median_interval_covers_the_true_median_at_least_as_often_as_stated():
    # heavy-tailed ratios like a noisy host's (lognormal, median exactly 1): the rank interval
    # must cover 1 in at least 95% of samples (exact: 97.1% at n = 31), a t-interval on the
    # mean would not aim at the median at all
    draws = random.Random(0)
    covered = 0
    trials = 2000
    for _ in range(trials):
        sample = [math.exp(draws.gauss(0.0, 0.5)) for _ in range(31)]
        low, high = median_interval(sample)
        covered += low <= 1.0 <= high
    assert 0.95 <= covered / trials <= 0.99
