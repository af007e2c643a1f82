"""Verdicts from an effect's 95% interval against a stated threshold, never from a single run.

A rule names its measure's unit, a threshold and the side of it that supports the claim. The
claim is supported when the whole interval lies on that side, not supported when the whole
interval lies on the other side, and inconclusive when the interval contains the threshold.
An interval that cannot carry a verdict is inconclusive too, whatever side it lies on: one from
fewer than ``MIN_DISTINCT`` distinct per-seed values (a coarse measure that every seed rounds the
same way), or one of zero width.

Every rule carries, in words, why its threshold is above the noise of the measure; the threshold
of an accuracy measure is derived from the size of the test set (:func:`accuracy_threshold`).
Two claims that say opposite things (C9 and C15) use one rule and its :meth:`Rule.complement`,
so they can never both be supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

from batchnorm.lab.stats import (
    AccuracyEffect,
    Interval,
    largest_binomial_se,
    mean_interval,
    ratio_interval,
)

MIN_DISTINCT = 3
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
# An accuracy threshold is this many times the largest standard error that the test examples
# alone could give the measure: an effect that size is not what sampling noise produces.
NOISE_MULTIPLE = 2.0


@dataclass(frozen=True)
class Rule:
    """``effect`` is compared with ``threshold``; ``supports`` is "above" or "below"."""

    threshold: float
    supports: str = "above"
    scale: str = "linear"  # "log": the effect is a ratio, averaged geometrically
    unit: str = ""
    why: str = ""  # why the threshold is above the noise, in words

    def __post_init__(self) -> None:
        if self.supports not in ("above", "below"):
            raise ValueError(f"supports must be 'above' or 'below', got {self.supports!r}")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"scale must be 'linear' or 'log', got {self.scale!r}")

    def complement(self) -> Rule:
        """The rule of the opposite claim: the same measure and threshold, the other side."""
        return replace(self, supports="below" if self.supports == "above" else "above")

    def describe(self) -> str:
        side = self.supports
        other = "below" if side == "above" else "above"
        value = format_number(self.threshold, self.unit)
        return (
            f"supported if the 95% CI lies entirely {side} {value}; not supported if it lies "
            f"entirely {other} {value}; inconclusive otherwise, or when the CI has zero width "
            f"or rests on fewer than {MIN_DISTINCT} distinct per-seed values"
        )

    def interval(self, per_seed: Sequence[float], example_se: float = 0.0) -> Interval:
        if self.scale == "log":
            return ratio_interval(per_seed)
        return mean_interval(per_seed, example_se=example_se)

    def judge(self, interval: Interval, per_seed: Sequence[float]) -> str:
        if degenerate(interval, per_seed):
            return INCONCLUSIVE
        above = interval.low > self.threshold
        below = interval.high < self.threshold
        if self.supports == "above":
            return SUPPORTED if above else NOT_SUPPORTED if below else INCONCLUSIVE
        return SUPPORTED if below else NOT_SUPPORTED if above else INCONCLUSIVE


def degenerate(interval: Interval, per_seed: Sequence[float]) -> str:
    """Why ``interval`` cannot carry a verdict, or "" when it can."""
    distinct = len({round(float(value), 12) for value in per_seed})
    if distinct < MIN_DISTINCT:
        return (
            f"only {distinct} distinct per-seed value{'s' if distinct != 1 else ''} (a verdict "
            f"needs {MIN_DISTINCT})"
        )
    if math.isnan(interval.low) or math.isnan(interval.high):
        return "no interval"
    if not interval.width > 0:
        return "the interval has zero width"
    return ""


def accuracy_threshold(test_examples: int, accuracies: int, minimum: float = 0.0) -> float:
    """The threshold (pp) of a measure built from ``accuracies`` test accuracies on
    ``test_examples`` examples: ``NOISE_MULTIPLE`` times the largest standard error that sampling
    the test set could give it (each accuracy at 50%, independent errors), rounded up to 0.1 pp,
    and at least ``minimum``."""
    noise = largest_binomial_se(test_examples) * math.sqrt(accuracies)
    return max(minimum, math.ceil(10 * NOISE_MULTIPLE * noise) / 10)


def accuracy_rule(
    test_examples: int, accuracies: int, supports: str = "above", minimum: float = 0.0,
    sign: float = 1.0,
) -> Rule:
    """A rule on a sum of ``accuracies`` test accuracies (pp) whose threshold is above the
    test set's noise; ``sign=-1`` puts the threshold below zero (a non-inferiority margin)."""
    single = largest_binomial_se(test_examples)
    threshold = sign * accuracy_threshold(test_examples, accuracies, minimum)
    why = (
        f"one test accuracy on {test_examples} examples has a binomial standard error of at most "
        f"{single:.1f} pp (at 50%); this measure adds {accuracies} such "
        f"accurac{'y' if accuracies == 1 else 'ies'}, so sampling the test set alone moves it "
        f"by at most {single * math.sqrt(accuracies):.1f} pp (one standard error); the threshold "
        f"is {NOISE_MULTIPLE:g} times that"
        + (f", and at least {minimum:g} pp" if minimum else "")
    )
    return Rule(threshold=threshold, supports=supports, unit="pp", why=why)


