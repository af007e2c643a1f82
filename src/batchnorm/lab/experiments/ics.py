"""C3 by Santurkar et al.'s definitions: internal covariate shift as the change of a layer's
gradient when the layers below it take their step, and "noisy BN", whose inputs drift on purpose.

Gradient change. At a measured step ``t`` the step's batch gives the gradient ``G`` of every
hidden layer's weights. The optimizer then takes the step. For hidden layer ``i`` (from the
second on: the first sees the data, which does not move) the layers ``1..i-1`` are set to their
new values, layer ``i`` and everything above it are kept at their old ones, and the gradient of
layer ``i``'s weights on the same batch is taken again: ``G'``. The shift is ``||G - G'||``, raw
and relative to ``||G||``, and ``cos(G, G')``. The update is the one the optimizer really applies
(SGD with momentum), not a plain gradient step. The lab's training loop runs it, with this
experiment's own step (``take_step``): it redraws the noise once per step and, at a measured
step, stops between the step's gradient and its update.

Noisy BN. After each of our BN layers, ``y -> s * y + m`` with ``s`` and ``m`` drawn afresh at
every step for every unit (a step-wide mean and scale, then a per-unit spread around them) and
held fixed within the step, so that ``G`` and ``G'`` see the same noise. At evaluation the
layer applies the noise's expectation, as dropout applies its expected scale.

Drift, the covariate shift as a change of distribution: at every measured step, each unit's mean
and standard deviation over a fixed set of examples (the validation part, in training mode, so
with the step's batch statistics and noise) at the input of every hidden layer from the second
on. Over the late window of training (from ``late_start`` of the run, as in ``ioffe-mnist``) a
unit drifts by the range of its mean plus the range of its standard deviation, relative to its
average standard deviation; the median over units (a few near-dead ReLU units would otherwise
dominate), averaged over layers.

All three networks train at one learning rate, chosen on the validation part for the network
without BN, so that a difference in gradient change is not a difference in step size.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, replace

import torch
from torch import nn

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
from batchnorm.lab.stats import accuracy_effect, ratio_interval
from batchnorm.lab.training import MOMENTUM, sgd_step
from batchnorm.lab.verdict import (
    INCONCLUSIVE,
    Finding,
    Rule,
    accuracy_rule,
    format_number,
    judge,
    judge_accuracy,
)

NORM_LABELS = {"none": "no BN", "batch": "BN", "noisy": "noisy BN"}
# Santurkar et al.'s noise: per step mu ~ U(-0.5, 0.5) and sigma ~ U(1, 1.25); per unit
# m ~ U(mu - 0.1, mu + 0.1) and s ~ N(sigma, 0.1).
STEP_SHIFT = 0.5
STEP_SCALE = (1.0, 1.25)
UNIT_SHIFT = 0.1
UNIT_SCALE = 0.1
# BN reduces the gradient change if the network without BN has at least half as much again.
ICS_THRESHOLD = 1.5
# Noisy BN's inputs must drift at least half as much again as BN's for its accuracy to say
# anything about shift (the threshold ioffe-mnist uses for drift).
DRIFT_THRESHOLD = 1.5
NOISE_SEED_OFFSET = 7_777_777  # the noise has a generator of its own, apart from the batch order


class NoisyBatchNorm(nn.Module):
    r"""Our BN followed by a random per-unit affine map that changes at every step:

    .. math:: y = s \odot \mathrm{BN}(x) + m

    with ``s`` and ``m`` redrawn by :meth:`resample` (the training loop calls it once per step)
    and fixed in between. In eval mode ``s`` and ``m`` are their expectations, so the network
    sees on average what it saw in training.

    Args:
        norm: the batch norm layer to wrap (ours).
        num_features: its number of units.
    """

    def __init__(self, norm: nn.Module, num_features: int) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("noise_scale", torch.ones(num_features))
        self.register_buffer("noise_shift", torch.zeros(num_features))

    @torch.no_grad()
    def resample(self, generator: torch.Generator) -> None:
        """Draw this step's noise: a step-wide mean and scale, then a spread around them."""
        step_shift = (2 * torch.rand((), generator=generator) - 1) * STEP_SHIFT
        low, high = STEP_SCALE
        step_scale = low + (high - low) * torch.rand((), generator=generator)
        size = self.noise_shift.shape
        unit_shift = (2 * torch.rand(size, generator=generator) - 1) * UNIT_SHIFT
        unit_scale = torch.randn(size, generator=generator) * UNIT_SCALE
        self.noise_shift.copy_(step_shift + unit_shift)
        self.noise_scale.copy_(step_scale + unit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = self.norm(x)
        if self.training:
            return normalized * self.noise_scale + self.noise_shift
        return normalized * expected_noise_scale()  # the shift's expectation is zero


def expected_noise_scale() -> float:
    return sum(STEP_SCALE) / 2


def hidden_blocks(model: nn.Module) -> list[nn.Sequential]:
    """The MLP's hidden blocks (linear, norm, activation), first to last."""
    return [block for block in model.hidden if isinstance(block, nn.Sequential)]


def add_noise(model: nn.Module) -> nn.Module:
    """Wrap every hidden block's norm (our BN) in :class:`NoisyBatchNorm`."""
    for block in hidden_blocks(model):
        norm = block[1]
        block[1] = NoisyBatchNorm(norm, norm.num_features)
    return model


def resample_noise(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, NoisyBatchNorm):
            module.resample(generator)


@dataclass(frozen=True)
class IcsConfig:
    norms: tuple[str, ...] = ("none", "batch", "noisy")
    tuning_rates: tuple[float, ...] = (0.03, 0.1, 0.3)
    steps: int = 800
    measure_every: int = 80  # gradient change and input statistics at step 1 and every this
    eval_every: int = 200
    late_start: float = 0.5  # drift is measured from this fraction of the run on
    batch_size: int = 128
    depth: int = 5
    width: int = 64
    activation: str = "relu"

    @classmethod
    def quick(cls) -> IcsConfig:
        return replace(cls(), tuning_rates=(0.03, 0.1), steps=100, measure_every=25,
                       eval_every=50)


def plan(config: IcsConfig, seeds) -> list[dict]:
    return [{"norm": norm, "seed": seed} for seed in seeds for norm in config.norms]


# ---- The measurements ----------------------------------------------------------------------


def gradient_change(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float, float]:
    """``(||G - G'|| / ||G||, ||G - G'||, cos(G, G'))`` of two gradients of one weight."""
    raw = float(torch.linalg.vector_norm(before - after))
    size = float(torch.linalg.vector_norm(before))
    cosine = float(nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0))
    return (raw / size if size > 0 else math.nan), raw, cosine


