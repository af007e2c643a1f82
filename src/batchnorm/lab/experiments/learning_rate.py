"""C2, learning rate: how large a rate each network tolerates, with and without batch norm.

Every network trains for the same number of steps at each rate of a grid (a factor of 2 apart).
A rate is tolerated when the final test accuracy is at least ``tolerated_fraction`` of the best
that network reached at any rate of the grid (a diverged run scores 0). The largest tolerated rate
is read off the curve between grid points, on the log-rate axis, so that it is a continuous
number rather than a grid point shared by every seed. The effect is its ratio, BN over none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from batchnorm.lab.experiments.base import (
    Analysis,
    Experiment,
    Figure,
    Panel,
    Series,
    Table,
    band_caption,
    by_params,
    data_of,
    fit,
    interval_band,
    mlp_builder,
    one_per,
    percent,
    seeds_of,
)
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Finding, Rule, judge


@dataclass(frozen=True)
class LearningRateConfig:
    norms: tuple[str, ...] = ("none", "batch")
    learning_rates: tuple[float, ...] = tuple(0.01 * 2**power for power in range(9))
    steps: int = 500
    batch_size: int = 32
    tolerated_fraction: float = 0.5
    depth: int = 4
    width: int = 128
    activation: str = "relu"

    @classmethod
    def quick(cls) -> LearningRateConfig:
        rates = tuple(0.01 * 4**power for power in range(5))
        return replace(cls(), learning_rates=rates, steps=150)


def plan(config: LearningRateConfig, seeds) -> list[dict]:
    return [
        {"norm": norm, "learning_rate": rate, "seed": seed}
        for seed in seeds
        for norm in config.norms
        for rate in config.learning_rates
    ]


def run(config: LearningRateConfig, params: dict, data, device: str) -> dict:
    fitted = fit(
        mlp_builder(config, data, params["norm"]),
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=params["learning_rate"],
    )
    return {
        "nonfinite": fitted.training.nonfinite,
        "final_loss": fitted.training.final_loss,
        **fitted.test_record(),
    }


def largest_tolerated_rate(rates: list[float], accuracies: list[float], fraction: float):
    """(rate, censored): where the accuracy curve last falls below ``fraction`` of its best,
    interpolated on the log-rate axis; ``censored`` when the top of the grid is still tolerated
    (the rate is then a lower bound)."""
    pairs = sorted(zip(rates, accuracies, strict=True))
    level = fraction * max(accuracy for _, accuracy in pairs)
    tolerated = [index for index, (_, accuracy) in enumerate(pairs) if accuracy >= level]
    last = max(tolerated)
    if last == len(pairs) - 1:
        return pairs[last][0], True
    (rate, accuracy), (next_rate, next_accuracy) = pairs[last], pairs[last + 1]
    share = (accuracy - level) / (accuracy - next_accuracy)
    return math.exp(math.log(rate) + share * (math.log(next_rate) - math.log(rate))), False


def grid_factor(config: LearningRateConfig) -> float:
    rates = sorted(config.learning_rates)
    return max(high / low for low, high in zip(rates, rates[1:], strict=False))


def rule(config: LearningRateConfig) -> Rule:
    factor = grid_factor(config)
    why = (
        f"the grid steps by {factor:g}x and the edge between two grid points is placed by the "
        "two accuracies around it, so a ratio within one grid step could come from where that "
        f"line crosses; the threshold is one grid step ({factor:g}x). Seed-to-seed variation is "
        "inside the interval"
    )
    return Rule(threshold=round(factor, 2), supports="above", scale="log", unit="x", why=why)


def _edges(config: LearningRateConfig, runs: list[dict]) -> dict[tuple[str, int], tuple]:
    edges = {}
    for (norm, seed), group in by_params(runs, "norm", "seed").items():
        rates = [run["params"]["learning_rate"] for run in group]
        accuracies = [run["result"]["test_accuracy"] for run in group]
        edges[(norm, seed)] = largest_tolerated_rate(rates, accuracies, config.tolerated_fraction)
    return edges


def findings(config: LearningRateConfig, runs: list[dict]) -> list[Finding]:
    if not {"none", "batch"} <= set(config.norms):
        return []
    edges = _edges(config, runs)
    ratios = [edges[("batch", seed)][0] / edges[("none", seed)][0] for seed in seeds_of(runs)]
    return [
        judge(
            "C2",
            "learning-rate",
            f"largest learning rate at which the final test accuracy stays at least "
            f"{percent(config.tolerated_fraction)} of the best over the grid, with BN divided by "
            "without",
            ratios,
            rule(config),
            data=data_of(runs),
        )
    ]


def analyze(config: LearningRateConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = seeds_of(runs)
    edges = _edges(config, runs)
    top = max(config.learning_rates)
    for norm in config.norms:
        if any(edges[(norm, seed)][1] for seed in seeds if (norm, seed) in edges):
            analysis.notes.append(
                f"'{norm}' was still tolerated at the top of the grid ({top:g}) for some seed: "
                "its largest tolerated rate is a lower bound there, and so is a ratio over it."
            )
    grouped = by_params(runs, "norm", "learning_rate")
    results = one_per(runs, "norm", "learning_rate", "seed")
    series, rows = [], []
    for norm in config.norms:
        curves = [
            [results[(norm, rate, seed)]["test_accuracy"] for rate in config.learning_rates]
            for seed in seeds
            if (norm, config.learning_rates[0], seed) in results
        ]
        if not curves:
            continue
        mean, low, high = interval_band(curves)
        series.append(Series(norm, list(config.learning_rates), [100 * v for v in mean],
                             [100 * v for v in low], [100 * v for v in high], style="o-"))
        for rate, value in zip(config.learning_rates, mean, strict=True):
            group = grouped[(norm, rate)]
            diverged = sum(run["result"]["nonfinite"] for run in group)
            rows.append([norm, f"{rate:g}", percent(value), f"{diverged}/{len(group)}"])
        tolerated = [edges[(norm, seed)][0] for seed in seeds]
        geometric = math.exp(sum(math.log(value) for value in tolerated) / len(tolerated))
        rows.append([norm, "largest tolerated (geometric mean)", f"{geometric:.3g}", ""])
    analysis.tables.append(
        Table(
            "Final test accuracy by learning rate (mean over seeds; each run scored once)",
            ["norm", "learning rate", "final test accuracy", "diverged (non-finite loss)"],
            rows,
        )
    )
    analysis.figures.append(
        Figure(
            "learning-rate",
            [Panel("Final test accuracy vs learning rate", "learning rate", "test accuracy (%)",
                   series, xscale="log")],
            caption=band_caption(
                f"Final test accuracy (%) after {config.steps} steps at each learning rate, with "
                "and without BN (log rate axis)",
                len(seeds),
            ),
        )
    )
    return analysis


def setup(config: LearningRateConfig) -> str:
    low, high = min(config.learning_rates), max(config.learning_rates)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, norm "
        f"{' vs '.join(config.norms)}. SGD (momentum {MOMENTUM}), batch {config.batch_size}, "
        f"{config.steps} steps at each of {len(config.learning_rates)} rates from {low:g} to "
        f"{high:g}. Tolerated: final test accuracy at least "
        f"{percent(config.tolerated_fraction)} of the network's best over the grid; a run whose "
        "loss became non-finite scores 0% (its outputs are not numbers). Nothing is tuned: the "
        "sweep is the measurement."
    )


def cost(config: LearningRateConfig, params: dict) -> float:
    return float(config.steps)


EXPERIMENT = Experiment(
    name="learning-rate",
    claims=("C2",),
    question="Does BN tolerate larger learning rates?",
    config_type=LearningRateConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "On MNIST-1D an MLP without BN falls to chance at rates where BN's still learns (in our "
        "pilots at rate 0.3: near 10% without BN, over 40% with it); on the digits both stay "
        "near their ceiling over much of the grid, so the edge is harder to see."
    ),
    published=(
        "Ioffe & Szegedy 2015 trained BN-Inception with 5x and 30x the baseline's learning rate "
        "(BN-x30 reached 74.8% vs the baseline's 72.2%). Bjorck et al. 2018, ResNet-110 on "
        "CIFAR-10: learning rate 0.1 with BN against 1e-4 without."
    ),
    published_tables=(
        Table(
            "Published learning rates as a ratio like ours (rate with BN / rate without)",
            ["source", "with BN", "without BN", "ratio"],
            [["Ioffe & Szegedy 2015, BN-x30 (trained well, 74.8%)", "30x baseline", "baseline",
              "30x (a rate used, not the largest tolerated)"],
             ["Bjorck et al. 2018, ResNet-110 CIFAR-10", "0.1", "1e-4", "1000x"]],
        ),
    ),
    cost=cost,
)
