"""Verdicts from an effect size and its confidence interval, never from a single run.

A rule states a threshold and which side of it supports the claim. The claim is supported when
the whole 95% interval lies on that side, not supported when the whole interval lies on the
other side, and inconclusive when the interval contains the threshold or fewer than
``MIN_SEEDS`` seeds were run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from batchnorm.lab.stats import Interval, mean_interval, ratio_interval

MIN_SEEDS = 2
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Rule:
    """``effect`` is compared with ``threshold``; ``supports`` is "above" or "below"."""

    threshold: float
    supports: str = "above"
    scale: str = "linear"  # "log": the effect is a ratio, averaged geometrically
    unit: str = ""

    def describe(self) -> str:
        side = "above" if self.supports == "above" else "below"
        other = "below" if side == "above" else "above"
        value = format_number(self.threshold, self.unit)
        return (
            f"supported if the 95% CI lies entirely {side} {value}; not supported if it lies "
            f"entirely {other} {value}; inconclusive otherwise "
            f"(or with fewer than {MIN_SEEDS} seeds)"
        )

    def interval(self, per_seed: Sequence[float]) -> Interval:
        return ratio_interval(per_seed) if self.scale == "log" else mean_interval(per_seed)

    def judge(self, interval: Interval) -> str:
        if interval.n < MIN_SEEDS or math.isnan(interval.low) or math.isnan(interval.high):
            return INCONCLUSIVE
        above = interval.low > self.threshold
        below = interval.high < self.threshold
        if self.supports == "above":
            return SUPPORTED if above else NOT_SUPPORTED if below else INCONCLUSIVE
        return SUPPORTED if below else NOT_SUPPORTED if above else INCONCLUSIVE


@dataclass(frozen=True)
class Finding:
    """One claim's verdict from one experiment, with what is needed to show how it was reached."""

    claim: str
    experiment: str
    measure: str  # what the effect is, in words
    effect: float
    low: float
    high: float
    seeds: int
    per_seed: tuple[float, ...]
    unit: str
    rule: str
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)

    def caveat(self) -> str:
        """A warning when the interval has zero width (every seed gave the same value)."""
        if self.seeds >= 2 and len(set(self.per_seed)) == 1:
            return (
                "Every seed gave the same value, so the interval has zero width; with a coarse "
                "measure (a grid of rates, whole test examples) this understates the uncertainty."
            )
        return ""

    def effect_text(self) -> str:
        if math.isnan(self.low):
            return f"{format_number(self.effect, self.unit)} (no CI: {self.seeds} seed)"
        return (
            f"{format_number(self.effect, self.unit)} "
            f"[{format_number(self.low, self.unit)}, {format_number(self.high, self.unit)}]"
        )


def judge(claim: str, experiment: str, measure: str, per_seed: Sequence[float], rule: Rule):
    """The finding for ``claim`` from one value per seed."""
    interval = rule.interval(per_seed)
    return Finding(
        claim=claim,
        experiment=experiment,
        measure=measure,
        effect=interval.mean,
        low=interval.low,
        high=interval.high,
        seeds=interval.n,
        per_seed=tuple(float(value) for value in per_seed),
        unit=rule.unit,
        rule=rule.describe(),
        verdict=rule.judge(interval),
    )


def format_number(value: float, unit: str = "") -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "pp":
        return f"{value:+.1f} pp"
    return f"{value:.3g}{(' ' + unit) if unit else ''}"
