"""C5, regularization: the train/test accuracy gap with and without BN, with and without dropout.

A network wide enough to fit much of the training part trains long enough to do so, each setting
at its learning rate tuned on the validation part; the gap is training accuracy minus test
accuracy, both in inference mode.

"BN can replace dropout" is a non-inferiority question: is BN without dropout at most a margin
worse on test than the same network without BN but with dropout? The margin is the smallest
difference the test set resolves (twice the largest standard error of a difference of two test
accuracies), so the question is not answered by a margin wide enough to excuse anything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from batchnorm.lab.experiments.base import (
    Analysis,
    Baseline,
    Experiment,
    Figure,
    Panel,
    Series,
    Table,
    band_caption,
    data_of,
    final_validation_accuracy,
    fit,
    interval_band,
    mlp_builder,
    one_per,
    rate_tuning,
    seeds_of,
    test_outcomes,
    test_size,
)
from batchnorm.lab.stats import accuracy_effect
from batchnorm.lab.training import MOMENTUM, accuracy
from batchnorm.lab.verdict import Finding, accuracy_rule, judge_accuracy


@dataclass(frozen=True)
class RegularizationConfig:
    norms: tuple[str, ...] = ("none", "batch")
    dropouts: tuple[float, ...] = (0.0, 0.3)
    tuning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    steps: int = 2000
    eval_every: int = 500
    batch_size: int = 32
    depth: int = 2
    width: int = 256
    activation: str = "relu"

    @classmethod
    def quick(cls) -> RegularizationConfig:
        return replace(cls(), tuning_rates=(0.03,), steps=300, eval_every=300, width=128)


def plan(config: RegularizationConfig, seeds) -> list[dict]:
    return [
        {"norm": norm, "dropout": dropout, "seed": seed}
        for seed in seeds
        for norm in config.norms
        for dropout in config.dropouts
    ]


def run(config: RegularizationConfig, params: dict, data, device: str) -> dict:
    fitted = fit(
        mlp_builder(config, data, params["norm"], dropout=params["dropout"]),
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=params["learning_rate"],
        eval_every=config.eval_every,
    )
    train_accuracy = accuracy(
        fitted.model, data.train.vectors.to(device), data.train.labels.to(device)
    )
    return fitted.record(train_accuracy=train_accuracy)


TUNING = rate_tuning(
    ("norm", "dropout"),
    groups=lambda config: [{"norm": n, "dropout": d} for n in config.norms
                           for d in config.dropouts],
    rates=lambda config: config.tuning_rates,
    score=final_validation_accuracy,
    score_name="final validation accuracy",
)


def findings(config: RegularizationConfig, runs: list[dict]) -> list[Finding]:
    if not {"none", "batch"} <= set(config.norms) or 0.0 not in config.dropouts:
        return []
    results = one_per(runs, "norm", "dropout", "seed")
    seeds = seeds_of(runs)
    examples = test_size(runs)
    data = data_of(runs)

    def outcomes(norm: str, dropout: float):
        return [test_outcomes(results[(norm, dropout, seed)]) for seed in seeds]

    def train_accuracy(norm: str, dropout: float, seed: int) -> float:
        return 100 * results[(norm, dropout, seed)]["train_accuracy"]

    # Gap without BN minus gap with BN: (train_none - test_none) - (train_bn - test_bn).
    gap = accuracy_effect(
        [(-1.0, outcomes("none", 0.0)), (+1.0, outcomes("batch", 0.0))],
        offsets=[train_accuracy("none", 0.0, s) - train_accuracy("batch", 0.0, s)
                 for s in seeds],
    )
    found = [
        judge_accuracy(
            "C5",
            "regularization",
            "train/test gap without BN minus with BN (no dropout), in percentage points",
            gap,
            accuracy_rule(examples, 2),
            data=data,
        )
    ]
    with_dropout = max(config.dropouts)
    if with_dropout > 0:
        difference = accuracy_effect(
            [(+1.0, outcomes("batch", 0.0)), (-1.0, outcomes("none", with_dropout))]
        )
        found.append(
            judge_accuracy(
                "C5",
                "regularization",
                f"test accuracy of BN without dropout minus that of no BN with dropout "
                f"{with_dropout:g}, in percentage points (BN can replace dropout if it is not "
                "worse by more than the margin)",
                difference,
                accuracy_rule(examples, 2, sign=-1.0),
                data=data,
            )
        )
    return found


def analyze(config: RegularizationConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = seeds_of(runs)
    results = one_per(runs, "norm", "dropout", "seed")
    rows, labels = [], []
    train_means, train_lows, train_highs = [], [], []
    test_means, test_lows, test_highs = [], [], []
    for norm in config.norms:
        for dropout in config.dropouts:
            if not all((norm, dropout, seed) in results for seed in seeds):
                continue
            group = [results[(norm, dropout, seed)] for seed in seeds]
            rate = next(run["params"]["learning_rate"] for run in runs
                        if (run["params"]["norm"], run["params"]["dropout"]) == (norm, dropout))
            (train,), (train_low,), (train_high,) = interval_band(
                [[100 * r["train_accuracy"]] for r in group])
            (test,), (test_low,), (test_high,) = interval_band(
                [[100 * r["test_accuracy"]] for r in group])
            labels.append(f"{norm}, dropout {dropout:g}")
            if norm == "none" and dropout == 0.0:
                analysis.baselines.append(Baseline(
                    group[0]["data"], "MLP",
                    f"our MLP without a norm or dropout, {config.depth}x{config.width}",
                    test, len(group)))
            rows.append([labels[-1], f"{rate:g}", f"{train:.1f}%", f"{test:.1f}%",
                         f"{train - test:+.1f} pp"])
            train_means.append(train), train_lows.append(train_low)
            train_highs.append(train_high)
            test_means.append(test), test_lows.append(test_low), test_highs.append(test_high)
    positions = list(range(len(labels)))
    analysis.tables.append(
        Table("Train and test accuracy (mean over seeds)",
              ["setting", "learning rate (tuned)", "train accuracy", "test accuracy", "gap"],
              rows)
    )
    analysis.figures.append(
        Figure(
            "regularization",
            [Panel("Train and test accuracy", "setting", "accuracy (%)",
                   [Series("train", positions, train_means, train_lows, train_highs,
                           style="o"),
                    Series("test", positions, test_means, test_lows, test_highs, style="s")],
                   xticklabels=[label.replace(", ", "\n") for label in labels])],
            caption=band_caption(
                "Final training and test accuracy (%) of each setting (markers at the mean)",
                len(seeds),
                "Here the bands are drawn as error bars.",
            ),
        )
    )
    return analysis


def setup(config: RegularizationConfig) -> str:
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, norm "
        f"{' vs '.join(config.norms)}, dropout {' vs '.join(f'{d:g}' for d in config.dropouts)} "
        f"after each activation. SGD (momentum {MOMENTUM}), batch {config.batch_size}, "
        f"{config.steps} steps, each setting's learning rate chosen from {rates} on the "
        "validation part."
    )


def cost(config: RegularizationConfig, params: dict) -> float:
    return config.steps * 2.0 * (config.width / 256)


EXPERIMENT = Experiment(
    name="regularization",
    claims=("C5",),
    question="Does BN narrow the train/test gap, and can it stand in for dropout?",
    config_type=RegularizationConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "On the digits every setting ends within a few test images of the others (a gap of "
        "1-3%), below what 540 test examples resolve; on MNIST-1D an MLP overfits plainly, so a "
        "regularizer has something to remove."
    ),
    published=(
        "Santurkar et al. 2018, VGG on CIFAR-10: 83% test accuracy with BN against 80% without "
        "(secondary, as quoted)."
    ),
    published_tables=(
        Table(
            "Published, in our unit (secondary, as quoted)",
            ["source", "test accuracy with BN", "without BN", "BN minus none"],
            [["Santurkar et al. 2018, VGG CIFAR-10", "83%", "80%", "+3.0 pp"]],
        ),
    ),
    cost=cost,
    tuning=TUNING,
)
