"""C9 and C15, batch size: accuracy from batch 2 to 128, BN against batch renormalization,
ghost batch norm, cross-iteration batch norm, GroupNorm and LayerNorm, on an MLP and, beside it,
a CNN.

Every batch size trains for the same number of epochs with the learning rate scaled linearly
(``base rate * batch / reference_batch``), as in the GroupNorm paper; each model and norm's base
rate is tuned on the validation part at the reference batch. Evaluation uses each norm's
inference mode, so BN is judged with the population statistics it gathered.

C9 ("BN degrades with small batches") and C15 ("BN is robust to batch size") are one measure
judged by one rule and its complement: BN's loss of test accuracy from the reference batch to the
smallest, minus the loss of a norm that does not use the batch (LayerNorm for the MLP, GroupNorm
for the CNN), so that what every network loses at tiny batches is not blamed on BN.
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
    band_caption,
    cnn_builder,
    data_of,
    final_validation_accuracy,
    fit,
    interval_band,
    mlp_builder,
    one_per,
    percent,
    rate_tuning,
    seeds_of,
    test_outcomes,
    test_size,
)
from batchnorm.lab.models import CROSS_ITERATION_WINDOW, GHOST_BATCH, RENORM_LIMITS
from batchnorm.lab.stats import accuracy_effect
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Finding, accuracy_rule, judge_accuracy

MODELS = ("mlp", "cnn")
# The norm each model's BN is compared with: one whose statistics do not depend on the batch.
REFERENCE_NORM = {"mlp": "layer", "cnn": "group"}
WU_HE = Table(
    "Wu & He 2018, ResNet-50 on ImageNet: top-1 accuracy (%) by images per GPU, i.e. 100 minus "
    "the published error",
    ["images/GPU", "32", "16", "8", "4", "2", "loss from 32 to 2"],
    [
        ["BN", "76.4", "76.3", "75.2", "72.7", "65.3", "11.1 pp"],
        ["GN", "75.9", "75.8", "76.0", "75.8", "75.9", "0.0 pp"],
        ["BN's loss minus GN's", "", "", "", "", "", "+11.1 pp"],
    ],
)


@dataclass(frozen=True)
class BatchSizeConfig:
    mlp_norms: tuple[str, ...] = ("batch", "renorm", "ghost", "cross-iteration", "group", "layer")
    cnn_norms: tuple[str, ...] = ("batch", "group", "layer")
    batch_sizes: tuple[int, ...] = (2, 8, 32, 128)
    reference_batch: int = 32
    tuning_rates: tuple[float, ...] = (0.03, 0.1, 0.3)
    epochs: int = 2
    depth: int = 3
    width: int = 128
    widths: tuple[int, ...] = (16, 32, 32)

    @classmethod
    def quick(cls) -> BatchSizeConfig:
        # Batch 4 rather than 2 as the small batch: half the steps, and BN still has only four
        # numbers per unit to normalize with.
        return replace(cls(), mlp_norms=("batch", "layer"), cnn_norms=("batch", "group"),
                       batch_sizes=(4, 32), tuning_rates=(0.1,), epochs=1)

    def norms(self, model: str) -> tuple[str, ...]:
        return self.mlp_norms if model == "mlp" else self.cnn_norms


def _sizes(config: BatchSizeConfig, norm: str) -> list[int]:
    # Ghost batch norm with virtual batches of GHOST_BATCH is exactly batch norm at batches up to
    # that size: those runs would repeat BN's, so they are not run.
    if norm == "ghost":
        return [size for size in config.batch_sizes if size > GHOST_BATCH]
    # Cross-iteration batch norm answers small batches: above the reference batch it is not run
    # (it costs a third more per step than batch norm, and the lab's time is kept for the cells
    # that test it).
    if norm == "cross-iteration":
        return [size for size in config.batch_sizes if size <= config.reference_batch]
    return list(config.batch_sizes)


def plan(config: BatchSizeConfig, seeds) -> list[dict]:
    return [
        {"model": model, "norm": norm, "batch_size": size, "seed": seed}
        for seed in seeds
        for model in MODELS
        for norm in config.norms(model)
        for size in _sizes(config, norm)
    ]


def learning_rate(config: BatchSizeConfig, base_rate: float, batch_size: int) -> float:
    return base_rate * batch_size / config.reference_batch


def steps_for(config: BatchSizeConfig, data_size: int, batch_size: int) -> int:
    return config.epochs * (data_size // batch_size)


def run(config: BatchSizeConfig, params: dict, data, device: str) -> dict:
    size, model = params["batch_size"], params["model"]
    if model == "mlp":
        build = mlp_builder(config, data, params["norm"])
    else:
        build = cnn_builder(data, config.widths, params["norm"])
    fitted = fit(
        build,
        data,
        device,
        params["seed"],
        images=model == "cnn",
        steps=steps_for(config, len(data.train), size),
        batch_size=size,
        learning_rate=learning_rate(config, params["learning_rate"], size),
        eval_every=steps_for(config, len(data.train), size),
    )
    return fitted.record()


TUNING = rate_tuning(
    ("model", "norm"),
    groups=lambda config: [{"model": m, "norm": n} for m in MODELS for n in config.norms(m)],
    rates=lambda config: config.tuning_rates,
    score=final_validation_accuracy,
    score_name="final validation accuracy at the reference batch",
    fixed=lambda config: {"batch_size": config.reference_batch},
)


def degradation_rule(test_examples: int):
    """C9's rule; C15 uses its complement."""
    return accuracy_rule(test_examples, 4)


