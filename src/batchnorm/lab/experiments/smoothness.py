"""C4, smoothness: how sharply the loss and its gradient change along the gradient direction.

At checkpoints during training, a probe takes the gradient ``g`` of the loss at the current
weights ``w`` on a batch of training examples and steps along it: ``w - eta g`` for several
``eta`` from 1/2 to 4 times the learning rate, on the same batch (Santurkar et al. 2018). It
records the loss range (largest minus smallest loss over the steps), the gradient predictiveness
(the largest change of the gradient, ``||grad L(w) - grad L(w - eta g)||``) and the effective
beta-smoothness (the largest such change per unit of distance moved, divided by ``||eta g||``).
A smoother landscape gives smaller numbers. The loss range and the beta-smoothness carry the
verdicts: the ratio without BN over with BN, per seed the median over checkpoints.

The loss range also grows with how far the loss falls along a well-behaved slope, which is not
roughness; so the probe records a fourth number beside it (shown, not judged): the departure of
the loss from the slope's first-order prediction, ``max |L(w - eta g) - (L(w) - eta ||g||^2)|``.

Two networks, each with and without BN: the lab's small CNN (1-D convolutions on MNIST-1D) and a
25-layer deep linear network (linear layers with no activation). Both norms of a network train
at ONE learning rate, the one on the grid with the lowest validation loss for the network
without BN: the probe's steps are multiples of the learning rate, so a larger rate for one
network would make its steps longer (and its loss range larger), and the sharpness a trajectory
settles in falls as its learning rate rises; either way a rate chosen for each network on its
own would decide the comparison before the landscape did. If the common rate is not BN's best,
it is BN that is handicapped, which leans against the claim rather than for it.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from batchnorm.lab.experiments.base import (
    QUICK_TUNING_SEEDS,
    TUNING_SEEDS,
    Analysis,
    Experiment,
    Figure,
    Panel,
    Series,
    Table,
    Tuning,
    cnn_builder,
    data_of,
    fit,
    one_per,
    percent,
    seeds_of,
)
from batchnorm.lab.models import make_norm
from batchnorm.lab.stats import ratio_interval
from batchnorm.lab.training import MOMENTUM
from batchnorm.lab.verdict import Finding, Rule, judge

NETS = ("cnn", "linear")
NET_NAMES = {"cnn": "CNN", "linear": "deep linear net"}
MEASURES = ("loss_range", "predictiveness", "beta", "departure")
MEASURE_NAMES = {
    "loss_range": "loss range",
    "predictiveness": "gradient predictiveness",
    "beta": "effective beta-smoothness",
    "departure": "departure from the slope's prediction",
}
# The measures a verdict rests on (the claim's two faces: the loss, and its gradient per unit
# of distance); the gradient predictiveness and the departure are shown beside them.
JUDGED = ("loss_range", "beta")
PROBED = ("loss", "gradient_norm", "loss_low", "loss_high", *MEASURES)
MINIMUM_RATIO = 1.25  # the smallest smoothing worth the name


@dataclass(frozen=True)
class SmoothnessConfig:
    nets: tuple[str, ...] = NETS
    cnn_rates: tuple[float, ...] = (0.03, 0.1, 0.3)
    # Without BN the deep linear network diverged on some seeds at 0.03 (seen while the
    # experiment was built), and a diverged run has no landscape to compare: the grid stops below.
    linear_rates: tuple[float, ...] = (0.001, 0.003, 0.01)
    # The probe's steps, as multiples of the learning rate (Santurkar et al.: 1/2 to 4).
    multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0)
    steps: int = 200
    probe_every: int = 10
    batch_size: int = 32
    probe_batch: int = 64
    widths: tuple[int, ...] = (16, 32, 32)
    linear_depth: int = 25  # weight layers, the classifier included
    linear_width: int = 16

    @classmethod
    def quick(cls) -> SmoothnessConfig:
        return replace(cls(), cnn_rates=(0.1,), linear_rates=(0.01,), steps=30,
                       probe_every=10, probe_batch=32, multipliers=(0.5, 2.0, 4.0))

    def rates(self, net: str) -> tuple[float, ...]:
        return self.cnn_rates if net == "cnn" else self.linear_rates


class DeepLinear(nn.Module):
    """``depth - 1`` hidden linear layers of ``width`` units, each followed by a norm (or none)
    and no activation, then a linear classifier: the network computes a linear map of its input
    (in evaluation mode), yet its loss is not convex in the weights."""

    def __init__(self, input_size: int, classes: int, depth: int, width: int, norm: str):
        super().__init__()
        layers: list[nn.Module] = []
        size = input_size
        for _ in range(depth - 1):
            layers += [nn.Linear(size, width), make_norm(norm, width, "vector")]
            size = width
        layers.append(nn.Linear(size, classes))
        self.layers = nn.Sequential(*layers)
        for module in self.layers:
            if isinstance(module, nn.Linear):
                # Variance-preserving for a linear map (gain 1): the signal keeps its scale.
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


def plan(config: SmoothnessConfig, seeds) -> list[dict]:
    return [
        {"net": net, "norm": norm, "seed": seed}
        for seed in seeds
        for net in config.nets
        for norm in ("none", "batch")
    ]


LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _loss_and_gradient(
    model: nn.Module, inputs, labels, loss_function: LossFunction
) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_function(model(inputs), labels)
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in model.parameters()]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def probe(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    learning_rate: float,
    multipliers: Sequence[float],
    loss_function: LossFunction = nn.functional.cross_entropy,
) -> dict[str, float]:
    """The landscape along the gradient at the model's weights, on one batch: loss range, gradient
    predictiveness and effective beta-smoothness over steps ``eta = m * learning_rate``. The model
    itself is left as it was (a copy is probed, so BN's running statistics do not move); the loss
    is the training loss (cross-entropy unless ``loss_function`` says otherwise), in training
    mode. A step whose loss or gradient is not finite makes every measure infinite."""
    work = copy.deepcopy(model)
    work.train()
    parameters = list(work.parameters())
    start = [p.detach().clone() for p in parameters]
    loss, gradient = _loss_and_gradient(work, inputs, labels, loss_function)
    gradient_norm = _norm(gradient)
    losses, changes, betas, departures = [], [], [], []
    for multiplier in multipliers:
        eta = multiplier * learning_rate
        with torch.no_grad():
            for parameter, weight, slope in zip(parameters, start, gradient, strict=True):
                parameter.copy_(weight - eta * slope)
        moved_loss, moved_gradient = _loss_and_gradient(work, inputs, labels, loss_function)
        change = _norm([a - b for a, b in zip(gradient, moved_gradient, strict=True)])
        losses.append(moved_loss)
        # How far the loss strays from what the slope at w predicts for this step (first order).
        departures.append(abs(moved_loss - (loss - eta * gradient_norm**2)))
        changes.append(change)
        betas.append(change / (eta * gradient_norm) if gradient_norm > 0 else math.nan)
    finite = all(math.isfinite(value) for value in losses + changes)
    return {
        "loss": loss,
        "gradient_norm": gradient_norm,
        "loss_low": min(losses) if finite else math.inf,
        "loss_high": max(losses) if finite else math.inf,
        "loss_range": max(losses) - min(losses) if finite else math.inf,
        "predictiveness": max(changes) if finite else math.inf,
        "departure": max(departures) if finite else math.inf,
        "beta": max(betas) if finite else math.inf,
    }


def build(config: SmoothnessConfig, data, net: str, norm: str):
    if net == "cnn":
        return cnn_builder(data, config.widths, norm)
    return lambda: DeepLinear(data.input_size, data.classes, config.linear_depth,
                              config.linear_width, norm)


def validation_loss(model: nn.Module, data, images: bool, device: str) -> float:
    """Mean cross-entropy on the validation part, in evaluation mode (inf when not finite)."""
    model.eval()
    with torch.no_grad():
        logits = model(data.validation.inputs(images).to(device))
        loss = float(nn.functional.cross_entropy(logits, data.validation.labels.to(device)))
    model.train()
    return loss if math.isfinite(loss) else math.inf


def run(config: SmoothnessConfig, params: dict, data, device: str) -> dict:
    """One training run, probed at every checkpoint (a tuning run, ``probe`` False, is not:
    the probe does not change the trajectory, and the choice reads only the validation loss)."""
    net, rate = params["net"], params["learning_rate"]
    probing = params.get("probe", True)
    images = net == "cnn"
    train_inputs = data.train.inputs(images).to(device)
    train_labels = data.train.labels.to(device)
    # The probe's batches come from a generator of their own: probing leaves the training run's
    # batch order, and so its trajectory, exactly as it would be without the probe.
    generator = torch.Generator().manual_seed(params["seed"] + 7_000_003)
    probes: dict[str, list[float]] = {key: [] for key in PROBED}

    def record(step: int, model: nn.Module) -> None:
        index = torch.randperm(len(train_labels), generator=generator)[: config.probe_batch]
        measured = probe(model, train_inputs[index], train_labels[index], rate,
                         config.multipliers)
        for key, value in measured.items():
            probes[key].append(value)

    fitted = fit(
        build(config, data, net, params["norm"]),
        data,
        device,
        params["seed"],
        images=images,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=rate,
        eval_every=config.probe_every,
        on_checkpoint=record if probing else None,
    )
    steps = list(range(0, config.steps + 1, config.probe_every))
    if probing:
        # A run that diverged has no landscape to probe after it did: its remaining checkpoints
        # count as infinitely rough (the loss along the gradient is not finite there).
        for values in probes.values():
            values.extend([math.inf] * (len(steps) - len(values)))
    return fitted.record(
        **({"steps": steps, **probes} if probing else {}),
        validation_loss=validation_loss(fitted.model, data, images, device),
    )


# ---- Choosing the common learning rate on the validation part ----------------------------------


def _tuning_plan(config: SmoothnessConfig, quick: bool) -> list[dict]:
    seeds = QUICK_TUNING_SEEDS if quick else TUNING_SEEDS
    return [
        {"net": net, "norm": "none", "learning_rate": rate, "seed": seed, "probe": False}
        for seed in seeds
        for net in config.nets
        for rate in config.rates(net)
    ]


def _mean_losses(runs: list[dict]) -> dict[str, dict[float, float]]:
    """Mean final validation loss over tuning seeds, by network and rate (inf if any diverged)."""
    losses: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        by_rate = losses.setdefault(run["params"]["net"], {})
        value = run["result"]["validation_loss"]
        by_rate.setdefault(run["params"]["learning_rate"], []).append(
            value if value is not None and math.isfinite(value) else math.inf
        )
    return {net: {rate: sum(values) / len(values) for rate, values in by_rate.items()}
            for net, by_rate in losses.items()}


def _choose(config: SmoothnessConfig, runs: list[dict]) -> dict:
    chosen = {}
    for net, by_rate in _mean_losses(runs).items():
        best = min(by_rate.values())
        chosen[net] = min(rate for rate, value in by_rate.items() if value == best)
    return {"learning_rate": chosen}


def _apply(choice: dict, params: dict) -> dict:
    return {**params, "learning_rate": choice["learning_rate"][params["net"]]}


def _tuning_table(config: SmoothnessConfig, runs: list[dict], choice: dict) -> Table:
    means = _mean_losses(runs)
    rows = [
        [NET_NAMES[net],
         ", ".join(f"{rate:g}: {means[net][rate]:.3f}" for rate in config.rates(net)
                   if rate in means[net]),
         f"{choice['learning_rate'][net]:g}"]
        for net in config.nets if net in means
    ]
    seeds = len(seeds_of(runs))
    return Table(
        "The common learning rate of each network, chosen on the validation part: final "
        f"validation loss of the network WITHOUT BN by rate, mean over {seeds} tuning "
        f"seed{'s' if seeds != 1 else ''} (never an evaluation seed; inf: a seed diverged); BN "
        "trains at the same rate",
        ["network", "rate: validation loss", "chosen"],
        rows,
    )


TUNING = Tuning(plan=_tuning_plan, choose=_choose, apply=_apply, table=_tuning_table)


# ---- Findings ------------------------------------------------------------------------------------


def during_training(result: dict, measure: str) -> list[float]:
    """A run's probe values after step 0 (the checkpoints during training)."""
    return [value for step, value in zip(result["steps"], result[measure], strict=True) if step > 0]


DIVERGED_RATIO = 1000.0


def median_ratio(without: dict, with_bn: dict, measure: str) -> float:
    """Median over checkpoints without BN divided by the median with BN, for one seed. A median
    that is not finite (a run that diverged for half its checkpoints) makes the ratio
    ``DIVERGED_RATIO`` (or its inverse), a finite stand-in for "rougher than any measured"."""
    top = statistics.median(during_training(without, measure))
    bottom = statistics.median(during_training(with_bn, measure))
    if not math.isfinite(top) and not math.isfinite(bottom):
        return 1.0
    if not math.isfinite(top) or bottom <= 0:
        return DIVERGED_RATIO
    if not math.isfinite(bottom) or top <= 0:
        return 1 / DIVERGED_RATIO
    return top / bottom


# Two probings of the same run on different random batches gave medians over 20 checkpoints
# that differed by this factor (root mean square over the CNN and the deep linear network, with
# and without BN, three seeds each; the larger of the two judged measures), measured while the
# experiment was built. That is the probe noise of a ratio of two independently probed medians.
PROBE_NOISE = 1.13
PROBE_NOISE_CHECKPOINTS = 20


def probe_noise(checkpoints: int, seeds: int) -> float:
    """Two standard errors of the geometric mean over ``seeds`` of a ratio of two runs' medians
    over ``checkpoints`` probes, from the probe batches alone (a median's noise shrinks about as
    the square root of the checkpoints it is taken over)."""
    per_seed = math.log(PROBE_NOISE) * math.sqrt(PROBE_NOISE_CHECKPOINTS / max(checkpoints, 1))
    return math.exp(2 * per_seed / math.sqrt(max(seeds, 1)))


def ratio_rule(measure: str, checkpoints: int, seeds: int) -> Rule:
    """Threshold: ``MINIMUM_RATIO``, or the probe batches' own noise when that is larger."""
    noise = probe_noise(checkpoints, seeds)
    threshold = math.ceil(100 * max(MINIMUM_RATIO, noise)) / 100
    why = (
        f"each seed's value is the median of the {MEASURE_NAMES[measure]} over {checkpoints} "
        "checkpoints, each probed on a fresh random batch of training examples, so probe noise "
        "and the spread between seeds are both inside the interval. Two probings of the same "
        f"runs on different batches gave medians over {PROBE_NOISE_CHECKPOINTS} checkpoints "
        f"{PROBE_NOISE:g}x apart (root mean square, measured while the experiment was built); "
        f"over {checkpoints} checkpoints and {seeds} seeds that alone moves the mean ratio by "
        f"up to {noise:.2f}x (two standard errors). The threshold is the larger of that and "
        f"{MINIMUM_RATIO:g}x, the least smoothing worth the name"
    )
    return Rule(threshold=threshold, supports="above", scale="log", unit="x", why=why)


def findings(config: SmoothnessConfig, runs: list[dict]) -> list[Finding]:
    results = one_per(runs, "net", "norm", "seed")
    found = []
    for net in config.nets:
        seeds = [seed for seed in seeds_of(runs)
                 if (net, "none", seed) in results and (net, "batch", seed) in results]
        if not seeds:
            continue
        for measure in JUDGED:
            ratios = [median_ratio(results[(net, "none", seed)], results[(net, "batch", seed)],
                                   measure) for seed in seeds]
            checkpoints = len(during_training(results[(net, "batch", seeds[0])], measure))
            rule = ratio_rule(measure, checkpoints, len(seeds))
            found.append(judge(
                "C4",
                "smoothness",
                f"{NET_NAMES[net]}: {MEASURE_NAMES[measure]} along the gradient without BN "
                "divided by with BN (median over checkpoints per seed), both at one learning rate",
                ratios,
                rule,
                data=data_of([run for run in runs if run["params"]["net"] == net]),
                split="training",
            ))
    return found


# ---- Tables and figures --------------------------------------------------------------------------


def _finite_columns(curves: list[list[float]]) -> list[int]:
    return [index for index, column in enumerate(zip(*curves, strict=True))
            if all(math.isfinite(value) and value > 0 for value in column)]


def geometric_band(curves: list[list[float]]) -> tuple[list[int], list[float], list[float],
                                                         list[float]]:
    """Point by point across seeds: the geometric mean and its 95% t-interval (taken on the log
    scale, where these positive, skewed measures are closer to normal), at the checkpoints where
    every seed has a finite positive value (their indices come first)."""
    kept = _finite_columns(curves)
    means, lows, highs = [], [], []
    for index in kept:
        interval = ratio_interval([curve[index] for curve in curves])
        means.append(interval.mean)
        lows.append(interval.mean if math.isnan(interval.low) else interval.low)
        highs.append(interval.mean if math.isnan(interval.high) else interval.high)
    return kept, means, lows, highs


def _interval_text(values: list[float]) -> str:
    interval = ratio_interval(values)
    if math.isnan(interval.low):
        return f"{interval.mean:.2f}x"
    return f"{interval.mean:.2f}x [{interval.low:.2f}, {interval.high:.2f}]"


def _net_figure(config: SmoothnessConfig, net: str, results: dict, seeds: list[int]) -> Figure:
    loss_series, beta_series = [], []
    for norm in ("none", "batch"):
        group = [results[(net, norm, seed)] for seed in seeds]
        steps = group[0]["steps"]
        rate = group[0]["learning_rate"]
        label = f"{'BN' if norm == 'batch' else 'no BN'} (lr {rate:g})"
        lows, highs = [r["loss_low"] for r in group], [r["loss_high"] for r in group]
        kept = _finite_columns(lows + highs + [r["loss"] for r in group])
        count = len(group)
        loss_series.append(Series(
            label, [steps[i] for i in kept],
            [sum(r["loss"][i] for r in group) / count for i in kept],
            [sum(low[i] for low in lows) / count for i in kept],
            [sum(high[i] for high in highs) / count for i in kept],
        ))
        kept, mean, low, high = geometric_band([r["beta"] for r in group])
        beta_series.append(Series(label, [steps[i] for i in kept], mean, low, high, style="o-"))
    steps_text = ", ".join(f"{m:g}" for m in config.multipliers)
    seeds_text = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    return Figure(
        f"smoothness-{net}",
        [
            Panel(f"{NET_NAMES[net]}: loss along the gradient", "training step",
                  "training loss (log)", loss_series, yscale="log"),
            Panel(f"{NET_NAMES[net]}: effective beta-smoothness", "training step",
                  "max ||grad change|| / ||step|| (log)", beta_series, yscale="log"),
        ],
        caption=(
            f"The {NET_NAMES[net]} with and without BN, both at one learning rate, over training "
            f"(log y). Left: the line is the loss on the probe batch at the current weights and "
            f"the shaded band runs from the smallest to the largest loss after steps of "
            f"{steps_text} times the learning rate along the gradient (the band's width is the "
            f"loss range; mean over {seeds_text}, not a confidence interval). Right: the "
            f"effective beta-smoothness, geometric mean over {seeds_text}; its shaded band is "
            "the 95% t-interval across seeds, on the log scale."
            + ("" if len(seeds) >= 2 else " One seed, so no interval.")
        ),
    )


def analyze(config: SmoothnessConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    results = one_per(runs, "net", "norm", "seed")
    for run_record in runs:  # the figure labels its lines with the rate the runs trained at
        key = (run_record["params"]["net"], run_record["params"]["norm"],
               run_record["params"]["seed"])
        results[key] = {**results[key], "learning_rate": run_record["params"]["learning_rate"]}
    summary, ratios = [], []
    for net in config.nets:
        seeds = [seed for seed in seeds_of(runs)
                 if (net, "none", seed) in results and (net, "batch", seed) in results]
        if not seeds:
            continue
        for norm in ("none", "batch"):
            group = [results[(net, norm, seed)] for seed in seeds]
            medians = {
                measure: [statistics.median(during_training(r, measure)) for r in group]
                for measure in MEASURES
            }
            summary.append([
                NET_NAMES[net], norm, f"{group[0]['learning_rate']:g}",
                percent(sum(r["validation_accuracy"][-1] for r in group) / len(group)),
                percent(sum(r["test_accuracy"] for r in group) / len(group)),
                *(f"{ratio_interval(values).mean:.3g}"
                  if all(math.isfinite(v) and v > 0 for v in values) else "diverged"
                  for values in medians.values()),
            ])
        ratios.append([
            NET_NAMES[net],
            *(_interval_text([median_ratio(results[(net, "none", seed)],
                                           results[(net, "batch", seed)], measure)
                              for seed in seeds])
              for measure in MEASURES),
        ])
        analysis.figures.append(_net_figure(config, net, results, seeds))
        if any(results[(net, norm, seed)]["nonfinite"] for norm in ("none", "batch")
               for seed in seeds):
            analysis.notes.append(
                f"Some {NET_NAMES[net]} runs diverged; their checkpoints after it count as "
                f"infinitely rough, and a seed whose median is not finite enters the ratio as "
                f"{DIVERGED_RATIO:g}x."
            )
    analysis.notes.append(
        "The loss range grows with how far the loss falls along the gradient as well as with how "
        "much the slope bends, and a network that learns faster falls further in the same step. "
        "The departure from the slope's prediction, max over the steps of |L(w - eta g) - "
        "(L(w) - eta ||g||^2)|, keeps only the bending; it is shown, not judged (the verdicts "
        "rest on the published measures)."
    )
    analysis.tables.append(Table(
        "Each network's landscape during training: per seed the median over checkpoints, then "
        "the geometric mean over seeds; accuracies are means over seeds at the end of training",
        ["network", "norm", "learning rate", "validation accuracy", "test accuracy",
         *(MEASURE_NAMES[measure] for measure in MEASURES)],
        summary,
    ))
    analysis.tables.append(Table(
        "Without BN divided by with BN, geometric mean over seeds [95% CI] (above 1: BN is "
        "smoother); the loss range and beta-smoothness carry the verdicts, the gradient "
        "predictiveness and the departure from the slope's prediction are shown beside them",
        ["network", *(MEASURE_NAMES[measure] for measure in MEASURES)],
        ratios,
    ))
    return analysis


def setup(config: SmoothnessConfig) -> str:
    multipliers = ", ".join(f"{m:g}" for m in config.multipliers)
    return (
        f"Two networks, each without and with BN: the CNN (1-D convolutions of widths "
        f"{', '.join(map(str, config.widths))}, kernel 3, strides 1, 2, 2, ReLU, BN before each "
        f"activation, global average pooling) and a deep linear network of "
        f"{config.linear_depth} linear layers ({config.linear_depth - 1} hidden layers of "
        f"{config.linear_width} units with BN after each, or nothing, no activation; "
        f"variance-preserving initialization). SGD (momentum {MOMENTUM}), batch "
        f"{config.batch_size}, {config.steps} steps. Every {config.probe_every} steps, on a fresh "
        f"batch of {config.probe_batch} training examples in training mode, the probe takes the "
        f"gradient g and steps to w - eta g for eta = {multipliers} times the learning rate. "
        "Both norms of a network train at one learning rate: the one with the lowest final "
        "validation loss for the network without BN (CNN from "
        f"{', '.join(f'{r:g}' for r in config.cnn_rates)}; deep linear network from "
        f"{', '.join(f'{r:g}' for r in config.linear_rates)}), because the probe's steps are "
        "multiples of the rate and a trajectory's sharpness follows its rate; a rate that BN "
        "might like more is denied to it, which leans against the claim, not for it. "
        "Validation loss rather than accuracy chooses it because the deep linear network is a "
        "linear classifier and ends near one accuracy at every stable rate."
    )


# Relative work per run: a BN layer of ours costs about as much as the rest of a small layer, and
# the deep linear network has 24 of them.
WORK = {("cnn", "none"): 1.0, ("cnn", "batch"): 2.0, ("linear", "none"): 1.0,
        ("linear", "batch"): 3.5}


def cost(config: SmoothnessConfig, params: dict) -> float:
    probing = 1.5 if params.get("probe", True) else 1.0
    return config.steps * WORK[(params["net"], params["norm"])] * probing


EXPERIMENT = Experiment(
    name="smoothness",
    claims=("C4",),
    question="Does BN make the loss and its gradient change more gently along the gradient?",
    config_type=SmoothnessConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "MNIST-1D's signals suit the lab's 1-D CNN, the smallest convolutional network on which "
        "the published VGG comparison can be repeated, and they keep the CNN learning for "
        "hundreds of steps, so the probes see a landscape that is still changing; the deep "
        "linear network runs on the same data, narrow (16 units) to stay cheap."
    ),
    published=(
        "Santurkar et al. 2018 walk from the current weights along the gradient, with steps "
        "from half to four times the learning rate, and record how much the loss varies, how "
        "much the gradient changes, and that change per unit of distance (the effective "
        "beta-smoothness); on a VGG network on CIFAR-10 and on a 25-layer deep linear network "
        "(their cheap second test bed) they report all three smaller with BN. The accuracies "
        "quoted for their VGG on CIFAR-10 are 83% with BN and 80% without (secondary, as quoted). "
        "CLAIMS.md gives no numbers for the landscape measures themselves."
    ),
    tuning=TUNING,
    cost=cost,
)
