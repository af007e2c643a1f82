"""Baselines: where the lab's models stand on MNIST-1D beside the data set's published figures.

No claim is judged here. The data set's authors report test accuracies for logistic regression,
an MLP, a CNN and a GRU; the MLP and CNN rows get ours from the experiments that train those
networks without a norm (regularization, convergence), and this experiment trains the other two
the same way as the rest of the lab (SGD with momentum, the learning rate chosen on the validation
part, the test part scored once at the end), so that a reader can see whether our training
budgets leave the networks near the published figures or well below them.

The default suite trains logistic regression only: a GRU reading 40 steps one value at a time
took 32 s a run at 1,000 steps on one core of a busy machine (and was still learning there), more
than the whole suite's budget allows for a reference point. ``models=("logistic", "gru")`` adds
it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from batchnorm.lab.experiments.base import (
    Analysis,
    Baseline,
    Experiment,
    Table,
    by_params,
    final_validation_accuracy,
    fit,
    percent,
    rate_tuning,
    seeds_of,
)
from batchnorm.lab.training import MOMENTUM

MODELS = ("logistic", "gru")
PUBLISHED_NAME = {"logistic": "logistic regression", "gru": "GRU"}


class LogisticRegression(nn.Module):
    """One linear layer on the flattened signal."""

    def __init__(self, input_size: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class GRUClassifier(nn.Module):
    """A GRU reading the signal one value per time step; its last hidden state is classified."""

    def __init__(self, classes: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = x.flatten(1).unsqueeze(-1)  # (N, L, 1)
        _, last = self.gru(sequence)
        return self.classifier(last[-1])


@dataclass(frozen=True)
class BaselinesConfig:
    models: tuple[str, ...] = ("logistic",)
    tuning_rates: tuple[float, ...] = (0.03, 0.1)
    steps: int = 1000
    eval_every: int = 250
    batch_size: int = 64
    hidden: int = 64

    @classmethod
    def quick(cls) -> BaselinesConfig:
        return replace(cls(), tuning_rates=(0.1,), steps=100, eval_every=100, hidden=32)


def plan(config: BaselinesConfig, seeds) -> list[dict]:
    return [{"model": model, "seed": seed} for seed in seeds for model in config.models]


def builder(config: BaselinesConfig, model: str, data):
    if model == "logistic":
        return lambda: LogisticRegression(data.input_size, data.classes)
    if model == "gru":
        return lambda: GRUClassifier(data.classes, config.hidden)
    raise ValueError(f"unknown baseline model '{model}': expected one of {', '.join(MODELS)}")


def run(config: BaselinesConfig, params: dict, data, device: str) -> dict:
    fitted = fit(
        builder(config, params["model"], data),
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=params["learning_rate"],
        eval_every=config.eval_every,
    )
    return fitted.record()


TUNING = rate_tuning(
    ("model",),
    groups=lambda config: [{"model": model} for model in config.models],
    rates=lambda config: config.tuning_rates,
    score=final_validation_accuracy,
    score_name="final validation accuracy",
)


def findings(config: BaselinesConfig, runs: list[dict]) -> list:
    return []  # a reference point, not a test of a claim


def analyze(config: BaselinesConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis()
    rows = []
    for (model,), group in by_params(runs, "model").items():
        tests = [run["result"]["test_accuracy"] for run in group]
        mean = sum(tests) / len(tests)
        rate = group[0]["params"]["learning_rate"]
        setting = (f"ours, {config.steps} SGD steps of batch {config.batch_size}, rate {rate:g} "
                   "chosen on validation")
        if model == "gru":
            setting = f"{setting}, {config.hidden} hidden units"
        analysis.baselines.append(Baseline(group[0]["result"]["data"], PUBLISHED_NAME[model],
                                           setting, 100 * mean, len(tests)))
        rows.append([PUBLISHED_NAME[model], f"{rate:g}", percent(mean),
                     f"{100 * min(tests):.1f}-{100 * max(tests):.1f}%"])
    analysis.tables.append(Table(
        f"Baselines: test accuracy over {len(seeds_of(runs))} seeds",
        ["model", "learning rate (tuned)", "mean", "range over seeds"], rows))
    return analysis


def setup(config: BaselinesConfig) -> str:
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    gru = (f" and a GRU ({config.hidden} hidden units, one value of the signal per time step)"
           if "gru" in config.models else "")
    return (
        f"Logistic regression{gru}, SGD (momentum {MOMENTUM}), batch {config.batch_size}, "
        f"{config.steps} steps, the learning rate chosen from {rates} on the validation part."
    )


def cost(config: BaselinesConfig, params: dict) -> float:
    return config.steps * (6.0 if params["model"] == "gru" else 0.3)


EXPERIMENT = Experiment(
    name="baselines",
    claims=(),
    question="Where do plain models trained as the lab trains them stand on MNIST-1D?",
    config_type=BaselinesConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason="The published baselines are MNIST-1D's.",
    published=(
        "MNIST-1D's authors: logistic regression about 32%, MLP about 68%, CNN about 94%, GRU "
        "about 91% (as quoted); the data-set table of this report sets ours beside them."
    ),
    tuning=TUNING,
    cost=cost,
)
