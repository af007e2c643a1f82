"""C13, overhead: the time of a training step and of an inference batch without BN, with our BN
and with torch's, for an MLP and a CNN; at inference also with BN folded into the layers before
it (``batchnorm.fold``).

Timings on a shared machine drift with the load, so the variants are timed in many short rounds,
interleaved: each round times every variant once, in an order rotated from round to round (A B C,
B C A, C A B, ...), so that no variant always runs first or right after another. Ratios are
taken within a round (both timings saw the same load) and summarized by their median over the
rounds; a run (a seed) gives one median ratio, and the verdict rests on the interval across
runs. The clock is the thread's CPU time (on a CUDA device: wall time after synchronizing), which
a process does not accumulate while it waits for a core.

An A/A control measures the noise: the model without BN is timed twice in each round, as two
variants ("none" and "none again"). Its ratio's interval says how far two timings of one model
can differ here; a verdict's interval (across runs) is widened by that factor, so that a bias
of the timings (the order, the memory a copy lands in) cannot make a verdict.

The two models are the lab's: tiny by design (the suite's budget), so what BN costs here is
mostly the per-call work of a few extra operations, not arithmetic over large tensors.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from batchnorm import convert, fold
from batchnorm.lab.experiments.base import (
    Analysis,
    Experiment,
    Figure,
    Panel,
    Series,
    Table,
    cnn_builder,
    data_of,
    mlp_builder,
    seeds_of,
)
from batchnorm.lab.stats import Interval, ratio_interval
from batchnorm.lab.training import MOMENTUM, batch_indices, seed_everything
from batchnorm.lab.verdict import Finding, Rule, judge

MODELS = ("mlp", "cnn")
TRAINING_VARIANTS = ("none", "ours", "torch", "none again")
INFERENCE_VARIANTS = ("none", "ours", "torch", "folded", "none again")
# What each variant is, for tables and captions.
VARIANT_NAMES = {
    "none": "no BN",
    "ours": "our BN",
    "torch": "torch's BN",
    "folded": "our BN folded",
    "none again": "no BN, timed again (A/A control)",
}
# A ratio to no BN of 1.10 or more is an overhead (10% of the step); below it, none worth the
# name. The A/A control must stay inside [1 / MARGIN, MARGIN] for a verdict.
MARGIN = 1.10


@dataclass(frozen=True)
class OverheadConfig:
    rounds: int = 50
    warmup_rounds: int = 3  # timed but not kept: first calls allocate and fill caches
    steps_per_timing: int = 2  # training steps timed together (one timing)
    batches_per_timing: int = 4  # inference batches timed together
    batch_size: int = 64
    inference_batch: int = 256
    learning_rate: float = 0.01
    depth: int = 3
    width: int = 128
    activation: str = "relu"
    widths: tuple[int, ...] = (16, 32, 32)

    @classmethod
    def quick(cls) -> OverheadConfig:
        return replace(cls(), rounds=15, warmup_rounds=2)


def plan(config: OverheadConfig, seeds) -> list[dict]:
    return [{"seed": seed} for seed in seeds]


# ---- Timing --------------------------------------------------------------------------------


def clock_for(device: str) -> Callable[[], float]:
    """Seconds of this thread's CPU time; on an accelerator, wall time after synchronizing."""
    if torch.device(device).type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return wall
    return time.thread_time


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """``items`` starting at position ``round_index`` (mod its length): A B C, B C A, C A B."""
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])


def interleaved_timings(
    actions: dict[str, Callable[[], None]], rounds: int, warmup: int,
    clock: Callable[[], float],
) -> dict[str, list[float]]:
    """Seconds per call of each action, one timing per round, in a rotated order each round;
    the first ``warmup`` rounds are run but not kept."""
    names = list(actions)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        for name in rotated(names, round_index):
            start = clock()
            actions[name]()
            elapsed = clock() - start
            if round_index >= warmup:
                timings[name].append(elapsed)
    return timings


