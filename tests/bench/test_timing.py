"""The interleaved timer: ratios from alternating samples, and page faults counted per call."""

from __future__ import annotations

import mmap
import sys

import pytest

from batchnorm.bench.timing import compare

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
