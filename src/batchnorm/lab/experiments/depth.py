"""C8, depth: how deep each net can be and still train, plain vs BN vs BN with skips, as MLPs and
as convolutional nets.

The same three nets as the gradients experiment (``deep_models.NETS``) in two families: MLPs at
depths from 2 to 64 hidden layers, and convolutional nets (``deep_models.DeepCNN``: 3x3
convolutions of a few channels, the same three forms) at depths from 2 to 64 convolutions. Each
net of each family is trained for a fixed number of steps at one learning rate of its own, tuned
on the validation part at a moderate depth and then held fixed, so that only the depth changes
along the sweep. A net *trains* at a depth when its final validation accuracy is at least
``TRAINS_ABOVE_CHANCE`` above chance. Where a net stops training is read off its curve: between
the last depth of the unbroken run of trained depths from the shallowest and the first depth at
which it fails, interpolated on the log-depth axis, so that it is a continuous number rather than
a grid point that every seed shares.

The seeds say BN lets much deeper networks train. Yang et al. 2019 found fully-connected BN nets
without skips deeper than about 50 layers untrainable; the skips are the contrast.

How the two families enter C8 (fixed before the convolutional nets were run): each family gives
the same three findings under the same rules (where BN stops training against the plain net,
BN against plain at the family's deepest depth, and BN's loss from its shallowest to its deepest
depth), each its own row. The claim speaks of networks in general, so the experiment's reading of
each measure across the families is their conjunction (:func:`both_families`): supported when
every family supports it, not supported when any family contradicts it, inconclusive otherwise.
That reading is a table of the report, not a further finding: it has no interval of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
from batchnorm.lab.experiments.deep_models import NET_LABELS, NETS, build_cnn, build_net
from batchnorm.lab.stats import accuracy_effect, largest_binomial_se, ratio_interval
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    Finding,
    Rule,
    accuracy_rule,
    judge,
    judge_accuracy,
)

# A net trains when its final validation accuracy is at least this far above chance.
TRAINS_ABOVE_CHANCE = 0.20
YANG_DEPTH = 50  # Yang et al.: BN nets without skips deeper than about this did not train
MODELS = ("mlp", "cnn")
MODEL_LABELS = {"mlp": "MLP", "cnn": "CNN"}
LAYER_NAMES = {"mlp": "hidden layers", "cnn": "convolutions"}
# The three findings each family gives, in order (the rows of the across-families table).
MEASURES = ("stops", "deepest", "keeps")
MEASURE_NAMES = {
    "stops": "where BN stops training / where the plain net does",
    "deepest": "BN minus plain, test accuracy at the deepest depth",
    "keeps": "BN without skips, deepest minus shallowest test accuracy",
}


@dataclass(frozen=True)
class DepthConfig:
    nets: tuple[str, ...] = tuple(NETS)
    models: tuple[str, ...] = MODELS
    depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)  # the MLPs' hidden layers
    # The convolutional nets' depths (convolutions): the MLPs' grid, past Yang et al.'s 50. A
    # convolution of 8 channels on 4x4 maps costs 3 to 7 times an MLP layer per step, which puts
    # the CNN sweep at about 105-115 CPU-seconds of the default suite (measured on a busy 2-core
    # machine); a longer grid or wider convolutions would not fit its time budget.
    cnn_depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    tuning_depth: int = 8
    tuning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    steps: int = 60
    batch_size: int = 128
    width: int = 32  # the MLPs' units per hidden layer
    channels: int = 8  # the convolutional nets' channels per convolution

    @classmethod
    def quick(cls) -> DepthConfig:
        # The CNNs only at the two shallowest depths, tuned at the deeper one: enough to run
        # every stage of the family in a few seconds.
        return replace(cls(), depths=(2, 8, 32), cnn_depths=(2, 4), tuning_depth=4,
                       tuning_rates=(0.1,), steps=30)

    def depths_of(self, model: str) -> tuple[int, ...]:
        return self.depths if model == "mlp" else self.cnn_depths


def plan(config: DepthConfig, seeds) -> list[dict]:
    return [
        {"model": model, "net": net, "depth": depth, "seed": seed}
        for seed in seeds
        for model in config.models
        for net in config.nets
        for depth in config.depths_of(model)
    ]


def run(config: DepthConfig, params: dict, data, device: str) -> dict:
    net, depth = params["net"], params["depth"]
    convolutional = params["model"] == "cnn"
    if convolutional:
        def builder():
            return build_cnn(net, data.image_shape, data.classes, depth, config.channels)
    else:
        def builder():
            return build_net(net, data.input_size, data.classes, depth, config.width)
    fitted = fit(
        builder,
        data,
        device,
        params["seed"],
        images=convolutional,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=params["learning_rate"],
        eval_every=config.steps,
    )
    return fitted.record(chance=1.0 / data.classes)


TUNING = rate_tuning(
    ("model", "net"),
    groups=lambda config: [{"model": model, "net": net}
                           for model in config.models for net in config.nets],
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


def grid_factor(depths: Sequence[int]) -> float:
    """The largest step of a depth grid, as a factor."""
    ordered = sorted(depths)
    return max(deeper / depth for depth, deeper in zip(ordered, ordered[1:], strict=False))


def stopping_rule(depths: Sequence[int]) -> Rule:
    factor = grid_factor(depths)
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


def _of_model(runs: list[dict], model: str) -> list[dict]:
    return [run for run in runs if run["params"]["model"] == model]


def stopping_depths(config: DepthConfig, runs: list[dict]) -> dict[tuple[str, str, int], tuple]:
    """(stopping depth, censored) for each family, net and seed that ran at every depth of its
    family, keyed (model, net, seed)."""
    results = one_per(runs, "model", "net", "depth", "seed")
    found = {}
    for model in config.models:
        depths = config.depths_of(model)
        for net in config.nets:
            for seed in seeds_of(_of_model(runs, model)):
                if not all((model, net, depth, seed) in results for depth in depths):
                    continue
                chosen = [results[(model, net, depth, seed)] for depth in depths]
                found[(model, net, seed)] = stopping_depth(
                    depths, [result["validation_accuracy"][-1] for result in chosen],
                    trains_level(chosen[0]),
                )
    return found


def model_findings(config: DepthConfig, runs: list[dict], model: str) -> dict[str, Finding]:
    """The findings of one family (runs of other families are ignored), keyed by ``MEASURES``;
    a measure whose runs are missing is left out."""
    depths = config.depths_of(model)
    runs = _of_model(runs, model)
    if not runs or not {"plain", "batch"} <= set(config.nets) or len(depths) < 2:
        return {}
    results = one_per(runs, "net", "depth", "seed")
    seeds = seeds_of(runs)
    shallow, deep = min(depths), max(depths)
    label = MODEL_LABELS.get(model, model)
    data = data_of(runs)
    found = {}
    stops = stopping_depths(config, runs)
    paired = [seed for seed in seeds
              if (model, "plain", seed) in stops and (model, "batch", seed) in stops]
    if paired:
        found["stops"] = judge(
            "C8", "depth",
            f"{label}: depth at which the net stops training (validation accuracy "
            f"{_margin()} above chance after {config.steps} steps), with BN divided by "
            "without",
            [stops[(model, "batch", seed)][0] / stops[(model, "plain", seed)][0]
             for seed in paired],
            stopping_rule(depths), data=data, split="validation",
        )

    def outcomes(net: str, depth: int):
        return [test_outcomes(results[(net, depth, seed)]) for seed in seeds]

    if all((net, depth, seed) in results for net in ("plain", "batch")
           for depth in (shallow, deep) for seed in seeds):
        examples = test_size(runs)
        found["deepest"] = judge_accuracy(
            "C8", "depth",
            f"{label}: test accuracy at depth {deep}, BN minus plain, in percentage points",
            accuracy_effect([(+1.0, outcomes("batch", deep)), (-1.0, outcomes("plain", deep))]),
            accuracy_rule(examples, 2), data=data,
        )
        found["keeps"] = judge_accuracy(
            "C8", "depth",
            f"{label}, BN without skips: test accuracy at depth {deep} minus at depth "
            f"{shallow}, in percentage points (supported: no loss beyond the margin; Yang et "
            f"al. found fully-connected BN nets without skips deeper than about {YANG_DEPTH} "
            "layers untrainable)",
            accuracy_effect([(+1.0, outcomes("batch", deep)), (-1.0, outcomes("batch", shallow))]),
            accuracy_rule(examples, 2, sign=-1.0), data=data,
        )
    return found


def findings(config: DepthConfig, runs: list[dict]) -> list[Finding]:
    """Each family's findings in turn, MLP first."""
    return [finding for model in config.models
            for finding in model_findings(config, runs, model).values()]


