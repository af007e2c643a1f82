"""C1 and C3 in the BN paper's MNIST setup: 3 hidden layers of 100 sigmoid units, batch 60.

With BN (before each sigmoid) and without, each at its learning rate tuned on the validation
part, it records validation accuracy over training and the 15th/50th/85th percentiles of every
last-hidden-layer unit's sigmoid input on the validation part (the same examples at every
checkpoint, so the percentiles move only because the network does).

Drift, the C3 measure, is taken over the late window of training only (the checkpoints from
``late_start`` of the run on), where the network has mostly learned: early on, every input
distribution moves because the network is learning, with BN or without. It is scale-free: for
each unit and percentile, the range over the window divided by the unit's spread (its 85th minus
15th percentile, averaged over the window), then averaged over units and percentiles. A network
whose pre-activations simply grow larger does not count as drifting more for that alone.
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
    band_caption,
    by_params,
    data_of,
    final_validation_accuracy,
    fit,
    interval_band,
    mlp_builder,
    one_per,
    percent,
    rate_tuning,
    seeds_of,
)
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Finding, Rule, accuracy_rule, judge

PERCENTILES = (15, 50, 85)
SHOWN_UNIT = 0  # the unit whose percentiles are plotted (the paper shows one typical unit)
DRIFT_THRESHOLD = 1.5


@dataclass(frozen=True)
class IoffeConfig:
    norms: tuple[str, ...] = ("none", "batch")
    tuning_rates: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    steps: int = 2000
    eval_every: int = 100
    late_start: float = 0.5  # drift is measured from this fraction of the run on
    batch_size: int = 60
    depth: int = 3
    width: int = 100

    @classmethod
    def quick(cls) -> IoffeConfig:
        return replace(cls(), tuning_rates=(0.1, 0.5), steps=300, eval_every=30)


def plan(config: IoffeConfig, seeds) -> list[dict]:
    return [{"norm": norm, "seed": seed} for seed in seeds for norm in config.norms]


def scale_free_drift(history: torch.Tensor) -> float:
    """``history``: (checkpoints, 3 percentiles, units). Each unit's range over the checkpoints
    divided by its spread (85th minus 15th percentile, averaged over the checkpoints)."""
    spread = (history[:, -1, :] - history[:, 0, :]).mean(dim=0).clamp_min(1e-8)
    ranges = history.amax(dim=0) - history.amin(dim=0)  # (3, units)
    return float((ranges / spread).mean())


def run(config: IoffeConfig, params: dict, data, device: str) -> dict:
    build = mlp_builder(config, data, params["norm"], activation="sigmoid", placement="before")
    quantiles = torch.tensor([p / 100 for p in PERCENTILES], device=device)
    history: list[torch.Tensor] = []  # per checkpoint: (3 percentiles, units)
    validation_vectors = data.validation.vectors.to(device)

    def record(step: int, model) -> None:
        captured = []
        hook = model.activations[-1].register_forward_hook(
            lambda module, inputs, output: captured.append(inputs[0].detach())
        )
        model.eval()
        with torch.no_grad():
            model(validation_vectors)
        model.train()
        hook.remove()
        history.append(torch.quantile(captured[0].float(), quantiles, dim=0).cpu())

    fitted = fit(
        build,
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=params["learning_rate"],
        eval_every=config.eval_every,
        on_checkpoint=record,
    )
    training = fitted.training
    recorded = torch.stack(history)  # (checkpoints, 3, units); stops early if a run diverged
    steps = training.steps[: len(history)]
    late = [index for index, step in enumerate(steps) if step >= config.late_start * config.steps]
    finite = bool(torch.isfinite(recorded).all())
    return {
        "steps": training.steps,
        "validation_accuracy": training.validation_accuracy,
        "nonfinite": training.nonfinite,
        "percentile_steps": steps,
        "shown_unit_percentiles": [
            [float(value) for value in recorded[:, index, SHOWN_UNIT]]
            for index in range(len(PERCENTILES))
        ],
        # From step 1 on: at step 0 BN's running statistics are still their initial values.
        "drift_whole_run": scale_free_drift(recorded[1:]) if finite else None,
        "drift": scale_free_drift(recorded[late]) if finite and len(late) >= 2 else None,
        **fitted.test_record(),
    }


TUNING = rate_tuning(
    ("norm",),
    groups=lambda config: [{"norm": norm} for norm in config.norms],
    rates=lambda config: config.tuning_rates,
    score=final_validation_accuracy,
    score_name="final validation accuracy",
)


def drift_rule(config: IoffeConfig, validation_examples: int) -> Rule:
    why = (
        f"the percentiles come from the same {validation_examples} validation examples at every "
        "checkpoint, so which examples were drawn does not move them; the drift of one network "
        "from seed to seed is inside the interval. The threshold asks for at least half as much "
        f"drift again without BN ({DRIFT_THRESHOLD:g}x) before calling it less shift"
    )
    return Rule(threshold=DRIFT_THRESHOLD, supports="above", scale="log", unit="x", why=why)


def findings(config: IoffeConfig, runs: list[dict]) -> list[Finding]:
    if not {"none", "batch"} <= set(config.norms):
        return []
    results = one_per(runs, "norm", "seed")
    seeds = seeds_of(runs)
    data = data_of(runs)
    validation_examples = runs[0]["result"]["validation_size"]

    def mean_accuracy(norm: str, seed: int) -> float:
        curve = results[(norm, seed)]["validation_accuracy"][1:]
        return 100 * sum(curve) / len(curve)

    found = [
        judge(
            "C1",
            "ioffe-mnist",
            "validation accuracy averaged over the checkpoints of training (sooner and higher "
            "both count), BN minus none, in percentage points",
            [mean_accuracy("batch", seed) - mean_accuracy("none", seed) for seed in seeds],
            accuracy_rule(validation_examples, 2),
            data=data,
            split="validation",
        )
    ]
    drifts = [(results[("none", s)]["drift"], results[("batch", s)]["drift"]) for s in seeds]
    usable = [(none, batch) for none, batch in drifts if none is not None and batch is not None]
    found.append(
        judge(
            "C3",
            "ioffe-mnist",
            "drift of the last hidden layer's sigmoid inputs over the late window (range of "
            "each unit's 15/50/85th percentiles relative to the unit's spread) without BN divided "
            "by with BN",
            [none / batch for none, batch in usable],
            drift_rule(config, validation_examples),
            data=data,
            split="validation",
        )
    )
    return found


def analyze(config: IoffeConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = seeds_of(runs)
    grouped = by_params(runs, "norm")
    accuracy_series, percentile_panels, rows = [], [], []
    for norm in config.norms:
        group = [run["result"] for run in grouped.get((norm,), [])]
        if not group:
            continue
        rate = grouped[(norm,)][0]["params"]["learning_rate"]
        mean, low, high = interval_band([result["validation_accuracy"] for result in group])
        accuracy_series.append(Series(f"{norm} (lr {rate:g})", group[0]["steps"],
                                      [100 * v for v in mean], [100 * v for v in low],
                                      [100 * v for v in high]))
        first = group[0]
        series = [
            Series(f"{p}th percentile", first["percentile_steps"], values)
            for p, values in zip(PERCENTILES, first["shown_unit_percentiles"], strict=True)
        ]
        percentile_panels.append(
            Panel(f"Sigmoid input of one last-layer unit, {norm} (seed {seeds[0]})", "step",
                  "input to the sigmoid", series)
        )
        late = [result["drift"] for result in group if result["drift"] is not None]
        whole = [result["drift_whole_run"] for result in group
                 if result["drift_whole_run"] is not None]
        tests = [result["test_accuracy"] for result in group]
        rows.append([
            norm, f"{rate:g}", percent(sum(tests) / len(tests)),
            f"{sum(late) / len(late):.3f}" if late else "n/a",
            f"{sum(whole) / len(whole):.3f}" if whole else "n/a",
        ])
    analysis.figures.append(
        Figure(
            "ioffe-mnist",
            [Panel("Validation accuracy over training", "step", "validation accuracy (%)",
                   accuracy_series),
             *percentile_panels],
            caption=band_caption(
                "Left: validation accuracy (%) of the sigmoid MLP with and without BN, each at "
                "its tuned rate. Right: the 15th, 50th and 85th percentiles of one last-layer "
                f"unit's sigmoid input on the validation part, one seed (seed {seeds[0]}), as in "
                "the BN paper's Figure 1",
                len(seeds),
                f"The drift measure uses the checkpoints from step "
                f"{int(config.late_start * config.steps)} on.",
            ),
        )
    )
    analysis.tables.append(
        Table("Final test accuracy and drift of the sigmoid inputs (mean over seeds); drift is "
              "relative to each unit's spread",
              ["norm", "learning rate (tuned)", "final test accuracy", "drift, late window",
               "drift, whole run (after step 0)"], rows)
    )
    return analysis


def setup(config: IoffeConfig) -> str:
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} sigmoid units, BN (ours) before "
        f"each sigmoid vs no norm. SGD (momentum {MOMENTUM}), batch {config.batch_size}, "
        f"{config.steps} steps, checkpoints every {config.eval_every} steps. The paper gives no "
        f"learning rate for MNIST: each norm's is chosen from {rates} on the validation part "
        "(final validation accuracy, tuning seeds). Drift over the checkpoints from "
        f"{percent(config.late_start)} of the run on."
    )


def cost(config: IoffeConfig, params: dict) -> float:
    return config.steps * 1.5


EXPERIMENT = Experiment(
    name="ioffe-mnist",
    claims=("C1", "C3"),
    question="In the BN paper's MNIST setup, does BN learn sooner and keep layer inputs steadier?",
    config_type=IoffeConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="digits",
    data_reason=(
        "This is the BN paper's own MNIST setup, so it runs on the closest data we carry: real "
        "handwritten digit images (8x8). The drift measure needs no headroom in accuracy, and "
        "the sigmoid network without BN is slow enough here for 'sooner' to show."
    ),
    published=(
        "Ioffe & Szegedy 2015, Figure 1 (MNIST, 50,000 steps, batch 60): the BN network reaches "
        "higher test accuracy sooner, and the 15/50/85th percentiles of a last-layer sigmoid "
        "input stay steady with BN while they wander without it. The paper reports this as "
        "curves, without a number to compare."
    ),
    tuning=TUNING,
    cost=cost,
)