@dataclass(frozen=True)
class Finding:
    """One claim's verdict from one experiment: what was measured, on which data and split, the
    estimate and its interval, the rule, and the verdict. Plain data: it round-trips through
    JSON, so the report can be rendered from saved findings alone."""

    claim: str
    experiment: str
    data: str  # the data set the measure comes from
    split: str  # "test", "validation" or "training" (a measure taken while training)
    measure: str  # what the effect is, in words
    unit: str
    threshold: float
    supports: str
    effect: float
    low: float
    high: float
    seeds: int
    per_seed: tuple[float, ...]
    example_se: float  # the standard error the shared test examples add (0 when none)
    rule: str
    why: str  # why the threshold is above the noise
    verdict: str
    degenerate: str = ""  # why the interval could not carry a verdict, when it could not

    def to_dict(self) -> dict:
        values = asdict(self)
        values["per_seed"] = list(self.per_seed)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> Finding:
        known = {item.name for item in fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if k in known},
                      "per_seed": tuple(values["per_seed"])})

    def threshold_text(self) -> str:
        side = ">" if self.supports == "above" else "<"
        return f"{side} {format_number(self.threshold, self.unit)}"

    def effect_text(self) -> str:
        if math.isnan(self.low):
            return f"{format_number(self.effect, self.unit)} (no CI: {self.seeds} seed)"
        return (
            f"{format_number(self.effect, self.unit)} "
            f"[{format_number(self.low, self.unit)}, {format_number(self.high, self.unit)}]"
        )


def judge(
    claim: str,
    experiment: str,
    measure: str,
    per_seed: Sequence[float],
    rule: Rule,
    *,
    data: str,
    split: str = "test",
    example_se: float = 0.0,
) -> Finding:
    """The finding for ``claim`` from one value per seed (and the test examples' noise)."""
    interval = rule.interval(per_seed, example_se)
    return Finding(
        claim=claim,
        experiment=experiment,
        data=data,
        split=split,
        measure=measure,
        unit=rule.unit,
        threshold=rule.threshold,
        supports=rule.supports,
        effect=interval.mean,
        low=interval.low,
        high=interval.high,
        seeds=interval.n,
        per_seed=tuple(float(value) for value in per_seed),
        example_se=float(example_se),
        rule=rule.describe(),
        why=rule.why,
        verdict=rule.judge(interval, per_seed),
        degenerate=degenerate(interval, per_seed),
    )


def judge_accuracy(
    claim: str, experiment: str, measure: str, effect: AccuracyEffect, rule: Rule, *, data: str
) -> Finding:
    """The finding for a measure built from test accuracies (see ``stats.accuracy_effect``)."""
    return judge(claim, experiment, measure, effect.per_seed, rule, data=data, split="test",
                 example_se=effect.example_se)


def format_number(value: float, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "x":
        # two decimals in the usual range; a ratio far below 1 keeps two significant digits, so
        # that a small but nonzero interval never reads as a degenerate "0.00x [0.00x, 0.00x]"
        if value != 0 and abs(value) < 0.1:
            return f"{value:.2g}x"
        return f"{value:.0f}x" if abs(value) >= 100 else f"{value:.2f}x"
    if unit == "pp":
        return f"{value:+.1f} pp"
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:.3g}{(' ' + unit) if unit else ''}"
