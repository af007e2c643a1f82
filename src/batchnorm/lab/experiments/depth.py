"""C8, depth: how deep each net can be and still train, plain vs BN vs BN with skips.

The same three nets as the gradients experiment (``deep_models.NETS``) at depths from 2 to 64
hidden layers, each trained for a fixed number of steps at one learning rate per net, tuned on
the validation part at a moderate depth and then held fixed, so that only the depth changes
along the sweep. A net *trains* at a depth when its final validation accuracy is at least
``TRAINS_ABOVE_CHANCE`` above chance. Where a net stops training is read off its curve: between
the last depth of the unbroken run of trained depths from the shallowest and the first depth at
which it fails, interpolated on the log-depth axis, so that it is a continuous number rather than
a grid point that every seed shares.

The seeds say BN lets much deeper networks train. Yang et al. 2019 found fully-connected BN nets
without skips deeper than about 50 layers untrainable; the skips are the contrast.
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
    data_of,
    final_validation_accuracy,
    fit,
    interval_band,
    one_per,
    percent,
    rate_tuning,
    seeds_of,
    test_outcomes,
    test_size,
)
from batchnorm.lab.experiments.deep_models import NET_LABELS, NETS, build_net
from batchnorm.lab.stats import accuracy_effect, largest_binomial_se, ratio_interval
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Finding, Rule, accuracy_rule, judge, judge_accuracy

# A net trains when its final validation accuracy is at least this far above chance.
TRAINS_ABOVE_CHANCE = 0.20
YANG_DEPTH = 50  # Yang et al.: BN nets without skips deeper than about this did not train


@dataclass(frozen=True)
class DepthConfig:
    nets: tuple[str, ...] = tuple(NETS)
    depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    tuning_depth: int = 8
    tuning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    steps: int = 60
    batch_size: int = 128
    width: int = 32

    @classmethod
    def quick(cls) -> DepthConfig:
        return replace(cls(), depths=(2, 8, 32), tuning_rates=(0.1,), steps=30)


def plan(config: DepthConfig, seeds) -> list[dict]:
    return [
        {"net": net, "depth": depth, "seed": seed}
        for seed in seeds
        for net in config.nets
        for depth in config.depths
    ]


def run(config: DepthConfig, params: dict, data, device: str) -> dict:
    fitted = fit(
        lambda: build_net(params["net"], data.input_size, data.classes, params["depth"],
                          config.width),
        data,
        device,
        params["seed"],
        images=False,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=params["learning_rate"],
        eval_every=config.steps,
    )
    return fitted.record(chance=1.0 / data.classes)


TUNING = rate_tuning(
    ("net",),
    groups=lambda config: [{"net": net} for net in config.nets],
    rates=lambda config: config.tuning_rates,
    score=final_validation_accuracy,
    score_name="final validation accuracy at the tuning depth",
    fixed=lambda config: {"depth": config.tuning_depth},
)


# ---- Analysis (pure functions of the saved runs) ---------------------------------------------


def _margin() -> str:
    return f"{100 * TRAINS_ABOVE_CHANCE:g} pp"


def trains_level(result: dict) -> float:
    """The validation accuracy at or above which a run counts as trained."""
    return result["chance"] + TRAINS_ABOVE_CHANCE


def trains(result: dict) -> bool:
    return result["validation_accuracy"][-1] >= trains_level(result)


def stopping_depth(depths, accuracies, level: float) -> tuple[float, str]:
    """(depth, censored): where a net stops training, from its final validation accuracy at each
    depth. Between the last depth of the unbroken run of trained depths (accuracy at least
    ``level``) from the shallowest and the next depth, where the accuracy crosses ``level`` on
    the log-depth axis. ``censored`` is "above" when it trained at every depth (the deepest, a
    lower bound) and "below" when it failed at the shallowest (that depth, an upper bound)."""
    pairs = sorted(zip(depths, accuracies, strict=True))
    if pairs[0][1] < level:
        return float(pairs[0][0]), "below"
    for (depth, accuracy), (deeper, deeper_accuracy) in zip(pairs, pairs[1:], strict=False):
        if deeper_accuracy < level:
            share = (accuracy - level) / (accuracy - deeper_accuracy)
            return math.exp(math.log(depth) + share * math.log(deeper / depth)), ""
    return float(pairs[-1][0]), "above"


def grid_factor(config: DepthConfig) -> float:
    depths = sorted(config.depths)
    return max(deeper / depth for depth, deeper in zip(depths, depths[1:], strict=False))


def stopping_rule(config: DepthConfig) -> Rule:
    factor = grid_factor(config)
    return Rule(
        threshold=round(factor, 2),
        supports="above",
        scale="log",
        unit="x",
        why=(
            f"the depths step by {factor:g}x and the stopping depth between two of them is "
            "placed by the two accuracies around it, so a ratio within one step could come "
            f"from where that line crosses; the threshold is one step ({factor:g}x). The seeds' "
            "spread is inside the interval"
        ),
    )


def stopping_depths(config: DepthConfig, runs: list[dict]) -> dict[tuple[str, int], tuple]:
    """(stopping depth, censored) for each net and seed that ran at every depth."""
    results = one_per(runs, "net", "depth", "seed")
    found = {}
    for net in config.nets:
        for seed in seeds_of(runs):
            if not all((net, depth, seed) in results for depth in config.depths):
                continue
            chosen = [results[(net, depth, seed)] for depth in config.depths]
            found[(net, seed)] = stopping_depth(
                config.depths, [result["validation_accuracy"][-1] for result in chosen],
                trains_level(chosen[0]),
            )
    return found


def findings(config: DepthConfig, runs: list[dict]) -> list[Finding]:
    if not {"plain", "batch"} <= set(config.nets) or len(config.depths) < 2:
        return []
    results = one_per(runs, "net", "depth", "seed")
    seeds = seeds_of(runs)
    shallow, deep = min(config.depths), max(config.depths)
    data = data_of(runs)
    found = []
    stops = stopping_depths(config, runs)
    paired = [seed for seed in seeds if ("plain", seed) in stops and ("batch", seed) in stops]
    if paired:
        found.append(judge(
            "C8", "depth",
            "depth at which the net stops training (validation accuracy "
            f"{_margin()} above chance after {config.steps} steps), with BN divided by "
            "without",
            [stops[("batch", seed)][0] / stops[("plain", seed)][0] for seed in paired],
            stopping_rule(config), data=data, split="validation",
        ))

    def outcomes(net: str, depth: int):
        return [test_outcomes(results[(net, depth, seed)]) for seed in seeds]

    if all((net, depth, seed) in results for net in ("plain", "batch")
           for depth in (shallow, deep) for seed in seeds):
        examples = test_size(runs)
        found.append(judge_accuracy(
            "C8", "depth",
            f"test accuracy at depth {deep}, BN minus plain, in percentage points",
            accuracy_effect([(+1.0, outcomes("batch", deep)), (-1.0, outcomes("plain", deep))]),
            accuracy_rule(examples, 2), data=data,
        ))
        found.append(judge_accuracy(
            "C8", "depth",
            f"BN without skips: test accuracy at depth {deep} minus at depth {shallow}, in "
            "percentage points (supported: no loss beyond the margin; Yang et al. found such "
            f"nets deeper than about {YANG_DEPTH} layers untrainable)",
            accuracy_effect([(+1.0, outcomes("batch", deep)), (-1.0, outcomes("batch", shallow))]),
            accuracy_rule(examples, 2, sign=-1.0), data=data,
        ))
    return found


def analyze(config: DepthConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = seeds_of(runs)
    results = one_per(runs, "net", "depth", "seed")
    stops = stopping_depths(config, runs)
    validation_series, test_series, validation_rows, test_rows, stop_rows = [], [], [], [], []
    level = None
    for net in config.nets:
        if not all((net, depth, seed) in results for depth in config.depths for seed in seeds):
            continue
        label = NET_LABELS.get(net, net)
        chosen = [[results[(net, depth, seed)] for depth in config.depths] for seed in seeds]
        level = trains_level(chosen[0][0])
        for key, series, rows in (("validation", validation_series, validation_rows),
                                  ("test", test_series, test_rows)):
            curves = [[result["validation_accuracy"][-1] if key == "validation"
                       else result["test_accuracy"] for result in curve] for curve in chosen]
            mean, low, high = interval_band(curves)
            # An accuracy lies in [0, 1]: so does the band drawn for it.
            low, high = [max(0.0, v) for v in low], [min(1.0, v) for v in high]
            series.append(Series(label, list(config.depths), [100 * v for v in mean],
                                 [100 * v for v in low], [100 * v for v in high], style="o-"))
            if key == "validation":
                counts = [sum(trains(curve[index]) for curve in chosen)
                          for index in range(len(config.depths))]
                rows.append([label, *(f"{percent(value)} ({count}/{len(seeds)})"
                                      for value, count in zip(mean, counts, strict=True))])
            else:
                rows.append([label, *(f"{percent(value)} [{percent(lo)}, {percent(hi)}]"
                                      for value, lo, hi in zip(mean, low, high, strict=True))])
        per_seed = [stops[(net, seed)] for seed in seeds if (net, seed) in stops]
        stop_rows.append(_stop_row(label, per_seed, _rate_of(runs, net)))
    depth_headers = [str(depth) for depth in config.depths]
    analysis.tables.extend([
        Table(f"Final validation accuracy by depth after {config.steps} steps (mean over seeds) "
              f"and how many seeds trained (validation accuracy {_margin()} above chance)",
              ["net", *depth_headers], validation_rows),
        Table("Test accuracy by depth (mean over seeds, 95% CI across seeds, clipped to "
              "0-100%)",
              ["net", *depth_headers], test_rows),
        Table("Where each net stops training (interpolated on the log-depth axis; geometric "
              "mean over seeds, 95% CI)",
              ["net", "learning rate", "stopping depth", "per seed"], stop_rows),
    ])
    panels = []
    if level is not None:
        line = Series(f"trains above {percent(level)}", [min(config.depths), max(config.depths)],
                      [100 * level, 100 * level], style="--")
        panels.append(Panel("Final validation accuracy vs depth", "hidden layers",
                            "validation accuracy (%)", [*validation_series, line],
                            xscale="log"))
        panels.append(Panel("Test accuracy vs depth", "hidden layers", "test accuracy (%)",
                            test_series, xscale="log"))
    analysis.figures.append(Figure(
        "depth",
        panels,
        caption=band_caption(
            f"Final validation (left) and test (right) accuracy (%) after {config.steps} SGD "
            "steps against the number of hidden layers (log axis), plain MLP, with BN, and "
            "with BN and skips, each at one learning rate tuned at depth "
            f"{config.tuning_depth}; the dashed line is the level at which a net counts as "
            "trained",
            len(seeds),
            "Bands are clipped to 0-100%.",
        ),
    ))
    analysis.notes.extend(_notes(config, runs, stops, seeds))
    return analysis


def _rate_of(runs: list[dict], net: str) -> float | None:
    return next((run["params"].get("learning_rate") for run in runs
                 if run["params"]["net"] == net), None)


def _stop_row(label: str, per_seed: list[tuple[float, str]], rate: float | None) -> list[str]:
    marks = {"above": ">=", "below": "<=", "": ""}
    seeds_text = ", ".join(f"{marks[censored]}{depth:.3g}" for depth, censored in per_seed)
    if not per_seed:
        summary = "n/a"
    elif len(per_seed) < 2:
        summary = f"{per_seed[0][0]:.3g}"
    else:
        interval = ratio_interval([depth for depth, _ in per_seed])
        summary = f"{interval.mean:.3g} [{interval.low:.3g}, {interval.high:.3g}]"
    if any(censored == "above" for _, censored in per_seed):
        summary += " (a lower bound: trained at every depth)"
    return [label, "n/a" if rate is None else f"{rate:g}", summary, seeds_text]


def _notes(config: DepthConfig, runs: list[dict], stops: dict, seeds: list[int]) -> list[str]:
    notes = []
    if runs:
        validation = runs[0]["result"].get("validation_size")
        chance = runs[0]["result"]["chance"]
        if validation:
            error = largest_binomial_se(validation) * math.sqrt(chance * (1 - chance)) / 0.5
            notes.append(
                f"'Trains' means a final validation accuracy of at least "
                f"{percent(chance + TRAINS_ABOVE_CHANCE)}: chance is {percent(chance)}, and a net "
                f"that learned nothing scores it give or take {error:.1f} pp (one binomial "
                f"standard error on {validation} validation examples), so the level is "
                f"{100 * TRAINS_ABOVE_CHANCE / error:.0f} such errors above chance."
            )
    deep = max(config.depths)
    for net, words in (("batch", "BN without skips"), ("batch-residual", "BN with skips")):
        per_seed = [stops[(net, seed)] for seed in seeds if (net, seed) in stops]
        if not per_seed:
            continue
        every = all(censored == "above" for _, censored in per_seed)
        if every:
            notes.append(f"{words} trained at every depth up to {deep} in every seed.")
            continue
        interval = ratio_interval([depth for depth, _ in per_seed])
        spread = ("" if math.isnan(interval.low)
                  else f" (95% CI {interval.low:.3g} to {interval.high:.3g})")
        notes.append(
            f"{words} stopped training at about {interval.mean:.3g} layers{spread} after "
            f"{config.steps} steps. Yang et al. found BN nets without skips deeper than about "
            f"{YANG_DEPTH} layers untrainable on MNIST (with full-length SGD training, not "
            f"{config.steps} steps): ours stopped "
            + ("earlier" if interval.high < YANG_DEPTH
               else "later" if interval.low > YANG_DEPTH else "near that depth")
            + "."
        )
    return notes


def setup(config: DepthConfig) -> str:
    depths = ", ".join(map(str, config.depths))
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    nets = ", ".join(NET_LABELS.get(net, net) for net in config.nets)
    return (
        f"Nets of {depths} hidden layers of {config.width} ReLU units: {nets}. BN sits between "
        "each linear layer and its activation; the skips are pre-activation residual blocks "
        "(h + Linear(ReLU(BN(h)))) around every layer but the first. He initialization. SGD "
        f"(momentum {MOMENTUM}), batch {config.batch_size}, {config.steps} steps at every depth, "
        f"at one learning rate per net chosen from {rates} on the validation part at depth "
        f"{config.tuning_depth} and held fixed across depths. A net trains at a depth when its "
        f"final validation accuracy is at least {_margin()} above chance. "
        "MLPs only: a CNN of these depths with our BN costs several times the MLP's time per "
        "step and does not fit the time budget beside it."
    )


def cost(config: DepthConfig, params: dict) -> float:
    return config.steps * params["depth"] * (1.0 if params["net"] == "plain" else 3.0)


EXPERIMENT = Experiment(
    name="depth",
    claims=("C8",),
    question="Does BN let deeper networks train, and how deep without skip connections?",
    config_type=DepthConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="digits",
    data_reason=(
        "A shallow net learns the digits in a few tens of steps (about 95% validation accuracy "
        "after 60 steps at depth 2 in our pilots), so a net that fails within the same steps at "
        "a greater depth fails because of the depth, not the budget; on MNIST-1D even shallow "
        "nets need hundreds of steps, which the deep nets cannot afford here."
    ),
    published=(
        "Yang et al. 2019: on MNIST, fully-connected BN networks without skip connections deeper "
        "than about 50 layers could not be trained with SGD, whatever the batch size. The seeds "
        "give no number for their claim."
    ),
    tuning=TUNING,
    cost=cost,
)
