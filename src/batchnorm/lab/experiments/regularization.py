"""C5, regularization: the train/test accuracy gap with and without BN, with and without dropout.

A network wide enough to fit the training set is trained long enough to do so; the gap is
training accuracy minus test accuracy, both in inference mode.
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
from batchnorm.lab.training import MOMENTUM, accuracy
from batchnorm.lab.verdict import Rule, judge

GAP_RULE = Rule(threshold=0.5, supports="above", unit="pp")
REPLACES_DROPOUT_RULE = Rule(threshold=-1.0, supports="above", unit="pp")


@dataclass(frozen=True)
class RegularizationConfig:
    norms: tuple[str, ...] = ("none", "batch")
    dropouts: tuple[float, ...] = (0.0, 0.3)
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 0.02
    depth: int = 2
    width: int = 512
    activation: str = "relu"

    @classmethod
    def quick(cls) -> RegularizationConfig:
        return replace(cls(), steps=300, width=256)


def plan(config: RegularizationConfig, seeds) -> list[dict]:
    return [
        {"norm": norm, "dropout": dropout, "seed": seed}
        for seed in seeds
        for norm in config.norms
        for dropout in config.dropouts
    ]


def run(config: RegularizationConfig, params: dict, data, device: str) -> dict:
    build = mlp_builder(config, data, params["norm"], dropout=params["dropout"])

    model, result = fit(
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
    train_accuracy = accuracy(model, data.train_vectors.to(device), data.train_labels.to(device))
    return {
        "train_accuracy": train_accuracy,
        "test_accuracy": result.test_accuracy[-1],
        "nonfinite": result.nonfinite,
    }


def analyze(config: RegularizationConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis()
    seeds = seeds_of(runs)
    grouped = by_params(runs, "norm", "dropout", "seed")
    results = {key: group[0]["result"] for key, group in grouped.items()}

    def gap(norm: str, dropout: float, seed: int) -> float:
        result = results[(norm, dropout, seed)]
        return 100 * (result["train_accuracy"] - result["test_accuracy"])

    has_both = "none" in config.norms and "batch" in config.norms
    if has_both and 0.0 in config.dropouts:
        analysis.findings.append(
            judge(
                "C5",
                "regularization",
                "train/test gap without BN minus with BN (no dropout), in percentage points",
                [gap("none", 0.0, seed) - gap("batch", 0.0, seed) for seed in seeds],
                GAP_RULE,
            )
        )
        with_dropout = max(config.dropouts)
        if with_dropout > 0:
            analysis.findings.append(
                judge(
                    "C5",
                    "regularization",
                    f"test accuracy of BN without dropout minus that of no BN with dropout "
                    f"{with_dropout:g}, in percentage points (BN can replace dropout if it is "
                    "not worse by more than the threshold)",
                    [
                        100 * (results[("batch", 0.0, s)]["test_accuracy"]
                               - results[("none", with_dropout, s)]["test_accuracy"])
                        for s in seeds
                    ],
                    REPLACES_DROPOUT_RULE,
                )
            )
    rows, train_series, test_series = [], [], []
    labels = []
    for norm in config.norms:
        for dropout in config.dropouts:
            group = [results[(norm, dropout, seed)] for seed in seeds]
            train_mean = sum(r["train_accuracy"] for r in group) / len(group)
            test_mean = sum(r["test_accuracy"] for r in group) / len(group)
            gaps = [gap(norm, dropout, seed) for seed in seeds]
            label = f"{norm}, dropout {dropout:g}"
            labels.append(label)
            rows.append([label, percent(train_mean), percent(test_mean),
                         f"{sum(gaps) / len(gaps):.1f} pp"])
            train_series.append(train_mean)
            test_series.append(test_mean)
    positions = list(range(len(labels)))
    analysis.tables.append(
        Table("Train and test accuracy (mean over seeds)",
              ["setting", "train accuracy", "test accuracy", "gap"], rows)
    )
    analysis.figures.append(
        Figure(
            "regularization",
            [Panel("Train and test accuracy (mean over seeds)", "setting", "accuracy",
                   [Series("train", positions, train_series, style="o"),
                    Series("test", positions, test_series, style="s")],
                   xticklabels=[label.replace(", ", "\n") for label in labels])],
        )
    )
    return analysis


def setup(config: RegularizationConfig) -> str:
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, norm "
        f"{' vs '.join(config.norms)}, dropout {' vs '.join(f'{d:g}' for d in config.dropouts)} "
        f"after each activation. SGD (momentum {MOMENTUM}) at learning rate "
        f"{config.learning_rate:g}, batch {config.batch_size}, {config.steps} steps."
    )


EXPERIMENT = Experiment(
    name="regularization",
    claims=("C5",),
    question="Does BN narrow the train/test gap, and can it stand in for dropout?",
    config_type=RegularizationConfig,
    plan=plan,
    run=run,
    analyze=analyze,
    setup=setup,
    published=(
        "Santurkar et al. 2018, VGG on CIFAR-10: 83% test accuracy with BN against 80% without "
        "(secondary, as quoted)."
    ),
)