def both_families(verdicts: Sequence[str]) -> str:
    """The reading of one measure across the families (the rule in the module docstring):
    supported when every family supports it, not supported when any contradicts it, else
    inconclusive."""
    if any(verdict == NOT_SUPPORTED for verdict in verdicts):
        return NOT_SUPPORTED
    if verdicts and all(verdict == SUPPORTED for verdict in verdicts):
        return SUPPORTED
    return INCONCLUSIVE


def across_families(config: DepthConfig, runs: list[dict]) -> dict[str, dict[str, str]]:
    """For each measure that every family of the config gives: each family's verdict and, under
    "both", their conjunction."""
    return _reading({model: model_findings(config, runs, model) for model in config.models})


def _reading(by_model: dict[str, dict[str, Finding]]) -> dict[str, dict[str, str]]:
    """:func:`across_families` from each family's findings."""
    reading = {}
    for measure in MEASURES:
        if not all(measure in found for found in by_model.values()):
            continue
        verdicts = {model: found[measure].verdict for model, found in by_model.items()}
        reading[measure] = {**verdicts, "both": both_families(list(verdicts.values()))}
    return reading


def analyze(config: DepthConfig, runs: list[dict]) -> Analysis:
    # each family's findings once: the findings and the across-families table both read them
    by_model = {model: model_findings(config, runs, model) for model in config.models}
    analysis = Analysis(findings=[finding for found in by_model.values()
                                  for finding in found.values()])
    stops = stopping_depths(config, runs)
    stop_rows = []
    for model in config.models:
        model_runs = _of_model(runs, model)
        if not model_runs:
            continue
        tables, figure, rows = _model_curves(config, model_runs, model, stops)
        analysis.tables.extend(tables)
        if figure is not None:
            analysis.figures.append(figure)
        stop_rows.extend(rows)
    analysis.tables.append(Table(
        "Where each net stops training (interpolated on the log-depth axis; geometric mean "
        "over seeds, 95% CI)",
        ["family", "net", "learning rate", "stopping depth", "per seed"], stop_rows,
    ))
    reading = _reading(by_model)
    if len(config.models) > 1 and reading:
        labels = [MODEL_LABELS.get(model, model) for model in config.models]
        analysis.tables.append(Table(
            "C8 across the families: each family's verdict and their conjunction (supported "
            "only when every family supports the claim, not supported when any contradicts it)",
            ["measure", *labels, "both families"],
            [[MEASURE_NAMES[measure], *(verdicts[model] for model in config.models),
              verdicts["both"]] for measure, verdicts in reading.items()],
        ))
    analysis.notes.extend(_notes(config, runs, stops))
    return analysis