def findings(config: BatchSizeConfig, runs: list[dict]) -> list[Finding]:
    small, reference = min(config.batch_sizes), config.reference_batch
    if reference not in config.batch_sizes or small >= reference:
        return []
    found = []
    for model in MODELS:
        other = REFERENCE_NORM[model]
        model_runs = [run for run in runs if run["params"]["model"] == model]
        if not model_runs or not {"batch", other} <= set(config.norms(model)):
            continue
        results = one_per(model_runs, "norm", "batch_size", "seed")
        seeds = seeds_of(model_runs)

        def outcomes(norm: str, size: int, results=results, seeds=seeds):
            return [test_outcomes(results[(norm, size, seed)]) for seed in seeds]

        # BN's drop (reference minus small) minus the other norm's drop.
        effect = accuracy_effect([
            (+1.0, outcomes("batch", reference)),
            (-1.0, outcomes("batch", small)),
            (-1.0, outcomes(other, reference)),
            (+1.0, outcomes(other, small)),
        ])
        rule = degradation_rule(test_size(model_runs))
        measure = (
            f"{model.upper()}: BN's loss of test accuracy from batch {reference} to batch "
            f"{small}, minus {other} norm's loss, in percentage points"
        )
        data = data_of(model_runs)
        found.append(judge_accuracy("C9", "batch-size", measure, effect, rule, data=data))
        found.append(
            judge_accuracy("C15", "batch-size", measure + " (robust: below the threshold)",
                           effect, rule.complement(), data=data)
        )
    return found