def _loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(inputs), labels)


def measured_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, list[tuple[float, float, float]]]:
    """Take one training step and measure, for every hidden layer from the second on, how much
    its weights' gradient on this batch changes when only the layers below it take their step.

    Returns the step's loss and one :func:`gradient_change` per measured layer. The model's noise
    (if any) must be drawn before the call; the recomputations use the same noise and batch.
    """
    before = copy.deepcopy(model)  # the weights before the step (noise buffers included)
    loss = _loss(model, inputs, labels)
    if not torch.isfinite(loss):
        return loss, []
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    blocks = hidden_blocks(model)
    gradients = [block[0].weight.grad.detach().clone() for block in blocks]
    optimizer.step()
    changes = []
    moved = hidden_blocks(before)
    for index in range(1, len(blocks)):
        # Layers 1..index-1 take their step (one more each time round), the rest stay.
        with torch.no_grad():
            for old, new in zip(moved[index - 1].parameters(), blocks[index - 1].parameters(),
                                strict=True):
                old.copy_(new)
        before.zero_grad(set_to_none=True)
        _loss(before, inputs, labels).backward()
        changes.append(gradient_change(gradients[index], moved[index][0].weight.grad))
    return loss, changes


@torch.no_grad()
def input_statistics(model: nn.Module, inputs: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each unit's mean and standard deviation over ``inputs`` at the input of every hidden
    layer from the second on, in training mode (batch statistics, the step's noise) on a copy,
    so that the model's running statistics are left alone."""
    probe = copy.deepcopy(model).train()
    captured: list[torch.Tensor] = []
    hooks = [block[0].register_forward_hook(
                 lambda module, args, output: captured.append(args[0].detach()))
             for block in hidden_blocks(probe)[1:]]
    probe(inputs)
    for hook in hooks:
        hook.remove()
    return [(values.mean(dim=0), values.std(dim=0)) for values in captured]


def drift(means: torch.Tensor, stds: torch.Tensor) -> float:
    """``means``, ``stds``: (measurements, units) of one layer's inputs. Each unit's range of
    mean plus range of standard deviation, over its average standard deviation; the median over
    units (units whose average standard deviation is zero, dead ReLUs, are left out)."""
    spread = stds.mean(dim=0)
    alive = spread > 0
    if not alive.any():
        return math.nan
    ranges = (means.amax(dim=0) - means.amin(dim=0)) + (stds.amax(dim=0) - stds.amin(dim=0))
    return float((ranges[alive] / spread[alive]).median())


def movement(means: torch.Tensor, stds: torch.Tensor) -> list[float]:
    """Between consecutive measurements, each unit's change of mean plus change of standard
    deviation over its average standard deviation (median over live units)."""
    spread = stds.mean(dim=0)
    alive = spread > 0
    steps = (means.diff(dim=0).abs() + stds.diff(dim=0).abs())[:, alive] / spread[alive]
    return [float(value) for value in steps.median(dim=1).values]


# ---- One run -------------------------------------------------------------------------------


def build_model(config: IcsConfig, data, norm: str) -> nn.Module:
    model = mlp_builder(config, data, "none" if norm == "none" else "batch")()
    return add_noise(model) if norm == "noisy" else model


def run(config: IcsConfig, params: dict, data, device: str) -> dict:
    seed, norm = params["seed"], params["norm"]
    measuring = params.get("measure", True)  # tuning runs only need their validation accuracy
    noise_generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    validation_inputs = data.validation.vectors.to(device)
    measured_steps, changes, statistics_by_step = [], [], []

    def take_step(step, model, optimizer, inputs, labels) -> torch.Tensor:
        resample_noise(model, noise_generator)
        if not (measuring and (step == 1 or step % config.measure_every == 0)):
            return sgd_step(model, optimizer, inputs, labels)
        recorded = input_statistics(model, validation_inputs)
        loss, change = measured_step(model, optimizer, inputs, labels)
        if torch.isfinite(loss):
            measured_steps.append(step)
            changes.append(change)
            statistics_by_step.append(recorded)
        return loss

    fitted = fit(lambda: build_model(config, data, norm), data, device, seed, images=False,
                 steps=config.steps, batch_size=config.batch_size,
                 learning_rate=params["learning_rate"], eval_every=config.eval_every,
                 take_step=take_step)
    return fitted.record(
        steps=fitted.training.steps,
        measured_steps=measured_steps,
        # Per measured step, per hidden layer from the second on.
        relative_change=[[item[0] if math.isfinite(item[0]) else None for item in step]
                         for step in changes],  # None where ||G|| = 0 (a dead layer)
        raw_change=[[item[1] for item in step] for step in changes],
        cosine=[[item[2] for item in step] for step in changes],
        **drift_record(config, measured_steps, statistics_by_step),
    )


def drift_record(config: IcsConfig, steps: list[int], recorded: list) -> dict:
    """The drift over the late window and the step-to-step movement, per layer and overall."""
    late = [index for index, step in enumerate(steps) if step >= config.late_start * config.steps]
    layers = len(recorded[0]) if recorded else 0
    by_layer, moves = [], []
    for layer in range(layers):
        means = torch.stack([at_step[layer][0] for at_step in recorded])
        stds = torch.stack([at_step[layer][1] for at_step in recorded])
        finite = bool(torch.isfinite(means).all() and torch.isfinite(stds).all())
        usable = finite and len(late) >= 2
        by_layer.append(drift(means[late], stds[late]) if usable else None)
        moves.append(movement(means, stds) if finite else None)
    overall = None
    if by_layer and all(value is not None and math.isfinite(value) for value in by_layer):
        overall = sum(by_layer) / len(by_layer)
    movement_curve = None
    if moves and all(curve is not None for curve in moves):
        movement_curve = [sum(values) / len(values) for values in zip(*moves, strict=True)]
    return {"drift": overall, "drift_by_layer": by_layer, "movement": movement_curve}


TUNING = replace(
    rate_tuning(
        ("norm",),
        groups=lambda config: [{"norm": "none"}],
        rates=lambda config: config.tuning_rates,
        score=final_validation_accuracy,
        score_name="final validation accuracy of the network without BN (all three networks "
                   "train at its rate)",
        fixed=lambda config: {"measure": False},
    ),
    apply=lambda choice, params: {**params, "learning_rate": choice["learning_rate"]["none"]},
)


# ---- Findings ------------------------------------------------------------------------------


def _overall_mean(curve: list[list[float | None]], layer: int | None = None) -> float | None:
    """The mean over measured steps and layers (or over steps at one ``layer``)."""
    kept = [value for step in curve
            for value in (step if layer is None else step[layer : layer + 1])
            if value is not None and math.isfinite(value)]
    return sum(kept) / len(kept) if kept else None


def mean_relative_change(result: dict) -> float | None:
    """The relative gradient change averaged over the measured steps and layers."""
    return _overall_mean(result["relative_change"])


def ics_rule() -> Rule:
    why = (
        "each seed's value averages the relative gradient change over every measured step and "
        "every hidden layer from the second on, and the interval is across seeds on the log "
        "scale, so the batch drawn at one step does not decide it; the threshold asks for at "
        f"least half as much change again without BN ({ICS_THRESHOLD:g}x) before calling it "
        "less shift with BN"
    )
    return Rule(threshold=ICS_THRESHOLD, supports="above", scale="log", unit="x", why=why)


def drift_ratios(results: dict, seeds: list[int], top: str, bottom: str) -> list[float]:
    pairs = [(results[(top, seed)]["drift"], results[(bottom, seed)]["drift"]) for seed in seeds]
    return [a / b for a, b in pairs if a is not None and b is not None and a > 0 and b > 0]


def findings(config: IcsConfig, runs: list[dict]) -> list[Finding]:
    if not {"none", "batch"} <= set(config.norms):
        return []
    results = one_per(runs, "norm", "seed")
    seeds = seeds_of(runs)
    data = data_of(runs)
    pairs = [(mean_relative_change(results[("none", s)]),
              mean_relative_change(results[("batch", s)])) for s in seeds]
    found = [
        judge(
            "C3",
            "ics",
            "internal covariate shift as gradient change (Santurkar et al.): the relative change "
            "||G - G'|| / ||G|| of a hidden layer's weight gradient when only the layers below "
            "it take their step, averaged over measured steps and layers, without BN divided "
            "by with BN",
            [none / batch for none, batch in pairs if none and batch],
            ics_rule(),
            data=data,
            split="training",
        )
    ]
    if "noisy" not in config.norms:
        return found
    examples = test_size(runs)
    effect = accuracy_effect([
        (+1.0, [test_outcomes(results[("batch", seed)]) for seed in seeds]),
        (-1.0, [test_outcomes(results[("noisy", seed)]) for seed in seeds]),
    ])
    accuracy_finding = judge_accuracy(
        "C3",
        "ics",
        "internal covariate shift as distribution drift, tested by adding it: test accuracy of "
        "BN minus that of noisy BN (BN followed by a random shift and scale redrawn every step), "
        "in percentage points; if shift were what BN removes, the noise should cost accuracy "
        "(supported above the margin; noisy BN within the margin of BN is not supported)",
        effect,
        accuracy_rule(examples, 2),
        data=data,
    )
    reason = premise_missing(drift_ratios(results, seeds, "noisy", "batch"))
    if reason:
        accuracy_finding = replace(accuracy_finding, verdict=INCONCLUSIVE, degenerate=reason)
    found.append(accuracy_finding)
    return found


def premise_missing(ratios: list[float]) -> str:
    """Why noisy BN's accuracy cannot speak to shift, or "" when its inputs drifted clearly more
    than BN's (the 95% interval of the drift ratio entirely above ``DRIFT_THRESHOLD``)."""
    if len(ratios) < 2:
        return "noisy BN's drift could not be compared with BN's (fewer than 2 seeds)"
    interval = ratio_interval(ratios)
    if interval.low > DRIFT_THRESHOLD:
        return ""
    return (
        f"noisy BN's inputs did not drift clearly more than BN's (drift ratio "
        f"{format_number(interval.mean, 'x')} [{format_number(interval.low, 'x')}, "
        f"{format_number(interval.high, 'x')}], needed entirely above "
        f"{format_number(DRIFT_THRESHOLD, 'x')}), so its accuracy says nothing about shift"
    )


# ---- Analysis ------------------------------------------------------------------------------


def _layer_mean(curve: list[list[float | None]]) -> list[float]:
    """Per measured step, the mean over layers (``None`` entries, dead layers, left out)."""
    means = []
    for step in curve:
        kept = [value for value in step if value is not None]
        means.append(sum(kept) / len(kept) if kept else math.nan)
    return means


def _mean_text(values: list[float | None]) -> str:
    kept = [value for value in values if value is not None and math.isfinite(value)]
    return f"{sum(kept) / len(kept):.3g}" if kept else "n/a"


def _interval_text(values: list[float]) -> str:
    if len(values) < 2:
        return format_number(values[0], "x") if values else "n/a"
    interval = ratio_interval(values)
    return (f"{format_number(interval.mean, 'x')} [{format_number(interval.low, 'x')}, "
            f"{format_number(interval.high, 'x')}]")


def _band(label: str, steps: list, curves: list[list[float]], scale: float = 1.0) -> Series:
    mean, low, high = interval_band(curves)
    return Series(label, steps, [scale * v for v in mean], [scale * v for v in low],
                  [scale * v for v in high])


def analyze(config: IcsConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    results = one_per(runs, "norm", "seed")
    seeds = seeds_of(runs)
    cosine_series, change_series, movement_series, accuracy_series = [], [], [], []
    rows, layer_rows = [], []
    rate = runs[0]["params"]["learning_rate"] if runs else math.nan
    for norm in config.norms:
        group = [results[(norm, seed)] for seed in seeds if (norm, seed) in results]
        if not group:
            continue
        label = NORM_LABELS.get(norm, norm)
        # Curves need equal lengths: a run that diverged early is left out of them.
        full = [result for result in group
                if len(result["measured_steps"]) == len(group[0]["measured_steps"])]
        steps = full[0]["measured_steps"] if full else []
        if steps:
            cosine_series.append(_band(label, steps, [_layer_mean(r["cosine"]) for r in full]))
            change_series.append(
                _band(label, steps, [_layer_mean(r["relative_change"]) for r in full]))
        moving = [r["movement"] for r in full if r["movement"] is not None]
        if moving:
            movement_series.append(_band(label, steps[1:], moving))
        accuracy_series.append(_band(label, group[0]["steps"],
                                     [r["validation_accuracy"] for r in group], scale=100))
        rows.append([
            label,
            _mean_text([mean_relative_change(r) for r in group]),
            _mean_text([_overall_mean(r["raw_change"]) for r in group]),
            _mean_text([_overall_mean(r["cosine"]) for r in group]),
            _mean_text([r["drift"] for r in group]),
            percent(statistics.fmean(r["test_accuracy"] for r in group)),
        ])
        layers = len(group[0]["relative_change"][0]) if group[0]["relative_change"] else 0
        layer_rows.append([label, *(
            _mean_text([_overall_mean(r["relative_change"], layer) for r in group])
            for layer in range(layers))])
    analysis.tables.append(Table(
        f"Gradient change, drift and test accuracy (mean over seeds; learning rate {rate:g} for "
        "all); the change is averaged over measured steps and hidden layers 2 and up",
        ["network", "||G - G'|| / ||G||", "||G - G'||", "cos(G, G')",
         "drift of layer inputs (late window)", "final test accuracy"],
        rows,
    ))
    if layer_rows:
        analysis.tables.append(Table(
            "Relative gradient change ||G - G'|| / ||G|| by hidden layer (mean over steps and "
            "seeds)",
            ["network", *(f"layer {index + 2}" for index in range(len(layer_rows[0]) - 1))],
            layer_rows,
        ))
    if {"none", "batch"} <= set(config.norms):
        analysis.notes.append(drift_note(results, seeds, config))
    analysis.figures.append(Figure(
        "ics",
        [Panel("cos(G, G') over training", "step", "cosine (mean over layers)", cosine_series),
         Panel("Relative gradient change over training", "step",
               "||G - G'|| / ||G|| (mean over layers)", change_series, yscale="log"),
         Panel("Drift of layer inputs between measurements", "step",
               "(|change of mean| + |change of std|) / std", movement_series),
         Panel("Validation accuracy over training", "step", "validation accuracy (%)",
               accuracy_series)],
        caption=band_caption(
            "Santurkar et al.'s internal covariate shift: the cosine (first panel) and relative "
            "distance (second, log axis) between a hidden layer's weight gradient before and "
            "after the layers below it take their step, on the step's batch, averaged over "
            "hidden layers 2 and up; third, how far each unit's mean and standard deviation at "
            "the input of those layers moved since the previous measurement, relative to the "
            "unit's average standard deviation (median over units, mean over layers); fourth, "
            "validation accuracy (%). No BN, BN and noisy BN at one learning rate",
            len(seeds),
        ),
    ))
    return analysis


def drift_note(results: dict, seeds: list[int], config: IcsConfig) -> str:
    parts = [f"no BN / BN {_interval_text(drift_ratios(results, seeds, 'none', 'batch'))}"]
    if "noisy" in config.norms:
        parts.append(
            f"noisy BN / BN {_interval_text(drift_ratios(results, seeds, 'noisy', 'batch'))}")
    return (
        "Drift of the layer inputs over the late window (from step "
        f"{int(config.late_start * config.steps)}), ratio with its 95% interval across seeds "
        "(geometric): " + "; ".join(parts) + f". The accuracy finding counts only if noisy BN's "
        f"ratio lies entirely above {format_number(DRIFT_THRESHOLD, 'x')}."
    )


def setup(config: IcsConfig) -> str:
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    low, high = STEP_SCALE
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units: no "
        "BN, BN (ours) before each activation, and noisy BN: after each BN, y -> s*y + m with, "
        f"at every step, a step-wide mu ~ U(-{STEP_SHIFT:g}, {STEP_SHIFT:g}) and sigma ~ "
        f"U({low:g}, {high:g}), then per unit m ~ U(mu - {UNIT_SHIFT:g}, mu + {UNIT_SHIFT:g}) "
        f"and s ~ N(sigma, {UNIT_SCALE:g}), each hidden layer drawing its own; at evaluation "
        f"s = {expected_noise_scale():g} and m = 0, their expectations. SGD (momentum "
        f"{MOMENTUM}), batch {config.batch_size}, {config.steps} steps, one learning rate for "
        f"all three, chosen from {rates} for the network without BN on the validation part "
        "(so the gradient change is compared at one step size). At step 1 and every "
        f"{config.measure_every} steps: G, each hidden layer's weight gradient on the step's "
        "batch; G', the same after the layers below it take this step's update (momentum "
        "included), same batch and noise; ||G - G'|| raw and relative to ||G||, and cos(G, G') "
        "for hidden layers 2 to "
        f"{config.depth} (layer 1 has no layer below). Drift: every unit's mean and standard "
        "deviation on the validation part (training mode) at the input of those layers; over "
        f"the steps from {percent(config.late_start)} of the run on, the range of the mean plus "
        "the range of the standard deviation over the average standard deviation, median over "
        "units, mean over layers."
    )


def cost(config: IcsConfig, params: dict) -> float:
    return config.steps * (1.0 if params["norm"] == "none" else 3.0)


EXPERIMENT = Experiment(
    name="ics",
    claims=("C3",),
    question="Does BN reduce internal covariate shift measured as gradient change, and does "
             "added shift (noisy BN) cost accuracy?",
    config_type=IcsConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "The gradient change needs several layers with layers below them, and the noisy-BN "
        "test needs networks with room below their ceiling, so that noise that hurt training "
        "would show in accuracy: a 5-layer MLP of 64 units on MNIST-1D's 40-point signals "
        "stays near 60% after 800 steps, and it is about the smallest net with four layers "
        "above a first. Batches of 128 rather than the lab's usual 32: on layers this small a "
        "step costs little more, and the networks see four times the data in the same budget."
    ),
    published=(
        "Santurkar et al. 2018 measured internal covariate shift as the change of a layer's "
        "gradient when the layers below it are updated first, on the same batch (the l2 "
        "distance and the cosine of G and G'). In their networks (a VGG and a 25-layer deep "
        "linear network) BN did not shrink this change, and in several cases made it larger. "
        "They also trained "
        "'noisy BN' networks, which add a random shift and scale after each BN that is redrawn "
        "every step (step-wide mean in [-0.5, 0.5] and scale in [1, 1.25], per-unit spread "
        "around them), so that layer inputs move far more than with plain BN; these trained "
        "about as well as BN (as quoted). Both results are curves, without one number to "
        "compare."
    ),
    tuning=TUNING,
    cost=cost,
)