def _model_curves(config: DepthConfig, runs: list[dict], model: str,
                  stops: dict) -> tuple[list[Table], Figure | None, list[list[str]]]:
    """One family's accuracy tables, figure and rows of the stopping-depth table."""
    depths = config.depths_of(model)
    seeds = seeds_of(runs)
    results = one_per(runs, "net", "depth", "seed")
    label, layers = MODEL_LABELS.get(model, model), LAYER_NAMES.get(model, "layers")
    validation_series, test_series, validation_rows, test_rows, stop_rows = [], [], [], [], []
    level = None
    for net in config.nets:
        if not all((net, depth, seed) in results for depth in depths for seed in seeds):
            continue
        name = NET_LABELS.get(net, net)
        chosen = [[results[(net, depth, seed)] for depth in depths] for seed in seeds]
        level = trains_level(chosen[0][0])
        for key, series, rows in (("validation", validation_series, validation_rows),
                                  ("test", test_series, test_rows)):
            curves = [[result["validation_accuracy"][-1] if key == "validation"
                       else result["test_accuracy"] for result in curve] for curve in chosen]
            mean, low, high = interval_band(curves)
            # An accuracy lies in [0, 1]: so does the band drawn for it.
            low, high = [max(0.0, v) for v in low], [min(1.0, v) for v in high]
            series.append(Series(name, list(depths), [100 * v for v in mean],
                                 [100 * v for v in low], [100 * v for v in high], style="o-"))
            if key == "validation":
                counts = [sum(trains(curve[index]) for curve in chosen)
                          for index in range(len(depths))]
                rows.append([name, *(f"{percent(value)} ({count}/{len(seeds)})"
                                     for value, count in zip(mean, counts, strict=True))])
            else:
                rows.append([name, *(f"{percent(value)} [{percent(lo)}, {percent(hi)}]"
                                     for value, lo, hi in zip(mean, low, high, strict=True))])
        per_seed = [stops[(model, net, seed)] for seed in seeds if (model, net, seed) in stops]
        stop_rows.append([label, *_stop_row(name, per_seed, _rate_of(runs, net))])
    depth_headers = [str(depth) for depth in depths]
    tables = [
        Table(f"{label}: final validation accuracy by depth ({layers}) after {config.steps} "
              f"steps (mean over seeds) and how many seeds trained (validation accuracy "
              f"{_margin()} above chance)",
              ["net", *depth_headers], validation_rows),
        Table(f"{label}: test accuracy by depth ({layers}; mean over seeds, 95% CI across "
              "seeds, clipped to 0-100%)",
              ["net", *depth_headers], test_rows),
    ]
    if level is None:
        return tables, None, stop_rows
    line = Series(f"trains above {percent(level)}", [min(depths), max(depths)],
                  [100 * level, 100 * level], style="--")
    panels = [
        Panel(f"{label}: final validation accuracy vs depth", layers, "validation accuracy (%)",
              [*validation_series, line], xscale="log"),
        Panel(f"{label}: test accuracy vs depth", layers, "test accuracy (%)", test_series,
              xscale="log"),
    ]
    what = (f"plain MLP, with BN, and with BN and skips, {config.width} units a layer"
            if model == "mlp" else
            f"plain CNN, with BN, and with BN and skips, {config.channels} channels a "
            "convolution")
    figure = Figure(
        "depth" if model == "mlp" else f"depth-{model}",
        panels,
        caption=band_caption(
            f"{label}s: final validation (left) and test (right) accuracy (%) after "
            f"{config.steps} SGD steps against the number of {layers} (log axis), {what}, each "
            f"at one learning rate tuned at depth {config.tuning_depth}; the dashed line is the "
            "level at which a net counts as trained",
            len(seeds),
            "Bands are clipped to 0-100%.",
        ),
    )
    return tables, figure, stop_rows


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


