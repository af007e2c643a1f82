"""C2, learning rate: how large a rate each network tolerates, with and without batch norm.

A run is stable when its loss stayed finite and it ended above ``stable_accuracy`` on the test
set. The effect is the ratio of the largest stable rates (BN over none), seed by seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from batchnorm.lab.experiments.base import (
    Analysis,
    Experiment,
    Figure,
    Panel,
    Series,
    Table,
    by_params,
    fit,
    mlp_builder,
    percent,
    seeds_of,
)
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Rule, judge

RULE = Rule(threshold=1.0, supports="above", scale="log", unit="x")


@dataclass(frozen=True)
class LearningRateConfig:
    norms: tuple[str, ...] = ("none", "batch")
    learning_rates: tuple[float, ...] = tuple(0.01 * 2**power for power in range(9))
    steps: int = 500
    batch_size: int = 32
    stable_accuracy: float = 0.5
    depth: int = 4
    width: int = 128
    activation: str = "relu"

    @classmethod
    def quick(cls) -> LearningRateConfig:
        rates = tuple(0.01 * 4**power for power in range(5))
        return replace(cls(), learning_rates=rates, steps=100)


def plan(config: LearningRateConfig, seeds) -> list[dict]:
    return [
        {"norm": norm, "learning_rate": rate, "seed": seed}
        for seed in seeds
        for norm in config.norms
        for rate in config.learning_rates
    ]


def run(config: LearningRateConfig, params: dict, data, device: str) -> dict:
    build = mlp_builder(config, data, params["norm"])

    model, result = fit(
        build,
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=params["learning_rate"],
        eval_every=config.steps,
    )
    return {
        "final_test_accuracy": result.test_accuracy[-1],
        "nonfinite": result.nonfinite,
        "final_loss": result.final_loss,
    }


def is_stable(result: dict, config: LearningRateConfig) -> bool:
    return not result["nonfinite"] and result["final_test_accuracy"] >= config.stable_accuracy


def largest_stable_rate(config: LearningRateConfig, runs: list[dict]) -> float:
    """The largest stable rate; half the smallest rate of the grid when none was stable."""
    stable = [run["params"]["learning_rate"] for run in runs if is_stable(run["result"], config)]
    return max(stable) if stable else min(config.learning_rates) / 2


def analyze(config: LearningRateConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis()
    seeds = seeds_of(runs)
    per_seed = by_params(runs, "norm", "seed")
    largest = {key: largest_stable_rate(config, group) for key, group in per_seed.items()}
    top = max(config.learning_rates)
    if "none" in config.norms and "batch" in config.norms:
        ratios = [largest[("batch", seed)] / largest[("none", seed)] for seed in seeds]
        analysis.findings.append(
            judge(
                "C2",
                "learning-rate",
                "largest stable learning rate with BN divided by the largest without",
                ratios,
                RULE,
            )
        )
    for norm in config.norms:
        if any(largest[(norm, seed)] == top for seed in seeds):
            analysis.notes.append(
                f"'{norm}' was stable at the top of the grid ({top:g}) for some seed: its "
                "largest stable rate is a lower bound, and so is any ratio over it."
            )
    grouped = by_params(runs, "norm", "learning_rate")
    series, rows = [], []
    for norm in config.norms:
        means = []
        for rate in config.learning_rates:
            group = grouped.get((norm, rate), [])
            accuracies = [run["result"]["final_test_accuracy"] for run in group]
            diverged = sum(run["result"]["nonfinite"] for run in group)
            stable = sum(is_stable(run["result"], config) for run in group)
            means.append(sum(accuracies) / max(len(accuracies), 1))
            rows.append(
                [norm, f"{rate:g}", percent(means[-1]), f"{diverged}/{len(group)}",
                 f"{stable}/{len(group)}"]
            )
        series.append(Series(norm, list(config.learning_rates), means))
    analysis.tables.append(
        Table(
            "Final test accuracy by learning rate",
            ["norm", "learning rate", "mean final test accuracy", "diverged (non-finite loss)",
             "stable"],
            rows,
        )
    )
    threshold = Series(
        "stability threshold",
        [min(config.learning_rates), top],
        [config.stable_accuracy] * 2,
        style="--",
    )
    analysis.figures.append(
        Figure(
            "learning-rate",
            [Panel("Final test accuracy vs learning rate", "learning rate", "test accuracy",
                   [*series, threshold], xscale="log")],
        )
    )
    return analysis


def setup(config: LearningRateConfig) -> str:
    low, high = min(config.learning_rates), max(config.learning_rates)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, norm "
        f"{' vs '.join(config.norms)}. SGD (momentum {MOMENTUM}), batch {config.batch_size}, "
        f"{config.steps} steps at each of {len(config.learning_rates)} rates from {low:g} to "
        f"{high:g}. Stable: finite loss throughout and final test accuracy at least "
        f"{percent(config.stable_accuracy)}."
    )


EXPERIMENT = Experiment(
    name="learning-rate",
    claims=("C2",),
    question="Does BN tolerate larger learning rates without diverging?",
    config_type=LearningRateConfig,
    plan=plan,
    run=run,
    analyze=analyze,
    setup=setup,
    published=(
        "Ioffe & Szegedy 2015 trained BN-Inception with 5x and 30x the baseline's learning rate "
        "(BN-x30 reached 74.8% vs the baseline's 72.2%). Bjorck et al. 2018, ResNet-110 on "
        "CIFAR-10: learning rate 0.1 with BN against 1e-4 without."
    ),
)