def _repeat(step: Callable[[int], None], times: int, counter: list[int]) -> Callable[[], None]:
    def action() -> None:
        for _ in range(times):
            step(counter[0])
            counter[0] += 1
    return action


def _models(config: OverheadConfig, model: str, data, seed: int) -> dict[str, nn.Module]:
    """The variants of one model, with the same initial weights: no BN, our BN, and torch's BN
    (ours converted, so its weights are those of ours)."""
    if model == "mlp":
        def build(norm):
            return mlp_builder(config, data, norm)()
    else:
        def build(norm):
            return cnn_builder(data, config.widths, norm)()
    seed_everything(seed)
    none = build("none")
    seed_everything(seed)
    ours = build("batch")
    theirs = convert(copy.deepcopy(ours), to="torch")
    return {"none": none, "ours": ours, "torch": theirs, "none again": copy.deepcopy(none)}


def time_model(config: OverheadConfig, model: str, data, device: str, seed: int) -> dict:
    """Per-call seconds of a training step and of an inference batch, per variant and round."""
    images = model == "cnn"
    clock = clock_for(device)
    models = {name: network.to(device) for name, network in _models(config, model, data,
                                                                      seed).items()}
    inputs = data.train.inputs(images).to(device)
    labels = data.train.labels.to(device)
    needed = (config.warmup_rounds + config.rounds) * config.steps_per_timing
    order = batch_indices(len(labels), config.batch_size, torch.Generator().manual_seed(seed))
    batches = [next(order) for _ in range(min(needed, 64))]

    def training_step(network: nn.Module) -> Callable[[int], None]:
        optimizer = torch.optim.SGD(network.parameters(), lr=config.learning_rate,
                                    momentum=MOMENTUM)
        network.train()

        def step(index: int) -> None:
            batch = batches[index % len(batches)]
            loss = nn.functional.cross_entropy(network(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    training = interleaved_timings(
        {name: _repeat(training_step(models[name]), config.steps_per_timing, [0])
         for name in TRAINING_VARIANTS},
        config.rounds, config.warmup_rounds, clock,
    )
    for network in models.values():
        network.eval()
    models["folded"] = fold(models["ours"])
    test_batch = data.test.inputs(images)[: config.inference_batch].to(device)

    def inference_batch(network: nn.Module) -> Callable[[int], None]:
        def infer(index: int) -> None:
            with torch.no_grad():
                network(test_batch)
        return infer

    inference = interleaved_timings(
        {name: _repeat(inference_batch(models[name]), config.batches_per_timing, [0])
         for name in INFERENCE_VARIANTS},
        config.rounds, config.warmup_rounds, clock,
    )

    def microseconds(timings: dict[str, list[float]], per_call: int) -> dict[str, list[float]]:
        return {name: [round(1e6 * value / per_call, 2) for value in values]
                for name, values in timings.items()}

    return {
        "training": microseconds(training, config.steps_per_timing),
        "inference": microseconds(inference, config.batches_per_timing),
    }


def run(config: OverheadConfig, params: dict, data, device: str) -> dict:
    return {
        "data": data.name,
        "device": device,
        "threads": torch.get_num_threads(),
        "clock": "thread CPU time" if torch.device(device).type != "cuda" else "wall time",
        **{model: time_model(config, model, data, device, params["seed"]) for model in MODELS},
    }


# ---- Ratios ----------------------------------------------------------------------------------


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median over rounds of the ratio within each round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def per_seed_ratios(runs: list[dict], model: str, phase: str, variant: str,
                    reference: str = "none") -> list[float]:
    """Each run's median ratio of ``variant`` to ``reference``, in seed order."""
    ordered = sorted(runs, key=lambda run: run["params"]["seed"])
    return [median_ratio(run["result"][model][phase][variant],
                         run["result"][model][phase][reference]) for run in ordered]


def _ratio_text(ratios: Sequence[float]) -> str:
    interval = ratio_interval(ratios)
    if math.isnan(interval.low):
        return f"{interval.mean:.2f}x"
    return f"{interval.mean:.2f}x [{interval.low:.2f}, {interval.high:.2f}]"


def noise_factor(control: Sequence[float]) -> float:
    """How far from 1 the A/A control's 95% interval reaches, as a factor (at least 1): two
    timings of identical models differ by up to this much here. 1 when there is no interval."""
    if len(control) < 2:
        return 1.0
    interval = ratio_interval(control)
    return max(1.0, interval.high, 1.0 / interval.low)


def findings(config: OverheadConfig, runs: list[dict]) -> list[Finding]:
    if not runs:
        return []
    data = data_of(runs)
    found = []
    questions = (
        ("training", "ours", "training", "above",
         "time of a training step with our BN over without BN"),
        ("inference", "ours", "test", "above",
         "time of an inference batch with our BN (eval mode, not folded) over without BN"),
        ("inference", "folded", "test", "below",
         "time of an inference batch with our BN folded into the layers before it over "
         "without BN (folding removes the overhead: below the margin)"),
    )
    for model in MODELS:
        for phase, variant, split, supports, what in questions:
            factor = noise_factor(per_seed_ratios(runs, model, phase, "none again"))
            why = (
                f"a ratio of {MARGIN:.2f} is a {MARGIN - 1:.0%} longer {phase} call; the 95% "
                "interval across runs is widened by the A/A control (the model without BN "
                "timed twice in each round), whose interval reaches a factor of "
                f"{factor:.2f} from 1 here: the interval shown is the one across runs divided "
                "and multiplied by that factor, so neither the runs' spread nor a bias between "
                "two timings of one model can make the verdict"
            )
            rule = Rule(threshold=MARGIN, supports=supports, scale="log", unit="x", why=why)
            per_seed = per_seed_ratios(runs, model, phase, variant)
            finding = judge("C13", "overhead", f"{model.upper()}: {what}", per_seed, rule,
                            data=data, split=split)
            if not math.isnan(finding.low):
                widened = Interval(finding.effect, finding.low / factor, finding.high * factor,
                                   finding.seeds)
                finding = replace(finding, low=widened.low, high=widened.high,
                                  verdict=rule.judge(widened, per_seed))
            found.append(finding)
    return found


# ---- Tables and figure ---------------------------------------------------------------------


def analyze(config: OverheadConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = len(seeds_of(runs))
    panels = []
    for phase, variants in (("training", TRAINING_VARIANTS), ("inference", INFERENCE_VARIANTS)):
        rows, series = [], []
        shown = [variant for variant in variants if variant != "none"]
        for model in MODELS:
            medians = {
                variant: statistics.median(
                    statistics.median(run["result"][model][phase][variant]) for run in runs)
                for variant in variants
            }
            ratios = {variant: per_seed_ratios(runs, model, phase, variant)
                      for variant in shown}
            ours_over_torch = per_seed_ratios(runs, model, phase, "ours", "torch")
            rows.append([model.upper(), *(f"{medians[v]:.0f}" for v in variants),
                         *(_ratio_text(ratios[v]) for v in shown),
                         _ratio_text(ours_over_torch)])
            means, lows, highs = [], [], []
            for variant in shown:
                interval = ratio_interval(ratios[variant])
                means.append(interval.mean)
                lows.append(interval.mean if math.isnan(interval.low) else interval.low)
                highs.append(interval.mean if math.isnan(interval.high) else interval.high)
            series.append(Series(model.upper(), list(range(len(shown))), means, lows, highs,
                                 style="o" if model == "mlp" else "s"))
        series.append(Series(f"margin {MARGIN:.2f}x", [-0.3, len(shown) - 0.7],
                             [MARGIN, MARGIN], style="--"))
        per_call = "step" if phase == "training" else "batch"
        analysis.tables.append(Table(
            f"{phase.capitalize()}: median time per {per_call} (microseconds, median over "
            "runs of each run's median over rounds) and ratios to no BN (geometric mean over "
            "runs [95% CI across runs] of each run's median within-round ratio)",
            ["model", *(f"{VARIANT_NAMES[v]} (us)" for v in variants),
             *(f"{VARIANT_NAMES[v]} / no BN" for v in shown), "our BN / torch's BN"],
            rows,
        ))
        panels.append(Panel(
            f"{phase.capitalize()}: time per {per_call} relative to no BN", "variant",
            "ratio to no BN", series, xticklabels=[VARIANT_NAMES[v].replace(", ", ",\n")
                                                   .replace(" (", "\n(") for v in shown]))
    comparisons = []
    for phase in ("training", "inference"):
        for model in MODELS:
            ratio = ratio_interval(per_seed_ratios(runs, model, phase, "ours", "torch")).mean
            comparisons.append(f"{phase} {model.upper()} {ratio:.2f}x")
    analysis.notes.append(
        "Our BN's time over torch's (geometric mean over runs; above 1 means ours is slower): "
        + ", ".join(comparisons) + ". Where torch's BN costs less than ours, the overhead of BN "
        "itself is nearer to torch's column than to ours."
    )
    clocks = sorted({run["result"].get("clock", "?") for run in runs})
    analysis.notes.append(
        f"Clock: {', '.join(clocks)}; {config.rounds} kept rounds per run after "
        f"{config.warmup_rounds} warm-up rounds, {config.steps_per_timing} training steps or "
        f"{config.batches_per_timing} inference batches per timing. The lab runs two worker "
        "processes at once on a shared machine, so the timings share it with other work; the "
        "interleaving, the within-round ratios and the medians are there for that."
    )
    analysis.figures.append(Figure(
        "overhead",
        panels,
        caption=(
            "Time per training step (left) and per inference batch (right) of each variant, as a "
            "ratio to the same model without BN (1 = no overhead; the dashed line is the "
            f"{MARGIN:.2f}x margin); markers at the geometric mean over {seeds} "
            f"run{'s' if seeds != 1 else ''} of each run's median within-round ratio, error bars "
            "the 95% interval across runs"
            + ("." if seeds >= 2 else " (one run, so no interval).")
        ),
    ))
    return analysis


def setup(config: OverheadConfig) -> str:
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, and a "
        f"CNN (1-D convolutions of widths {', '.join(map(str, config.widths))}), each without "
        "BN, with our BatchNorm1d and with torch.nn.BatchNorm1d (2d for images; torch's made "
        "from ours by batchnorm.convert, so the weights are the same), the norm before each "
        "activation. Training step: "
        f"forward, cross-entropy, backward and an SGD step (momentum {MOMENTUM}) on a batch of "
        f"{config.batch_size}; inference: an eval-mode forward of {config.inference_batch} test "
        "examples without gradients, also with our BN folded into the layers before it "
        f"(batchnorm.fold). {config.rounds} interleaved rounds per run (order rotated each "
        f"round) after {config.warmup_rounds} warm-up rounds; thread CPU time, one torch "
        "thread. The lab runs two worker processes at once on a shared machine, so these "
        "timings share it with other work: many short interleaved rounds and medians of "
        "within-round ratios keep that out of the ratios, and an A/A control (no BN timed "
        "twice) shows the noise left."
    )


def cost(config: OverheadConfig, params: dict) -> float:
    # A round of both models takes about as long as 50 training steps of a small MLP with BN.
    return (config.rounds + config.warmup_rounds) * 50


EXPERIMENT = Experiment(
    name="overhead",
    claims=("C13",),
    question="How much time does BN add to a training step and to inference, and does folding "
             "it into the layers remove that at inference?",
    config_type=OverheadConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "The data only shapes the inputs (40-point signals); MNIST-1D is the lab's default, and "
        "its 1-D signals give the CNN BatchNorm1d over positions."
    ),
    published="CLAIMS.md lists no published timing for this claim.",
    cost=cost,
)