def _notes(config: DepthConfig, runs: list[dict], stops: dict) -> list[str]:
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
    for model in config.models:
        seeds = seeds_of(_of_model(runs, model))
        notes.extend(_stopping_notes(config, model, stops, seeds))
    return notes


def _stopping_notes(config: DepthConfig, model: str, stops: dict, seeds: list[int]) -> list[str]:
    notes = []
    label, layers = MODEL_LABELS.get(model, model), LAYER_NAMES.get(model, "layers")
    deep = max(config.depths_of(model))
    for net, words in (("batch", "BN without skips"), ("batch-residual", "BN with skips")):
        per_seed = [stops[(model, net, seed)] for seed in seeds if (model, net, seed) in stops]
        if not per_seed:
            continue
        if all(censored == "above" for _, censored in per_seed):
            notes.append(f"{label}, {words}: trained at every depth up to {deep} {layers} in "
                         "every seed.")
            continue
        interval = ratio_interval([depth for depth, _ in per_seed])
        spread = ("" if math.isnan(interval.low)
                  else f" (95% CI {interval.low:.3g} to {interval.high:.3g})")
        side = ("earlier" if interval.high < YANG_DEPTH
                else "later" if interval.low > YANG_DEPTH else "near that depth")
        if model == "mlp":
            comparison = (f"Yang et al. found BN nets without skips deeper than about "
                          f"{YANG_DEPTH} layers untrainable on MNIST (with full-length SGD "
                          f"training, not {config.steps} steps): ours stopped {side}.")
        else:
            comparison = (f"Yang et al.'s limit of about {YANG_DEPTH} layers is for "
                          f"fully-connected nets; this convolutional net stopped {side}.")
        notes.append(f"{label}, {words}: stopped training at about {interval.mean:.3g} "
                     f"{layers}{spread} after {config.steps} steps. {comparison}")
    return notes


