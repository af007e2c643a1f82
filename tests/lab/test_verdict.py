"""Effect sizes, t-intervals and the verdict rules."""

from __future__ import annotations

import math

import pytest

from batchnorm.lab.stats import mean_interval, ratio_interval
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Rule, judge


def test_t_interval_matches_hand_computation():
    interval = mean_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3, t(0.975, 2) = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert interval.mean == pytest.approx(2.0)
    assert (interval.low, interval.high) == pytest.approx((2 - half, 2 + half), rel=1e-6)


def test_ratio_interval_is_geometric():
    interval = ratio_interval([2.0, 8.0])
    assert interval.mean == pytest.approx(4.0)
    assert interval.low < 4.0 < interval.high
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([1.0, 0.0])


@pytest.mark.parametrize(
    "values, supports, verdict",
    [
        ([3.0, 3.2, 2.9], "above", SUPPORTED),
        ([0.1, 0.2, 0.15], "above", NOT_SUPPORTED),
        ([0.0, 2.5, 1.2], "above", INCONCLUSIVE),
        ([0.1, 0.2, 0.15], "below", SUPPORTED),
        ([3.0, 3.2, 2.9], "below", NOT_SUPPORTED),
        ([5.0], "above", INCONCLUSIVE),  # one seed never gives a verdict
    ],
)
def test_rule_judges_the_interval_not_the_mean(values, supports, verdict):
    finding = judge("C0", "x", "effect", values, Rule(threshold=1.0, supports=supports))
    assert finding.verdict == verdict
    assert "1" in finding.rule and supports in finding.rule


def test_identical_seeds_give_a_zero_width_interval():
    finding = judge("C2", "x", "ratio", [4.0, 4.0, 4.0], Rule(1.0, scale="log", unit="x"))
    assert (finding.low, finding.effect, finding.high) == pytest.approx((4.0, 4.0, 4.0))
    assert finding.verdict == SUPPORTED
    assert finding.effect_text() == "4.00x [4.00x, 4.00x]"


def test_zero_width_interval_carries_a_caveat():
    equal = judge("C5", "x", "gap", [0.6, 0.6, 0.6], Rule(0.5, unit="pp"))
    assert "zero width" in equal.caveat()
    assert judge("C5", "x", "gap", [0.6, 0.7], Rule(0.5, unit="pp")).caveat() == ""
