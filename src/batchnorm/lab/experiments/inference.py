"""C12, inference: how a BN network's test accuracy depends on the statistics it normalizes with.

One trained network is scored four ways on the test part:

* ``ema``: eval mode with the running averages training kept (the usual inference), at several
  momenta;
* ``precise``: eval mode with exact population statistics of the training part, recomputed with
  the final weights (``batchnorm.precise_bn``);
* ``batch``: training mode on test batches of the training batch size, i.e. each test example
  normalized with the statistics of the batch it happens to be in (nothing is updated: a copy
  is scored);
* ``folded``: ``batchnorm.fold`` of the eval-mode network, which should change nothing beyond
  float rounding.

The momentum never changes training (a training-mode batch norm normalizes with the batch's own
statistics; the running averages are only read in eval mode), so one training run serves every
momentum: :class:`RunningStatistics` keeps, beside the layers' own, the running averages each
layer would have kept at each momentum, with the same update the layers use. Comparing momenta
on one network is also paired: the only difference between them is the running averages.

The learning rate is chosen in a tuning stage on the validation part of the tuning seeds, at
a reference setting fixed before any run: the smallest batch, where the findings are read, and
the running averages of PyTorch's default momentum 0.1, i.e. the usual inference a practitioner
would tune on. The rate so chosen is then held for every batch size (each trains for the same
number of steps), so that along the sweep only the batch changes; the momenta need no rate of
their own, as they do not change training.
Tuning on eval-mode accuracy is the practice this claim is about. If it leans anywhere, it leans
towards rates at which the running averages serve well: a cost of the running averages found
below is found despite the choice, not because of it.

The findings, fixed before any run: at the smallest batch, where a batch's statistics are
noisiest, (1) the train/eval difference, eval mode with the running averages at PyTorch's
default momentum (what inference normally uses) minus training mode; (2) the cost of the moving
average, exact population statistics minus those running averages; and (3) how the gap depends
on the batch: difference (1) at the smallest batch minus the same at the largest (seed by seed).
(1) and (2) are differences of two test accuracies on the same examples, (3) of four, each
judged against ``accuracy_rule``'s threshold (twice the largest standard error the test set
alone gives such a combination). The other momenta and folding are shown in tables, the figure
and a note on folding's tolerance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from batchnorm import fold, precise_bn
from batchnorm.core.moments import batch_moments, unbiased
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
    held_rate,
    interval_band,
    mlp_builder,
    rate_tuning,
    seeds_of,
    test_outcomes,
    test_size,
)
from batchnorm.lab.stats import accuracy_effect, encode_correct, mean_interval
from batchnorm.lab.training import MOMENTUM, correct_predictions
from batchnorm.lab.verdict import Finding, accuracy_rule, judge_accuracy

# What ``momentum=None`` (a cumulative average of every batch's statistics) is called in saved
# results and tables.
CUMULATIVE = "cumulative"


def momentum_key(momentum: float | None) -> str:
    """A momentum as the key of saved results: ``"0.1"``, or ``"cumulative"`` for None."""
    return CUMULATIVE if momentum is None else f"{momentum:g}"


# ---- Running averages at several momenta from one training run -------------------------------


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``model`` that keep running statistics (torch's and ours)."""
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats and module.running_mean is not None]