def setup(config: DepthConfig) -> str:
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    nets = ", ".join(NET_LABELS.get(net, net) for net in config.nets)
    families = []
    if "mlp" in config.models:
        families.append(
            f"MLPs of {', '.join(map(str, config.depths))} hidden layers of {config.width} ReLU "
            "units; BN sits between each linear layer and its activation; the skips are "
            "pre-activation residual blocks (h + Linear(ReLU(BN(h)))) around every layer but "
            "the first."
        )
    if "cnn" in config.models:
        families.append(
            f"CNNs of {', '.join(map(str, config.cnn_depths))} 3x3 convolutions of "
            f"{config.channels} channels: the first of stride 2 (halving each side of the image: "
            "4x4 maps for the 8x8 digits), the rest at that resolution, then a linear "
            "classifier on the flattened "
            "maps (a global average over so few channels learns too slowly for this step "
            "budget); BN, the activations and the skips sit as in the MLPs (h + "
            "Conv(ReLU(BN(h))))." + _cnn_grid_reason(config)
        )
    return (
        f"Three nets in each family: {nets}. " + " ".join(families) + " He initialization. "
        f"SGD (momentum {MOMENTUM}), batch {config.batch_size}, {config.steps} steps at every "
        f"depth, at one learning rate per net and family chosen from {rates} on the validation "
        f"part at depth {config.tuning_depth} and held fixed across depths. A net trains at a "
        f"depth when its final validation accuracy is at least {_margin()} above chance."
    )


def _cnn_grid_reason(config: DepthConfig) -> str:
    if max(config.cnn_depths) >= max(config.depths):
        return (
            f" Their depths go as deep as the MLPs' ({max(config.cnn_depths)}, past Yang et "
            f"al.'s {YANG_DEPTH} layers): with {config.channels} channels on maps of a quarter "
            "of the image a convolution costs only 3 to 7 times an MLP layer per step, so the "
            "sweep fits the suite's time budget; more channels or a deeper grid would not."
        )
    return (
        f" Their depths stop at {max(config.cnn_depths)}, short of the MLPs' "
        f"{max(config.depths)}, to keep this run's time down: a convolution costs several "
        "times an MLP layer per step."
    )


def cost(config: DepthConfig, params: dict) -> float:
    # Relative time per layer and step, from timings on one core: a BN layer about three times a
    # plain one; a convolution about five (plain) to seven (BN) times an MLP's plain layer.
    plain = params["net"] == "plain"
    per_layer = (5.0 if plain else 7.0) if params["model"] == "cnn" else (1.0 if plain else 3.0)
    return config.steps * params["depth"] * per_layer


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
        "after 60 steps at depth 2 in our pilots, MLP or CNN), so a net that fails within the "
        "same steps at a greater depth fails because of the depth, not the budget; on MNIST-1D "
        "even shallow nets need hundreds of steps, which the deep nets cannot afford here."
    ),
    published=(
        "Yang et al. 2019: on MNIST, fully-connected BN networks without skip connections deeper "
        "than about 50 layers could not be trained with SGD, whatever the batch size. The seeds "
        "give no number for their claim."
    ),
    tuning=TUNING,
    cost=cost,
)
