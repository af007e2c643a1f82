"""C6, initialization: how much the final accuracy depends on the scale of the initial weights.

Every weight starts at ``scale`` times the standard scale (He for ReLU), from 0.1x to 10x, with
and without BN. The spread is the best minus the worst final test accuracy over the scales.
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
from batchnorm.lab.models import init_weights
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Rule, judge

RULE = Rule(threshold=2.0, supports="above", unit="pp")


@dataclass(frozen=True)
class InitConfig:
    norms: tuple[str, ...] = ("none", "batch")
    scales: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 0.02
    depth: int = 4
    width: int = 128
    activation: str = "relu"

    @classmethod
    def quick(cls) -> InitConfig:
        return replace(cls(), scales=(0.1, 1.0, 10.0), steps=150)


def plan(config: InitConfig, seeds) -> list[dict]:
    return [
        {"norm": norm, "scale": scale, "seed": seed}
        for seed in seeds
        for norm in config.norms
        for scale in config.scales
    ]


def run(config: InitConfig, params: dict, data, device: str) -> dict:
    make_mlp = mlp_builder(config, data, params["norm"])

    def build():
        model = make_mlp()
        init_weights(model, config.activation, scale=params["scale"])
        return model

    _, result = fit(
        build,
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        eval_every=config.steps,
    )
    return {"final_test_accuracy": result.test_accuracy[-1], "nonfinite": result.nonfinite}


def analyze(config: InitConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis()
    seeds = seeds_of(runs)
    accuracy = {
        key: group[0]["result"]["final_test_accuracy"]
        for key, group in by_params(runs, "norm", "scale", "seed").items()
    }

    def spread(norm: str, seed: int) -> float:
        values = [accuracy[(norm, scale, seed)] for scale in config.scales]
        return 100 * (max(values) - min(values))

    if "none" in config.norms and "batch" in config.norms:
        analysis.findings.append(
            judge(
                "C6",
                "init",
                "spread of final test accuracy over the initial scales (best minus worst) "
                "without BN minus with BN, in percentage points",
                [spread("none", seed) - spread("batch", seed) for seed in seeds],
                RULE,
            )
        )
    series, rows = [], []
    for norm in config.norms:
        means = []
        for scale in config.scales:
            values = [accuracy[(norm, scale, seed)] for seed in seeds]
            means.append(sum(values) / len(values))
        spreads = [spread(norm, seed) for seed in seeds]
        series.append(Series(norm, list(config.scales), means))
        rows.append([norm, *map(percent, means), f"{sum(spreads) / len(spreads):.1f} pp"])
    analysis.tables.append(
        Table(
            "Final test accuracy by initial weight scale (mean over seeds)",
            ["norm", *(f"{scale:g}x" for scale in config.scales), "mean spread"],
            rows,
        )
    )
    analysis.figures.append(
        Figure(
            "init",
            [Panel("Final test accuracy vs initial weight scale", "scale (x standard)",
                   "test accuracy", series, xscale="log")],
        )
    )
    return analysis


def setup(config: InitConfig) -> str:
    scales = ", ".join(f"{scale:g}x" for scale in config.scales)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, norm "
        f"{' vs '.join(config.norms)}. All weights start at {scales} the He scale. SGD (momentum "
        f"{MOMENTUM}) at learning rate {config.learning_rate:g}, batch {config.batch_size}, "
        f"{config.steps} steps."
    )


EXPERIMENT = Experiment(
    name="init",
    claims=("C6",),
    question="Does BN make the result depend less on the initial weight scale?",
    config_type=InitConfig,
    plan=plan,
    run=run,
    analyze=analyze,
    setup=setup,
    published="CLAIMS.md lists no published number for this claim.",
)
