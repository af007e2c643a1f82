"""Effect sizes, intervals with the test examples' noise, and the verdict rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchnorm.lab.stats import (
    accuracy_effect,
    decode_correct,
    encode_correct,
    largest_binomial_se,
    mean_interval,
    ratio_interval,
)
from batchnorm.lab.verdict import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    Finding,
    Rule,
    accuracy_rule,
    accuracy_threshold,
    format_number,
    judge,
)


def test_t_interval_matches_hand_computation():
    interval = mean_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3, t(0.975, 2) = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert interval.mean == pytest.approx(2.0)
    assert (interval.low, interval.high) == pytest.approx((2 - half, 2 + half), rel=1e-6)


def test_example_noise_widens_the_interval_in_quadrature():
    values = [1.0, 2.0, 3.0]
    seed_half = 4.302653 / math.sqrt(3)
    example_half = 1.959964 * 0.5
    interval = mean_interval(values, example_se=0.5)
    assert interval.high - 2.0 == pytest.approx(math.hypot(seed_half, example_half), rel=1e-5)
    # Identical seeds still leave the test examples' noise: the interval is not zero-width.
    same = mean_interval([2.0, 2.0, 2.0], example_se=0.5)
    assert same.high - same.low == pytest.approx(2 * example_half, rel=1e-5)


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
        ([5.0, 5.1], "above", INCONCLUSIVE),  # two distinct values are too few
        ([5.0, 5.1, 5.0, 5.1], "above", INCONCLUSIVE),  # four seeds, still two values
    ],
)
def test_rule_judges_the_interval_not_the_mean(values, supports, verdict):
    finding = judge("C0", "x", "effect", values, Rule(threshold=1.0, supports=supports),
                    data="d")
    assert finding.verdict == verdict
    assert "1" in finding.rule and supports in finding.rule


def test_a_degenerate_interval_is_never_supported():
    # The --quick report of old: "supported, 16.00x [16.00x, 16.00x]" (one grid point, every seed).
    finding = judge("C2", "x", "ratio", [16.0, 16.0, 16.0], Rule(1.0, scale="log", unit="x"),
                    data="d")
    assert finding.verdict == INCONCLUSIVE
    assert "1 distinct per-seed value" in finding.degenerate
    equal = judge("C5", "x", "gap", [3.0, 3.0, 3.0], Rule(0.5, unit="pp"), data="d",
                  example_se=0.1)
    assert equal.verdict == INCONCLUSIVE  # a nonzero width from the examples does not rescue it
    assert judge("C5", "x", "gap", [0.1, 0.2, 0.3], Rule(0.5, unit="pp"), data="d").degenerate \
        == ""


def test_complement_gives_the_opposite_verdict_on_the_same_interval():
    rule = Rule(threshold=2.0, supports="above", unit="pp")
    other = rule.complement()
    assert (other.threshold, other.supports, other.complement()) == (2.0, "below", rule)
    for values in ([5.0, 6.0, 5.5], [0.1, 0.3, 0.2], [1.0, 3.0, 2.5]):
        first = judge("C9", "x", "m", values, rule, data="d").verdict
        second = judge("C15", "x", "m", values, other, data="d").verdict
        assert (first, second) in {(SUPPORTED, NOT_SUPPORTED), (NOT_SUPPORTED, SUPPORTED),
                                   (INCONCLUSIVE, INCONCLUSIVE)}


def test_accuracy_threshold_is_above_the_test_sets_noise():
    # 1000 examples: one accuracy's largest SE is 1.58 pp; a difference of two, 2.24 pp.
    assert largest_binomial_se(1000) == pytest.approx(50 / math.sqrt(1000))
    assert accuracy_threshold(1000, 2) == pytest.approx(4.5)
    assert accuracy_threshold(1000, 4) == pytest.approx(6.4)
    assert accuracy_threshold(540, 1) >= 2 * largest_binomial_se(540)
    rule = accuracy_rule(540, 2)
    assert rule.threshold >= 2 * largest_binomial_se(540) * math.sqrt(2)
    assert "540 examples" in rule.why and "2 times" in rule.why
    margin = accuracy_rule(1000, 2, sign=-1.0)
    assert margin.threshold == pytest.approx(-4.5) and margin.supports == "above"


def test_outcomes_round_trip_through_text():
    rng = np.random.default_rng(0)
    for size in (1, 7, 8, 540, 1000):
        correct = rng.random(size) < 0.6
        assert (decode_correct(encode_correct(correct), size) == correct).all()
    with pytest.raises(ValueError):
        decode_correct(encode_correct(np.ones(9, dtype=bool)), 8)  # the 9th bit is not padding


def test_accuracy_effect_is_the_weighted_sum_and_its_example_noise_matches_a_bootstrap():
    rng = np.random.default_rng(1)
    size, seeds = 600, 4
    a = [rng.random(size) < 0.7 for _ in range(seeds)]
    b = [rng.random(size) < 0.5 for _ in range(seeds)]
    effect = accuracy_effect([(1.0, a), (-1.0, b)], offsets=[1.0] * seeds)
    for seed in range(seeds):
        assert effect.per_seed[seed] == pytest.approx(
            100 * (a[seed].mean() - b[seed].mean()) + 1.0)
    # A bootstrap over test examples (the same resample for every run) of the seed mean.
    replicates = []
    stacked_a, stacked_b = np.stack(a), np.stack(b)
    for _ in range(2000):
        index = rng.integers(0, size, size)
        replicates.append(100 * (stacked_a[:, index].mean() - stacked_b[:, index].mean()))
    assert effect.example_se == pytest.approx(np.std(replicates), rel=0.1)
    # Paired: a model against itself has no example noise at all.
    assert accuracy_effect([(1.0, a), (-1.0, a)]).example_se == 0.0


def test_findings_round_trip_through_json():
    import json

    finding = judge("C9", "batch-size", "m", [1.0, 2.0, 3.5], accuracy_rule(1000, 4),
                    data="mnist1d", example_se=0.7)
    again = Finding.from_dict(json.loads(json.dumps(finding.to_dict())))
    assert again == finding
    assert finding.threshold_text() == "> +6.4 pp"
    assert finding.effect_text().startswith("+2.2 pp [")


@pytest.mark.parametrize("value, text", [
    (0.0012, "0.0012x"), (-0.05, "-0.05x"), (0.0, "0.00x"), (0.81, "0.81x"), (1.255, "1.25x"),
    (99.5, "99.50x"), (465.3, "465x"),
])
def test_ratios_keep_their_digits_far_below_one(value, text):
    """A ratio of 0.0012 must not print as 0.00x: an interval of such values would read as a
    degenerate one."""
    assert format_number(value, "x") == text
