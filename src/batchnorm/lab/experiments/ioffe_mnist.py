"""C1 and C3 in the BN paper's MNIST setup: 3 hidden layers of 100 sigmoid units, batch 60.

With BN (before each sigmoid) and without, it records test accuracy over training and the
15th/50th/85th percentiles of the sigmoid inputs of the last hidden layer on the test set. Drift
is the range of a percentile over the checkpoints after step 0 (at step 0 BN's running statistics
are still their initial values), averaged over the three percentiles and all units.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

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
    spread_band,
)
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Rule, judge

PERCENTILES = (15, 50, 85)
SHOWN_UNIT = 0  # the unit whose percentiles are plotted (the paper shows one typical unit)
ACCURACY_RULE = Rule(threshold=1.0, supports="above", unit="pp")
DRIFT_RULE = Rule(threshold=1.5, supports="above", scale="log", unit="x")


@dataclass(frozen=True)
class IoffeConfig:
    norms: tuple[str, ...] = ("none", "batch")
    steps: int = 3000
    eval_every: int = 100
    batch_size: int = 60
    learning_rate: float = 0.05
    depth: int = 3
    width: int = 100

    @classmethod
    def quick(cls) -> IoffeConfig:
        return replace(cls(), steps=400, eval_every=40)


def plan(config: IoffeConfig, seeds) -> list[dict]:
    return [{"norm": norm, "seed": seed} for seed in seeds for norm in config.norms]


def run(config: IoffeConfig, params: dict, data, device: str) -> dict:
    build = mlp_builder(config, data, params["norm"], activation="sigmoid", placement="before")

    quantiles = torch.tensor([p / 100 for p in PERCENTILES], device=device)
    history: list[torch.Tensor] = []  # per checkpoint: (3 percentiles, units)
    test_vectors = data.test_vectors.to(device)

    def record(step: int, model) -> None:
        captured = []
        hook = model.activations[-1].register_forward_hook(
            lambda module, inputs, output: captured.append(inputs[0].detach())
        )
        model.eval()
        with torch.no_grad():
            model(test_vectors)
        model.train()
        hook.remove()
        history.append(torch.quantile(captured[0].float(), quantiles, dim=0).cpu())

    _, result = fit(
        build,
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        eval_every=config.eval_every,
        on_checkpoint=record,
    )
    after_start = torch.stack(history[1:])  # (checkpoints, 3, units)
    drift = (after_start.amax(dim=0) - after_start.amin(dim=0)).mean()
    recorded = len(history)
    return {
        "steps": result.steps,
        "test_accuracy": result.test_accuracy,
        "nonfinite": result.nonfinite,
        "percentile_steps": result.steps[:recorded],
        "shown_unit_percentiles": [
            [float(value) for value in torch.stack(history)[:, index, SHOWN_UNIT]]
            for index in range(len(PERCENTILES))
        ],
        "drift": float(drift),
    }


def analyze(config: IoffeConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis()
    seeds = seeds_of(runs)
    runs_of = {key: group[0] for key, group in by_params(runs, "norm", "seed").items()}

    def mean_accuracy(norm: str, seed: int) -> float:
        curve = runs_of[(norm, seed)]["result"]["test_accuracy"][1:]
        return sum(curve) / len(curve)

    def drift(norm: str, seed: int) -> float:
        return runs_of[(norm, seed)]["result"]["drift"]

    if "none" in config.norms and "batch" in config.norms:
        analysis.findings.append(
            judge(
                "C1",
                "ioffe-mnist",
                "test accuracy averaged over the checkpoints of training (sooner and higher "
                "both count), BN minus none, in percentage points",
                [100 * (mean_accuracy("batch", s) - mean_accuracy("none", s)) for s in seeds],
                ACCURACY_RULE,
            )
        )
        analysis.findings.append(
            judge(
                "C3",
                "ioffe-mnist",
                "drift of the last hidden layer's sigmoid inputs (range of the 15/50/85th "
                "percentiles over training) without BN divided by with BN",
                [drift("none", seed) / drift("batch", seed) for seed in seeds],
                DRIFT_RULE,
            )
        )
    accuracy_series, percentile_panels, rows = [], [], []
    for norm in config.norms:
        group = [runs_of[(norm, seed)]["result"] for seed in seeds]
        mean, low, high = spread_band([result["test_accuracy"] for result in group])
        accuracy_series.append(Series(norm, group[0]["steps"], mean, low, high))
        first = group[0]
        series = [
            Series(f"{p}th percentile", first["percentile_steps"], values)
            for p, values in zip(PERCENTILES, first["shown_unit_percentiles"], strict=True)
        ]
        percentile_panels.append(
            Panel(f"Sigmoid input of one last-layer unit, {norm} (seed {seeds[0]})", "step",
                  "input to the sigmoid", series)
        )
        drifts = [result["drift"] for result in group]
        finals = [result["test_accuracy"][-1] for result in group]
        rows.append(
            [norm, percent(sum(finals) / len(finals)), f"{sum(drifts) / len(drifts):.3f}"]
        )
    analysis.figures.append(
        Figure(
            "ioffe-mnist",
            [Panel("Test accuracy over training", "step", "test accuracy", accuracy_series),
             *percentile_panels],
        )
    )
    analysis.tables.append(
        Table("Final test accuracy and drift (mean over seeds)",
              ["norm", "final test accuracy", "drift of sigmoid inputs"], rows)
    )
    return analysis


def setup(config: IoffeConfig) -> str:
    return (
        f"MLP, {config.depth} hidden layers of {config.width} sigmoid units, BN (ours) before "
        f"each sigmoid vs no norm. SGD (momentum {MOMENTUM}) at learning rate "
        f"{config.learning_rate:g} (the paper gives none for MNIST; this is ours), batch "
        f"{config.batch_size}, {config.steps} steps, checkpoints every {config.eval_every} steps."
    )


EXPERIMENT = Experiment(
    name="ioffe-mnist",
    claims=("C1", "C3"),
    question="In the BN paper's MNIST setup, does BN learn sooner and keep layer inputs steadier?",
    config_type=IoffeConfig,
    plan=plan,
    run=run,
    analyze=analyze,
    setup=setup,
    published=(
        "Ioffe & Szegedy 2015, Figure 1 (MNIST, 50,000 steps, batch 60): the BN network reaches "
        "higher test accuracy sooner, and the 15/50/85th percentiles of a last-layer sigmoid "
        "input stay steady with BN while they wander without it. The paper reports this as "
        "curves, without a number to compare."
    ),
)
