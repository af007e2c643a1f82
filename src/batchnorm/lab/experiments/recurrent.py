"""C10, recurrent networks: an LSTM without a norm, with per-time-step batch norm (our BN-LSTM,
Cooijmans et al.'s design) and with LayerNorm, on signals read a few values per time step.

The three LSTMs are one model with three normalizations (``sequence_models``); each trains at its
own learning rate, chosen on the validation part. Every run records its validation accuracy over
training (and the steps it took to reach a target), then is scored once on the test part at the
trained length and on the same test signals stretched to longer sequences (resampled, so they
carry the same shapes over more time steps). Beyond the trained number of steps the BN-LSTM has
no statistics of its own: it reuses those of the last trained step, while LayerNorm, whose
statistics come from each example, needs nothing.

Two findings, each stated so that "supported" means BN is the awkward one:

* at the trained length, LayerNorm's test accuracy minus batch norm's: supported above the test
  set's noise; below it the BN-LSTM is not worse by more than that margin (non-inferiority);
* on longer sequences, the BN-LSTM's loss of test accuracy from the trained length to the
  longest minus the LN-LSTM's loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import numpy as np

from batchnorm.lab.experiments.base import (
    Analysis,
    Baseline,
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
    one_per,
    percent,
    rate_tuning,
    seeds_of,
    test_outcomes,
    test_size,
)
from batchnorm.lab.experiments.convergence import steps_to_target
from batchnorm.lab.experiments.sequence_models import SequenceClassifier, stretch
from batchnorm.lab.stats import accuracy_effect, decode_correct, encode_correct
from batchnorm.lab.training import MOMENTUM, correct_predictions
from batchnorm.lab.verdict import Finding, accuracy_rule, judge_accuracy

NORM_NAMES = {"none": "LSTM (no norm)", "batch": "BN-LSTM", "layer": "LN-LSTM"}


@dataclass(frozen=True)
class RecurrentConfig:
    norms: tuple[str, ...] = ("none", "batch", "layer")
    values_per_step: int = 4  # MNIST-1D's 40 values as 10 time steps
    hidden_size: int = 32
    gamma_init: float = 0.1  # Cooijmans et al.'s; LayerNorm's gain starts there too
    tuning_rates: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    steps: int = 180
    eval_every: int = 20
    batch_size: int = 64
    # Reached by every model within the budget at a good rate, and far above chance (10%).
    target_accuracy: float = 0.35
    # The test signals stretched to these multiples of the trained length (1 = as trained).
    length_factors: tuple[float, ...] = (1.0, 1.5, 2.0)

    @classmethod
    def quick(cls) -> RecurrentConfig:
        return replace(cls(), norms=("batch", "layer"), tuning_rates=(0.1,), steps=40,
                       target_accuracy=0.2, length_factors=(1.0, 2.0))


def plan(config: RecurrentConfig, seeds) -> list[dict]:
    return [{"norm": norm, "seed": seed} for seed in seeds for norm in config.norms]


def evaluation_lengths(config: RecurrentConfig, trained_length: int) -> list[int]:
    """The test lengths (in values): each factor times the trained length, rounded to whole
    time steps."""
    steps = trained_length // config.values_per_step
    return [config.values_per_step * max(1, round(factor * steps))
            for factor in config.length_factors]


def run(config: RecurrentConfig, params: dict, data, device: str) -> dict:
    trained_length = data.input_size
    if trained_length % config.values_per_step:
        raise ValueError(f"{data.name}: signals of {trained_length} values do not split into "
                         f"steps of {config.values_per_step}")

    def build() -> SequenceClassifier:
        return SequenceClassifier(
            data.classes, params["norm"], config.hidden_size,
            max_steps=trained_length // config.values_per_step,
            values_per_step=config.values_per_step, gamma_init=config.gamma_init,
        )

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
    training = fitted.training
    record = {
        "steps": training.steps,
        "validation_accuracy": training.validation_accuracy,
        "nonfinite": training.nonfinite,
        "steps_to_target": steps_to_target(
            training.steps, training.validation_accuracy, config.target_accuracy
        ),
        **fitted.test_record(),
    }
    if data.test is None:  # a tuning run: no test part, so nothing is scored at other lengths
        return record
    lengths = evaluation_lengths(config, trained_length)
    test_signals, labels = data.test.vectors.to(device), data.test.labels.to(device)
    by_length = [
        fitted.test_correct if length == trained_length
        else correct_predictions(fitted.model, stretch(test_signals, length), labels)
        for length in lengths
    ]
    return {
        **record,
        "trained_length": trained_length,
        "lengths": lengths,
        "length_accuracy": [float(correct.float().mean()) for correct in by_length],
        "length_correct": [encode_correct(correct) for correct in by_length],
    }


# One tuning seed in both forms: a BN-LSTM training step costs about 10 ms of one core (30 batch
# norms a forward, and their backward), and a second seed would not fit the experiment's budget.
_TUNING = rate_tuning(
    ("norm",),
    groups=lambda config: [{"norm": norm} for norm in config.norms],
    rates=lambda config: config.tuning_rates,
    score=final_validation_accuracy,
    score_name="final validation accuracy",
)
TUNING = dataclasses.replace(_TUNING, plan=lambda config, quick: _TUNING.plan(config, True))


def longest_outcomes(result: dict) -> np.ndarray:
    """Which test examples a run got right at its longest test length."""
    return decode_correct(result["length_correct"][-1], result["test_size"])


def findings(config: RecurrentConfig, runs: list[dict]) -> list[Finding]:
    if not {"batch", "layer"} <= set(config.norms):
        return []
    results = one_per(runs, "norm", "seed")
    seeds = [seed for seed in seeds_of(runs)
             if ("batch", seed) in results and ("layer", seed) in results]
    if not seeds:
        return []
    examples, data = test_size(runs), data_of(runs)

    def trained(norm: str):
        return [test_outcomes(results[(norm, seed)]) for seed in seeds]

    def longest(norm: str):
        return [longest_outcomes(results[(norm, seed)]) for seed in seeds]

    found = [
        judge_accuracy(
            "C10",
            "recurrent",
            "test accuracy of the LN-LSTM minus the BN-LSTM at the trained length, in "
            "percentage points (below the threshold: the BN-LSTM is not worse by more than the "
            "test set's noise)",
            accuracy_effect([(+1.0, trained("layer")), (-1.0, trained("batch"))]),
            accuracy_rule(examples, 2),
            data=data,
        )
    ]
    result = results[("batch", seeds[0])]
    trained_length, longest_length = result["trained_length"], result["lengths"][-1]
    if longest_length > trained_length:
        steps = trained_length // config.values_per_step
        found.append(
            judge_accuracy(
                "C10",
                "recurrent",
                f"the BN-LSTM's loss of test accuracy from the trained {steps} time steps to "
                f"{longest_length // config.values_per_step} (signals stretched to "
                f"{longest_length} values; beyond step {steps} it reuses its last step's "
                "statistics) minus the LN-LSTM's loss, in percentage points (above the "
                "threshold: batch norm copes worse with the longer sequences)",
                accuracy_effect([
                    (+1.0, trained("batch")),
                    (-1.0, longest("batch")),
                    (-1.0, trained("layer")),
                    (+1.0, longest("layer")),
                ]),
                accuracy_rule(examples, 4),
                data=data,
            )
        )
    return found


def analyze(config: RecurrentConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = seeds_of(runs)
    grouped = by_params(runs, "norm")
    curves, by_length, rows = [], [], []
    lengths: list[int] = []
    for norm in config.norms:
        group = [run["result"] for run in grouped.get((norm,), [])]
        if not group:
            continue
        name = NORM_NAMES.get(norm, norm)
        rate = grouped[(norm,)][0]["params"]["learning_rate"]
        reached = [result["steps_to_target"] for result in group]
        done = [value for value in reached if value is not None]
        lengths = group[0]["lengths"]
        mean, low, high = interval_band([result["validation_accuracy"] for result in group])
        curves.append(Series(f"{name} (lr {rate:g})", group[0]["steps"],
                             [100 * v for v in mean], [100 * v for v in low],
                             [100 * v for v in high]))
        steps_axis = [length // config.values_per_step for length in lengths]
        mean, low, high = interval_band([result["length_accuracy"] for result in group])
        by_length.append(Series(name, steps_axis, [100 * v for v in mean],
                                [100 * v for v in low], [100 * v for v in high], style="o-"))
        rows.append([name, f"{rate:g}", f"{len(done)}/{len(group)}",
                     f"{sum(done) / len(done):.0f}" if done else "-", *map(percent, mean)])
        if norm == "none":
            tests = [result["test_accuracy"] for result in group]
            analysis.baselines.append(Baseline(
                group[0]["data"], "GRU",
                f"our LSTM without a norm (a recurrent net, as the GRU), {config.steps} steps",
                100 * sum(tests) / len(tests), len(tests)))
    if not rows:
        return analysis
    trained_steps = lengths[0] // config.values_per_step if lengths else 0
    analysis.tables.append(
        Table(
            f"Steps to {percent(config.target_accuracy)} validation accuracy, and test accuracy "
            "by sequence length (the test signals stretched; the first column is the trained "
            "length), mean over seeds",
            ["model", "learning rate (tuned)", "seeds reaching",
             "mean steps (those reaching)",
             *(f"{length // config.values_per_step} steps" for length in lengths)],
            rows,
        )
    )
    target = Series("target", [0, config.steps], [100 * config.target_accuracy] * 2,
                    style="--")
    analysis.figures.append(
        Figure(
            "recurrent",
            [Panel("Validation accuracy over training", "training step",
                   "validation accuracy (%)", [*curves, target]),
             Panel("Test accuracy vs sequence length", "time steps per sequence",
                   "test accuracy (%)", by_length)],
            caption=band_caption(
                "Left: validation accuracy (%) of each LSTM against training step, each at its "
                "tuned learning rate; the dashed line is the target. Right: test accuracy (%) "
                f"against the number of time steps, the test signals stretched from the trained "
                f"{trained_steps} steps; the BN-LSTM reuses its last step's statistics beyond "
                f"step {trained_steps}",
                len(seeds),
            ),
        )
    )
    return analysis


def setup(config: RecurrentConfig) -> str:
    rates = ", ".join(f"{rate:g}" for rate in config.tuning_rates)
    factors = ", ".join(f"{factor:g}x" for factor in config.length_factors)
    return (
        f"One-layer LSTM of {config.hidden_size} units reading {config.values_per_step} "
        "consecutive values of the signal per time step, a linear classifier on the last hidden "
        f"state; norm {' vs '.join(NORM_NAMES.get(n, n) for n in config.norms)}. The BN-LSTM is "
        "the library's (batch norm with statistics per time step on the input and recurrent "
        "projections and the cell state, gamma starting at "
        f"{config.gamma_init:g}); the LN-LSTM normalizes the recurrent projection and the cell "
        f"state per example, gain starting at {config.gamma_init:g}, and leaves the projection "
        "of the few input values as it is (LayerNorm over one example's features would keep only "
        "their direction); the plain LSTM has the same cell and initialization without a norm. "
        f"SGD (momentum {MOMENTUM}), batch {config.batch_size}, {config.steps} steps; validation "
        f"accuracy every {config.eval_every} steps. Learning rate per model chosen from {rates} "
        "on the validation part (final validation accuracy, one tuning seed). Test signals "
        f"stretched by linear interpolation to {factors} the trained length."
    )


def cost(config: RecurrentConfig, params: dict) -> float:
    # Measured on one core, in MLP steps (about 1.2 ms): the plain LSTM over 10 time steps
    # costs about 2.5, the LN-LSTM 4 and the BN-LSTM, with its 30 batch norms a forward, 8.
    per_step = {"batch": 8.0, "layer": 4.0}.get(params["norm"], 2.5)
    return per_step * config.steps


EXPERIMENT = Experiment(
    name="recurrent",
    claims=("C10",),
    question="Is BN awkward in an LSTM next to LayerNorm (accuracy, and longer sequences)?",
    config_type=RecurrentConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "MNIST-1D's signals are sequences by nature, and a recurrent net has room to learn on "
        "them (the data set's authors quote 91% for a GRU trained long). The 40 values are "
        "read as 10 time steps of 4 values, not 40 of one: with one value per step, SGD left "
        "the plain LSTM at chance for 300 steps, and our BN-LSTM costs about 29 ms of one core "
        "a step at 40 time steps (120 batch norms a forward), which does not fit the budget. "
        "Ten steps still give batch norm ten sets of statistics, and a longer test sequence "
        "steps beyond them."
    ),
    published=(
        "Cooijmans et al. 2016: a BN-LSTM with statistics per time step (the last step's reused "
        "beyond the trained length), batch norm on the input and recurrent projections, gamma "
        "starting at 0.1, reached 99.0% on sequential MNIST and 95.4% on permuted MNIST (784 "
        "time steps of one pixel). Ours is a different and much smaller task: 10 time steps of "
        "MNIST-1D, a few hundred training steps, so the accuracies are not comparable, only "
        "the comparisons between our three LSTMs."
    ),
    tuning=TUNING,
    cost=cost,
)