class RunningStatistics:
    """The running mean and variance each batch norm of ``model`` would keep at each momentum.

    A forward pre-hook on every batch norm reads its input in training mode and applies the
    modules' update (``batchnorm.core.running``: the new batch's mean and unbiased variance
    weighted by the momentum) for every momentum at once, starting from the layers' initial
    statistics. ``momentum=None`` is the cumulative average (weight 1/k for the k-th batch), as
    in the modules. Inputs seen in eval mode are ignored. Call :meth:`close` before copying the
    model or recomputing its statistics, so that nothing else is recorded.
    """

    def __init__(self, model: nn.Module, momenta: Iterable[float | None]) -> None:
        self.layers = batch_norms(model)
        self.momenta = list(momenta)
        self._fixed = torch.tensor([0.0 if m is None else float(m) for m in self.momenta])
        self._cumulative = torch.tensor([m is None for m in self.momenta])
        # Per layer: (momenta, 2, channels), the running mean and variance at each momentum.
        self._running = {
            layer: torch.stack([layer.running_mean, layer.running_var]).detach()
            .unsqueeze(0).repeat(len(self.momenta), 1, 1)
            for layer in self.layers
        }
        self._batches = {layer: 0 for layer in self.layers}
        self._handles = [layer.register_forward_pre_hook(self._record) for layer in self.layers]

    @torch.no_grad()
    def _record(self, layer: nn.Module, args: tuple) -> None:
        if not layer.training:
            return
        x = args[0].detach()
        mean, variance = batch_moments(x)
        batch = torch.stack([mean, unbiased(variance, x.numel() // x.shape[1])])
        self._batches[layer] += 1
        weights = torch.where(self._cumulative, 1.0 / self._batches[layer], self._fixed)
        running = self._running[layer]
        self._running[layer] = running.lerp(batch.to(running.dtype), weights.reshape(-1, 1, 1))

    def statistics(self, momentum: float | None) -> dict[nn.Module, tuple[torch.Tensor, ...]]:
        """Each layer's running (mean, variance) at ``momentum``."""
        index = self.momenta.index(momentum)
        return {layer: (running[index, 0], running[index, 1])
                for layer, running in self._running.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def use(self, momentum: float | None):
        """Inside the block the layers hold the running statistics of ``momentum``; their own
        come back afterwards."""
        saved = {layer: (layer.running_mean.clone(), layer.running_var.clone())
                 for layer in self.layers}
        try:
            with torch.no_grad():
                for layer, (mean, var) in self.statistics(momentum).items():
                    layer.running_mean.copy_(mean)
                    layer.running_var.copy_(var)
            yield
        finally:
            with torch.no_grad():
                for layer, (mean, var) in saved.items():
                    layer.running_mean.copy_(mean)
                    layer.running_var.copy_(var)

    def largest_difference_from_layers(self, momentum: float | None) -> float:
        """How far the statistics kept for ``momentum`` are from the layers' own (a check that
        the two updates agree, for the momentum the layers were built with)."""
        return max(
            max(float((mean - layer.running_mean).abs().max()),
                float((var - layer.running_var).abs().max()))
            for layer, (mean, var) in self.statistics(momentum).items()
        )


# ---- The ways of scoring one network ----------------------------------------------------------


def with_precise_statistics(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> nn.Module:
    """A copy of ``model`` whose batch norms hold the exact statistics of ``inputs`` (in
    batches of ``batch_size``, in order), computed with the final weights."""
    precise = copy.deepcopy(model)
    precise_bn(precise, inputs.split(batch_size), progress=False)
    return precise


@torch.no_grad()
def batch_statistics_correct(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int
) -> torch.Tensor:
    """Which examples ``model`` gets right in training mode, each normalized with the statistics
    of its test batch: the examples in a seeded random order, cut into batches of
    ``batch_size`` (a last batch of one example joins the one before, as a batch norm cannot
    normalize a single example). A copy is scored, so nothing of ``model`` changes."""
    scorer = copy.deepcopy(model).train()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    correct = torch.zeros(len(labels), dtype=torch.bool)
    for batch in batches:
        logits = scorer(inputs[batch])
        correct[batch] = (logits.argmax(dim=1) == labels[batch]) & torch.isfinite(logits).all(1)
    return correct


@torch.no_grad()
def fold_comparison(model: nn.Module, inputs: torch.Tensor) -> dict:
    """The folded network against the eval-mode one on ``inputs``: the largest absolute
    difference of their logits and how many predictions differ."""
    was_training = model.training
    model.eval()
    folded = fold(model)
    logits, folded_logits = model(inputs), folded(inputs)
    model.train(was_training)
    return {
        "max_logit_difference": float((logits - folded_logits).abs().max()),
        "largest_logit": float(logits.abs().max()),
        "changed_predictions": int((logits.argmax(1) != folded_logits.argmax(1)).sum()),
        "folded": folded,
    }


def score(correct: torch.Tensor) -> dict:
    """A test outcome as plain data."""
    return {"test_accuracy": float(correct.float().mean()), "test_correct": encode_correct(correct)}


# ---- The experiment -----------------------------------------------------------------------------

# PyTorch's default momentum: what "the usual inference" uses, what the findings judge, and the
# momentum the learning rate is tuned with.
DEFAULT_MOMENTUM = 0.1
# Folding changes nothing when the logits differ by at most this fraction of the largest logit:
# float32 rounds at about 1e-7 relative, and a forward pass of a few layers adds some such errors.
FOLD_TOLERANCE = 1e-5


@dataclass(frozen=True)
class InferenceConfig:
    momenta: tuple[float | None, ...] = (0.01, 0.1, 0.5, None)
    batch_sizes: tuple[int, ...] = (4, 64)
    # Candidate learning rates, tried at the reference batch (the smallest) on the tuning seeds;
    # the one chosen on the validation part trains every batch size.
    tuning_rates: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    steps: int = 2000  # the same for every batch size
    precise_batch: int = 400  # the training part in batches of this size, for exact statistics
    depth: int = 2
    width: int = 64
    activation: str = "relu"

    @classmethod
    def quick(cls) -> InferenceConfig:
        return replace(cls(), tuning_rates=(0.01,), steps=400)

    @property
    def reference_batch(self) -> int:
        """The batch the learning rate is tuned at: the smallest, where the findings are read."""
        return min(self.batch_sizes)


def plan(config: InferenceConfig, seeds) -> list[dict]:
    return [{"batch_size": size, "seed": seed} for seed in seeds for size in config.batch_sizes]


TUNING = replace(
    rate_tuning(
        ("batch_size",),
        groups=lambda config: [{"batch_size": config.reference_batch}],
        rates=lambda config: config.tuning_rates,
        score=final_validation_accuracy,
        score_name=(
            f"final validation accuracy in eval mode (running averages, momentum "
            f"{DEFAULT_MOMENTUM:g}) at the reference batch (the smallest, where the findings are "
            "read; every batch size trains at the rate chosen there)"
        ),
    ),
    apply=held_rate,
)


def run(config: InferenceConfig, params: dict, data, device: str) -> dict:
    size, seed = params["batch_size"], params["seed"]
    # A tuning run (its splits have no test part) is trained the same way and scored only by
    # its final validation accuracy in eval mode, with the layers' own running averages.
    tuning = data.test is None
    make_mlp = mlp_builder(config, data, "batch")
    trackers: list[RunningStatistics] = []

    def build() -> nn.Module:
        model = make_mlp()
        for layer in batch_norms(model):
            layer.momentum = DEFAULT_MOMENTUM  # the momentum the rate is tuned with
        if not tuning:
            trackers.append(RunningStatistics(model, config.momenta))
        return model

    fitted = fit(build, data, device, seed, images=False, steps=config.steps, batch_size=size,
                 learning_rate=params["learning_rate"], eval_every=config.steps)
    if tuning:
        return fitted.record()
    (tracker,) = trackers
    tracker.close()
    model = fitted.model
    inputs, labels = data.test.vectors.to(device), data.test.labels.to(device)
    ema = {}
    for momentum in config.momenta:
        with tracker.use(momentum):
            ema[momentum_key(momentum)] = score(correct_predictions(model, inputs, labels))
    precise = with_precise_statistics(model, data.train.vectors.to(device), config.precise_batch)
    folding = fold_comparison(model, inputs)
    folded = folding.pop("folded")
    own_momentum = batch_norms(model)[0].momentum
    # The record's own test figure is the eval-mode network with the layers' running averages,
    # i.e. ``ema`` at the default momentum.
    return fitted.record(
        ema=ema,
        precise=score(correct_predictions(precise, inputs, labels)),
        # The test examples' order differs by seed, so which examples share a batch does too.
        batch_statistics=score(batch_statistics_correct(model, inputs, labels, size, seed)),
        fold={**folding, **score(correct_predictions(folded, inputs, labels))},
        # The statistics kept for the layers' own momentum against the layers' (float rounding).
        tracking_error=(tracker.largest_difference_from_layers(own_momentum)
                        if own_momentum in config.momenta else math.nan),
    )


def _outcomes(results: list[dict], *path: str) -> list:
    """One test-outcome vector per result, from the score found under ``path``."""
    vectors = []
    for result in results:
        entry = result
        for key in path:
            entry = entry[key]
        vectors.append(test_outcomes({**entry, "test_size": result["test_size"]}))
    return vectors


def _by_size(runs: list[dict]) -> dict[int, list[dict]]:
    """Each batch size's results, in seed order."""
    ordered = sorted(runs, key=lambda run: run["params"]["seed"])
    groups: dict[int, list[dict]] = {}
    for run in ordered:
        groups.setdefault(run["params"]["batch_size"], []).append(run["result"])
    return groups


def findings(config: InferenceConfig, runs: list[dict]) -> list[Finding]:
    small = min(config.batch_sizes)
    groups = _by_size(runs)
    if DEFAULT_MOMENTUM not in config.momenta or small not in groups:
        return []
    results = groups[small]
    default = momentum_key(DEFAULT_MOMENTUM)
    examples = test_size(runs)
    data = data_of(runs)
    usual = _outcomes(results, "ema", default)
    train_mode = accuracy_effect([(+1.0, usual), (-1.0, _outcomes(results, "batch_statistics"))])
    estimate = accuracy_effect([(+1.0, _outcomes(results, "precise")), (-1.0, usual)])
    found = [
        judge_accuracy(
            "C12", "inference",
            f"batch {small}: test accuracy in eval mode (running averages, momentum "
            f"{DEFAULT_MOMENTUM:g}) minus in training mode (each test batch of {small} "
            "normalized with its own statistics), in percentage points",
            train_mode, accuracy_rule(examples, 2), data=data,
        ),
        judge_accuracy(
            "C12", "inference",
            f"batch {small}: test accuracy with exact population statistics minus with the "
            f"running averages (momentum {DEFAULT_MOMENTUM:g}), in percentage points (the cost "
            "of estimating the population statistics by a moving average)",
            estimate, accuracy_rule(examples, 2), data=data,
        ),
    ]
    large = max(config.batch_sizes)
    if large != small and large in groups:
        # the same seeds at both sizes: the four accuracies pair seed by seed
        big = groups[large]
        growth = accuracy_effect([
            (+1.0, usual), (-1.0, _outcomes(results, "batch_statistics")),
            (-1.0, _outcomes(big, "ema", default)), (+1.0, _outcomes(big, "batch_statistics")),
        ])
        found.append(judge_accuracy(
            "C12", "inference",
            f"the gap against the batch size: (eval mode minus training mode) at batch {small} "
            f"minus the same at batch {large}, in percentage points (above the threshold: the "
            "train/eval gap grows as the batch shrinks)",
            growth, accuracy_rule(examples, 4), data=data,
        ))
    return found


def fold_note(folds: list[dict]) -> str:
    """Whether folding changed anything beyond float rounding, by ``FOLD_TOLERANCE`` on the
    largest logit difference relative to the largest logit, over every run."""
    if not folds:
        return ""
    relative = max(fold["max_logit_difference"] / max(fold["largest_logit"], 1e-12)
                   for fold in folds)
    changed = sum(fold["changed_predictions"] for fold in folds)
    numbers = (f"the largest logit difference is {relative:.1g} of the largest logit and "
               f"{changed} prediction{'s' if changed != 1 else ''} changed over all runs")
    if relative <= FOLD_TOLERANCE:
        return (f"Folding changed nothing beyond float rounding: {numbers} (tolerance "
                f"{FOLD_TOLERANCE:g} of the largest logit, a few float32 roundings).")
    return (f"Folding changed more than float rounding: {numbers} (tolerance "
            f"{FOLD_TOLERANCE:g} of the largest logit).")


def _mean_and_interval(effect) -> str:
    interval = mean_interval(effect.per_seed, example_se=effect.example_se)
    if math.isnan(interval.low):
        return f"{interval.mean:+.1f}"
    return f"{interval.mean:+.1f} [{interval.low:+.1f}, {interval.high:+.1f}]"


def analyze(config: InferenceConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    groups = _by_size(runs)
    seeds = len(seeds_of(runs))
    keys = [momentum_key(momentum) for momentum in config.momenta]
    accuracy_rows, gap_rows, fold_rows, panels = [], [], [], []
    for size in config.batch_sizes:
        results = groups.get(size)
        if not results:
            continue

        def accuracies(*path: str, results=results) -> list[float]:
            values = []
            for result in results:
                entry = result
                for key in path:
                    entry = entry[key]
                values.append(100 * entry["test_accuracy"])
            return values

        def mean(values: Sequence[float]) -> str:
            return f"{sum(values) / len(values):.1f}%"

        accuracy_rows.append([
            str(size),
            *(mean(accuracies("ema", key)) for key in keys),
            mean(accuracies("precise")),
            mean(accuracies("batch_statistics")),
        ])
        precise = _outcomes(results, "precise")
        gap_rows.append([
            str(size),
            *(_mean_and_interval(accuracy_effect([(+1.0, precise),
                                                  (-1.0, _outcomes(results, "ema", key))]))
              for key in keys),
            _mean_and_interval(accuracy_effect([(+1.0, precise),
                                                (-1.0, _outcomes(results, "batch_statistics"))])),
        ])
        folds = [result["fold"] for result in results]
        # The folded network holds the layers' own running averages (the default momentum).
        difference = "n/a"
        if DEFAULT_MOMENTUM in config.momenta:
            own = _outcomes(results, "ema", momentum_key(DEFAULT_MOMENTUM))
            difference = _mean_and_interval(
                accuracy_effect([(+1.0, _outcomes(results, "fold")), (-1.0, own)]))
        fold_rows.append([
            str(size),
            f"{max(fold['max_logit_difference'] for fold in folds):.2g}",
            f"{max(fold['largest_logit'] for fold in folds):.3g}",
            str(sum(fold["changed_predictions"] for fold in folds)),
            difference,
        ])
        positions = list(range(len(keys)))
        series = []
        for label, values, style in (
            ("running averages", [accuracies("ema", key) for key in keys], "o-"),
            ("exact population statistics", [accuracies("precise")] * len(keys), "s--"),
            ("batch statistics (training mode)", [accuracies("batch_statistics")] * len(keys),
             "^-."),
        ):
            curves = [list(column) for column in zip(*values, strict=True)]
            means, lows, highs = interval_band(curves)
            series.append(Series(label, positions, means, lows, highs, style=style))
        rates = "/".join(f"{rate:g}" for rate in sorted({
            run["params"]["learning_rate"] for run in runs if run["params"]["batch_size"] == size}))
        panels.append(Panel(f"Batch {size} (learning rate {rates}, {config.steps} steps)",
                            "momentum of the running averages", "test accuracy (%)", series,
                            xticklabels=keys))
    momentum_headers = [f"running, momentum {key}" for key in keys]
    analysis.tables.append(Table(
        "Test accuracy by the statistics used at test time (mean over seeds)",
        ["batch", *momentum_headers, "exact population", "batch statistics"], accuracy_rows))
    analysis.tables.append(Table(
        "Exact population statistics minus each other choice: test accuracy, pp, mean [95% CI "
        "across seeds and test examples]",
        ["batch", *momentum_headers, "batch statistics"], gap_rows))
    analysis.tables.append(Table(
        "Folding batch norm into the linear layers (batchnorm.fold), against the unfolded "
        "network in eval mode, on the test part",
        ["batch", "largest |logit difference| (max over seeds)", "largest |logit|",
         "predictions changed (all seeds)",
         "test accuracy folded minus unfolded, pp, mean [95% CI]"],
        fold_rows))
    errors = [run["result"]["tracking_error"] for run in runs
              if not math.isnan(run["result"]["tracking_error"])]
    if errors:
        analysis.notes.append(
            "One training run serves every momentum: the running averages of each momentum are "
            "kept beside the layers' own with the same update. For the layers' own momentum the "
            f"two agree to {max(errors):.1g} (largest absolute difference over all runs), i.e. "
            "float rounding."
        )
    folding_note = fold_note([run["result"]["fold"] for run in runs])
    if folding_note:
        analysis.notes.append(folding_note)
    if any(run["result"]["nonfinite"] for run in runs):
        analysis.notes.append("Some runs diverged (non-finite loss); their scores are chance.")
    analysis.figures.append(Figure(
        "inference",
        panels,
        caption=band_caption(
            "Test accuracy (%) of one trained BN network scored three ways: eval mode with the "
            "running averages kept at each momentum (x axis; 'cumulative' is momentum=None), "
            "eval mode with exact population statistics of the training part, and training "
            "mode with the statistics of each test batch (the last two do not depend on the "
            "momentum and are drawn flat)",
            seeds,
        ),
    ))
    return analysis


def setup(config: InferenceConfig) -> str:
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    sizes = ", ".join(map(str, config.batch_sizes))
    momenta = ", ".join(momentum_key(momentum) for momentum in config.momenta)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, our "
        f"BN before each activation. SGD (momentum {MOMENTUM}), batches of {sizes}, "
        f"{config.steps} steps each. One learning rate for every batch size, chosen from {rates} "
        "on the validation part of the tuning seeds at the reference setting fixed beforehand: "
        f"batch {config.reference_batch} (the smallest, where the findings are read) and eval "
        f"mode with the running averages of momentum {DEFAULT_MOMENTUM:g} (the usual inference, "
        "what a practitioner tunes on); held fixed, so only the batch changes along the sweep. "
        "One training run per batch size and seed; the running averages of every momentum "
        f"({momenta}; 'cumulative' is momentum=None) are kept beside the layers' own, since the "
        "momentum does not change training. The network is then scored on the test part with "
        "each momentum's running averages, with exact statistics of the training part "
        f"(batchnorm.precise_bn, batches of {config.precise_batch}), in training mode on test "
        "batches of the training batch size (shuffled by seed; a copy, nothing updated), and "
        "folded (batchnorm.fold)."
    )


def cost(config: InferenceConfig, params: dict) -> float:
    return config.steps * 1.4


EXPERIMENT = Experiment(
    name="inference",
    claims=("C12",),
    question="How differently does a BN network behave in eval mode (running averages, exact "
             "population statistics) and in training mode, and what does folding change?",
    config_type=InferenceConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "A small MLP on MNIST-1D trains in seconds and stays well below its ceiling, so a "
        "difference between ways of normalizing at test time can show; on the digits most "
        "ways would score near the ceiling."
    ),
    published=(
        "CLAIMS.md lists no published accuracy for this claim. Folding (as stated there): with "
        "population statistics BN is one per-channel affine map, so it can be merged into the "
        "preceding layer, W' = W * gamma / sqrt(var + eps) per output channel and "
        "b' = (b - mean) * gamma / sqrt(var + eps) + beta."
    ),
    tuning=TUNING,
    cost=cost,
)