def analyze(config: BatchSizeConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = seeds_of(runs)
    panels, rates = [], []
    for model in MODELS:
        results = one_per([r for r in runs if r["params"]["model"] == model],
                          "norm", "batch_size", "seed")
        series, rows = [], []
        for norm in config.norms(model):
            sizes = [size for size in _sizes(config, norm)
                     if all((norm, size, seed) in results for seed in seeds)]
            if not sizes:
                continue
            curves = [[results[(norm, size, seed)]["test_accuracy"] for size in sizes]
                      for seed in seeds]
            mean, low, high = interval_band(curves)
            series.append(Series(norm, sizes, [100 * v for v in mean], [100 * v for v in low],
                                 [100 * v for v in high], style="o-"))
            cells = {size: percent(value) for size, value in zip(sizes, mean, strict=True)}
            skipped = "= batch" if norm == "ghost" else "not run"
            rows.append([norm, *(cells.get(size, skipped) for size in config.batch_sizes)])
        for run in runs:
            if run["params"]["model"] == model and run["params"]["seed"] == seeds[0]:
                rates.append((model, run["params"]["norm"], run["params"]["learning_rate"]))
        if series:
            panels.append(Panel(f"{model.upper()}: test accuracy vs batch size", "batch size",
                                "test accuracy (%)", series, xscale="log"))
            analysis.tables.append(
                Table(f"{model.upper()}: test accuracy by batch size (mean over seeds)",
                      ["norm", *map(str, config.batch_sizes)], rows)
            )
    analysis.notes.append(
        "Base learning rates tuned at batch "
        f"{config.reference_batch}: "
        + ", ".join(sorted({f"{m}/{n} {r:g}" for m, n, r in rates}))
        + f". Ghost batch norm is not run at batches of {GHOST_BATCH} or fewer, where it is "
        "exactly batch norm (its cells say '= batch'). Cross-iteration batch norm (window "
        f"{CROSS_ITERATION_WINDOW} iterations) is run up to the reference batch only."
    )
    analysis.figures.append(
        Figure(
            "batch-size",
            panels,
            caption=band_caption(
                "Final test accuracy (%) against batch size (log axis) for each norm, MLP left, "
                "CNN right; learning rate scaled linearly with the batch, same number of epochs",
                len(seeds),
            ),
        )
    )
    return analysis


def setup(config: BatchSizeConfig) -> str:
    sizes = ", ".join(map(str, config.batch_sizes))
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} ReLU units, norm "
        f"{' vs '.join(config.mlp_norms)}; beside it a CNN, 1-D convolutions of widths "
        f"{', '.join(map(str, config.widths))}, norm {' vs '.join(config.cnn_norms)}; the norm "
        f"before each activation. Batch sizes {sizes}; {config.epochs} epochs each; SGD "
        f"(momentum {MOMENTUM}) at a base rate x batch / {config.reference_batch}, the base rate "
        f"chosen from {rates} for each model and norm on the validation part at batch "
        f"{config.reference_batch}. Batch renormalization with constant r_max "
        f"{RENORM_LIMITS['r_max']:g} and d_max {RENORM_LIMITS['d_max']:g} (Wu & He's setting); "
        f"ghost batch norm with virtual batches of {GHOST_BATCH}; cross-iteration batch norm "
        f"(Yao et al.) pooling the last {CROSS_ITERATION_WINDOW} iterations' statistics, carried "
        "to the current weights by its first-order correction."
    )


def cost(config: BatchSizeConfig, params: dict) -> float:
    per_step = 3.0 if params["model"] == "cnn" else 1.0
    if params["norm"] in ("batch", "renorm", "ghost"):
        per_step *= 2.0  # batch statistics cost more per step at these sizes
    elif params["norm"] == "cross-iteration":
        per_step *= 2.7  # and the window's Jacobians a third more
    return per_step * config.epochs * 3200 / params["batch_size"]


EXPERIMENT = Experiment(
    name="batch-size",
    claims=("C9", "C15"),
    question="Does BN lose accuracy at small batches where LayerNorm and GroupNorm do not?",
    config_type=BatchSizeConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "On MNIST-1D the networks have room below their ceiling for a loss to show; the MLP is "
        "the primary test because, unlike a CNN, it cannot spread a batch's statistics over "
        "positions in the signal: a batch of 2 gives each unit's mean and variance from two "
        "numbers."
    ),
    published=(
        "Wu & He 2018 (table below, as accuracy): BN's ImageNet top-1 accuracy falls from 76.4% "
        "at 32 images per GPU to 65.3% at 2, while GroupNorm stays near 76%. At 32 images "
        "LayerNorm had 74.7% and InstanceNorm 71.6%; Batch Renorm at 4 images per GPU had "
        "73.7%. Learning rate 0.1 x N / 32."
    ),
    published_tables=(WU_HE,),
    tuning=TUNING,
    cost=cost,
)
