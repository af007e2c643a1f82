"""C6, initialization: how much the final accuracy depends on the scale of the initial weights.

Every weight starts at ``scale`` times the standard scale (He for ReLU), from 0.1x to 10x, with
and without BN. Only the scale changes along the sweep: each network trains at one learning rate,
tuned on the validation part at the standard scale (1x) and then held fixed, so that a scale is
not rescued or ruined by a rate chosen for it. The spread is the best minus the worst final test
accuracy over the scales.
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
from batchnorm.lab.models import init_weights
from batchnorm.lab.stats import accuracy_effect
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Finding, accuracy_rule, judge_accuracy

STANDARD_SCALE = 1.0


@dataclass(frozen=True)
class InitConfig:
    norms: tuple[str, ...] = ("none", "batch")
    scales: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    tuning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    steps: int = 800
    eval_every: int = 200
    batch_size: int = 32
    depth: int = 4
    width: int = 128
    activation: str = "relu"

    @classmethod
    def quick(cls) -> InitConfig:
        return replace(cls(), scales=(0.1, 1.0, 10.0), tuning_rates=(0.03,), steps=150,
                       eval_every=150)


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
    )
    return fitted.record()


TUNING = rate_tuning(
    ("norm",),
    groups=lambda config: [{"norm": norm} for norm in config.norms],
    rates=lambda config: config.tuning_rates,
    score=final_validation_accuracy,
    score_name=f"final validation accuracy at the standard scale ({STANDARD_SCALE:g}x)",
    fixed=lambda config: {"scale": STANDARD_SCALE},
)


def findings(config: InitConfig, runs: list[dict]) -> list[Finding]:
    if not {"none", "batch"} <= set(config.norms) or len(config.scales) < 2:
        return []
    results = one_per(runs, "norm", "scale", "seed")
    seeds = seeds_of(runs)

    def extremes(norm: str, seed: int):
        """The outcomes at this seed's best and worst scale (by test accuracy)."""
        ordered = sorted(config.scales, key=lambda s: results[(norm, s, seed)]["test_accuracy"])
        return (test_outcomes(results[(norm, ordered[-1], seed)]),
                test_outcomes(results[(norm, ordered[0], seed)]))

    none = [extremes("none", seed) for seed in seeds]
    batch = [extremes("batch", seed) for seed in seeds]
    # Spread without BN (best minus worst) minus spread with BN.
    effect = accuracy_effect([
        (+1.0, [best for best, _ in none]),
        (-1.0, [worst for _, worst in none]),
        (-1.0, [best for best, _ in batch]),
        (+1.0, [worst for _, worst in batch]),
    ])
    return [
        judge_accuracy(
            "C6",
            "init",
            "spread of final test accuracy over the initial scales (best minus worst) without "
            "BN minus with BN, in percentage points",
            effect,
            accuracy_rule(test_size(runs), 4),
            data=data_of(runs),
        )
    ]


def analyze(config: InitConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = seeds_of(runs)
    results = one_per(runs, "norm", "scale", "seed")
    series, rows = [], []
    for norm in config.norms:
        if not all((norm, scale, seed) in results for scale in config.scales for seed in seeds):
            continue
        curves = [[results[(norm, scale, seed)]["test_accuracy"] for scale in config.scales]
                  for seed in seeds]
        mean, low, high = interval_band(curves)
        spreads = [100 * (max(curve) - min(curve)) for curve in curves]
        rate = next(run["params"]["learning_rate"] for run in runs
                    if run["params"]["norm"] == norm)
        series.append(Series(f"{norm} (lr {rate:g})", list(config.scales),
                             [100 * v for v in mean], [100 * v for v in low],
                             [100 * v for v in high], style="o-"))
        rows.append([norm, f"{rate:g}", *map(percent, mean),
                     f"{sum(spreads) / len(spreads):.1f} pp"])
    analysis.tables.append(
        Table(
            "Final test accuracy by initial weight scale (mean over seeds)",
            ["norm", "learning rate (tuned at 1x)", *(f"{s:g}x" for s in config.scales),
             "mean spread"],
            rows,
        )
    )
    analysis.figures.append(
        Figure(
            "init",
            [Panel("Final test accuracy vs initial weight scale", "scale (x standard)",
                   "test accuracy (%)", series, xscale="log")],
            caption=band_caption(
                "Final test accuracy (%) against the scale of the initial weights (log axis), "
                "with and without BN, each at one learning rate tuned at the standard scale",
                len(seeds),
            ),
        )
    )
    return analysis


def setup(config: InitConfig) -> str:
    scales = ", ".join(f"{scale:g}x" for scale in config.scales)
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, norm "
        f"{' vs '.join(config.norms)}. All weights start at {scales} the He scale. SGD (momentum "
        f"{MOMENTUM}), batch {config.batch_size}, {config.steps} steps, at one learning rate per "
        f"norm chosen from {rates} on the validation part at the standard scale and held fixed "
        "across the sweep. A run whose loss became non-finite scores 0% (its outputs are not "
        "numbers)."
    )


def cost(config: InitConfig, params: dict) -> float:
    return config.steps * (1.5 if params["norm"] == "batch" else 1.0)


EXPERIMENT = Experiment(
    name="init",
    claims=("C6",),
    question="Does BN make the result depend less on the initial weight scale?",
    config_type=InitConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "On the digits a network reaches its ceiling from most starting scales, which hides a "
        "difference; on MNIST-1D a poor start costs accuracy that shows."
    ),
    published="CLAIMS.md lists no published number for this claim.",
    tuning=TUNING,
    cost=cost,
)
