"""C14, hyperparameters: how much BN's momentum and epsilon move the accuracy, and whether choosing
them on the validation part beats the defaults (momentum 0.1, eps 1e-5).

Epsilon changes training (it enters every normalization), so each value is its own training
run. The momentum does not (training normalizes with each batch's own statistics; the running
averages are read only in eval mode), so one run per epsilon keeps the running averages of every
momentum beside the layers' own (``inference.RunningStatistics``) and is scored with each:
the momentum sweep is paired, one network per seed.

The learning rate is chosen in a tuning stage on the validation part of the tuning seeds, at a
reference setting fixed before any run: momentum 0.1 and eps 1e-5, torch's defaults, i.e. the
setting a practitioner starts from and the one the gain from tuning is measured against (the
momentum does not change training; it decides which running averages the validation score is
read with). The rate so chosen is held for every momentum and eps, so that along each sweep
only the swept value changes. (Tuning the rate at each value instead would make "sensitivity to
eps" partly a sensitivity of the best rate, which is a different question.)

Two questions per hyperparameter, both decided on the validation part and scored on the test
part once:

* sensitivity: within a named range of values people use, the test accuracy at the value the
  validation part rates best minus at the value it rates worst (a flat region: within the noise;
  a narrow optimum: above it);
* the gain from tuning: the test accuracy at the value the validation part rates best, over the
  whole sweep, minus at the default.

Each measure is a difference of two test accuracies on the same examples, judged against
``accuracy_rule``'s threshold (twice the largest standard error the test set alone gives such a
difference); the rules were fixed before any run.

Choosing best and worst on the validation part and scoring them on the test part keeps the
measure honest: picking both on the test accuracies would report the test set's noise as a
spread even where the curve is flat.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    held_rate,
    interval_band,
    mlp_builder,
    one_per,
    percent,
    rate_tuning,
    seeds_of,
    test_outcomes,
    test_size,
)
from batchnorm.lab.experiments.inference import (
    RunningStatistics,
    batch_norms,
    momentum_key,
    score,
)
from batchnorm.lab.stats import accuracy_effect
from batchnorm.lab.training import MOMENTUM, accuracy, correct_predictions
from batchnorm.lab.verdict import Finding, accuracy_rule, judge_accuracy

DEFAULT_MOMENTUM = 0.1
DEFAULT_EPS = 1e-5


@dataclass(frozen=True)
class HyperparameterConfig:
    momenta: tuple[float | None, ...] = (0.01, 0.03, 0.1, 0.3, 0.9, None)
    epsilons: tuple[float, ...] = (1e-8, 1e-5, 1e-3, 1e-1)
    # The values people use (library defaults and common choices): the sensitivity is judged
    # within these; the sweep's outer values show what happens beyond them.
    usual_momenta: tuple[float | None, ...] = (0.01, 0.03, 0.1, 0.3)
    usual_epsilons: tuple[float, ...] = (1e-8, 1e-5, 1e-3)
    batch_size: int = 32
    # Candidate learning rates, tried at the defaults (momentum 0.1, eps 1e-5) on the tuning
    # seeds; the one chosen on the validation part trains every run.
    tuning_rates: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    steps: int = 800
    depth: int = 2
    width: int = 64
    activation: str = "relu"

    @classmethod
    def quick(cls) -> HyperparameterConfig:
        return replace(cls(), epsilons=(1e-8, 1e-5, 1e-1), usual_epsilons=(1e-8, 1e-5),
                       tuning_rates=(0.1,), steps=250)


def plan(config: HyperparameterConfig, seeds) -> list[dict]:
    return [{"eps": eps, "seed": seed} for seed in seeds for eps in config.epsilons]


TUNING = replace(
    rate_tuning(
        ("eps",),
        groups=lambda config: [{"eps": DEFAULT_EPS}],
        rates=lambda config: config.tuning_rates,
        score=final_validation_accuracy,
        score_name=(
            f"final validation accuracy at torch's defaults (momentum {DEFAULT_MOMENTUM:g}, eps "
            f"{DEFAULT_EPS:g}; every momentum and eps trains at the rate chosen there)"
        ),
    ),
    apply=held_rate,
)


def run(config: HyperparameterConfig, params: dict, data, device: str) -> dict:
    # A tuning run (its splits have no test part) is trained the same way and scored only by
    # its final validation accuracy in eval mode, with the layers' own running averages.
    tuning = data.test is None
    make_mlp = mlp_builder(config, data, "batch")
    trackers: list[RunningStatistics] = []

    def build() -> nn.Module:
        model = make_mlp()
        for layer in batch_norms(model):
            layer.eps = params["eps"]
            layer.momentum = DEFAULT_MOMENTUM  # the averages the tuning score is read with
        if not tuning:
            trackers.append(RunningStatistics(model, config.momenta))
        return model

    fitted = fit(build, data, device, params["seed"], images=False, steps=config.steps,
                 batch_size=config.batch_size, learning_rate=params["learning_rate"],
                 eval_every=config.steps)
    if tuning:
        return fitted.record()
    (tracker,) = trackers
    tracker.close()
    validation = (data.validation.vectors.to(device), data.validation.labels.to(device))
    test = (data.test.vectors.to(device), data.test.labels.to(device))
    by_momentum = {}
    for momentum in config.momenta:
        with tracker.use(momentum):
            by_momentum[momentum_key(momentum)] = {
                "validation_accuracy": accuracy(fitted.model, *validation),
                **score(correct_predictions(fitted.model, *test)),
            }
    # The record's own test figure is the network with the layers' running averages, i.e.
    # ``momenta`` at the default momentum.
    return fitted.record(momenta=by_momentum)


# ---- Findings ----------------------------------------------------------------------------------


def _chosen(candidates: list, validation: dict) -> tuple:
    """The candidates the validation part rates best and worst (ties: the first listed)."""
    best = max(candidates, key=lambda value: validation[value])
    worst = min(candidates, key=lambda value: validation[value])
    return best, worst


def _sweeps(config: HyperparameterConfig, runs: list[dict]):
    """Per hyperparameter: its values, its usual values, its default, and per seed a map from
    value to that run's result at it ({"validation_accuracy", "test_correct", ...})."""
    results = one_per(runs, "eps", "seed")
    seeds = seeds_of(runs)
    default_key = momentum_key(DEFAULT_MOMENTUM)
    sweeps = {}
    if DEFAULT_EPS in config.epsilons and DEFAULT_MOMENTUM in config.momenta:
        keys = [momentum_key(m) for m in config.momenta]
        sweeps["momentum"] = (
            keys, [momentum_key(m) for m in config.usual_momenta], default_key,
            [{key: {**results[(DEFAULT_EPS, seed)]["momenta"][key],
                    "test_size": results[(DEFAULT_EPS, seed)]["test_size"]} for key in keys}
             for seed in seeds],
        )
        sweeps["eps"] = (
            list(config.epsilons), list(config.usual_epsilons), DEFAULT_EPS,
            [{eps: {**results[(eps, seed)]["momenta"][default_key],
                    "test_size": results[(eps, seed)]["test_size"]} for eps in config.epsilons}
             for seed in seeds],
        )
    return sweeps


def _name(value) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def findings(config: HyperparameterConfig, runs: list[dict]) -> list[Finding]:
    examples = test_size(runs)
    data = data_of(runs)
    found = []
    for name, (values, usual, default, per_seed) in _sweeps(config, runs).items():
        usual_range = ", ".join(map(_name, usual))
        spread_best, spread_worst, tuned, at_default = [], [], [], []
        for seed_results in per_seed:
            validation = {value: seed_results[value]["validation_accuracy"] for value in values}
            best, worst = _chosen(usual, validation)
            spread_best.append(test_outcomes(seed_results[best]))
            spread_worst.append(test_outcomes(seed_results[worst]))
            tuned.append(test_outcomes(seed_results[_chosen(values, validation)[0]]))
            at_default.append(test_outcomes(seed_results[default]))
        found.append(judge_accuracy(
            "C14", "hyperparameters",
            f"{name} within its usual range ({usual_range}): test accuracy at the value the "
            "validation part rates best minus at the value it rates worst, in percentage points "
            "(sensitivity: above the threshold means the value matters within that range)",
            accuracy_effect([(+1.0, spread_best), (-1.0, spread_worst)]),
            accuracy_rule(examples, 2), data=data,
        ))
        found.append(judge_accuracy(
            "C14", "hyperparameters",
            f"{name}: test accuracy at the value the validation part rates best (over "
            f"{', '.join(map(_name, values))}) minus at the default {_name(default)}, in "
            "percentage points (the gain from tuning it)",
            accuracy_effect([(+1.0, tuned), (-1.0, at_default)]),
            accuracy_rule(examples, 2), data=data,
        ))
    return found


# ---- Tables and figure -------------------------------------------------------------------------


def analyze(config: HyperparameterConfig, runs: list[dict]) -> Analysis:
    analysis = Analysis(findings=findings(config, runs))
    seeds = len(seeds_of(runs))
    rates = "/".join(f"{rate:g}" for rate in sorted({run["params"]["learning_rate"]
                                                     for run in runs}))
    panels = []
    for name, (values, usual, default, per_seed) in _sweeps(config, runs).items():
        labels = [_name(value) for value in values]
        rows, series = [], []
        for split, field, style in (("validation", "validation_accuracy", "s--"),
                                    ("test", "test_accuracy", "o-")):
            curves = [[100 * seed_results[value][field] for value in values]
                      for seed_results in per_seed]
            means, lows, highs = interval_band(curves)
            series.append(Series(split, list(range(len(values))), means, lows, highs,
                                 style=style))
            rows.append([split, *(percent(mean / 100) for mean in means)])
        chosen = [_chosen(values, {value: seed_results[value]["validation_accuracy"]
                                   for value in values})[0] for seed_results in per_seed]
        rows.append(["chosen on validation (seeds)",
                     *(str(sum(choice == value for choice in chosen)) for value in values)])
        headers = [name, *(f"{label}{' (default)' if value == default else ''}"
                           f"{'' if value in usual else ' (outside usual)'}"
                           for value, label in zip(values, labels, strict=True))]
        analysis.tables.append(Table(
            f"Accuracy by {name} (mean over seeds); the other hyperparameter at its default; "
            f"learning rate {rates} (tuned at the defaults)",
            headers, rows))
        panels.append(Panel(f"Accuracy vs {name}", name, "accuracy (%)", series,
                            xticklabels=labels))
    analysis.notes.append(
        "Momentum here only sets the running averages used in eval mode. The 'inference' "
        "experiment (C12) scores momenta 0.01 to 0.5 and the cumulative average at batches of 4 "
        "and 64, where a batch's statistics are noisier or the network changes faster."
    )
    if any(run["result"]["nonfinite"] for run in runs):
        analysis.notes.append("Some runs diverged (non-finite loss); their scores are chance.")
    analysis.figures.append(Figure(
        "hyperparameters",
        panels,
        caption=band_caption(
            "Validation (dashed) and test (solid) accuracy (%) of BN networks against the "
            "momentum of the running averages (left; 'cumulative' is momentum=None; one "
            f"network per seed at eps {DEFAULT_EPS:g}, scored with each momentum's averages) and "
            f"against eps (right; one network per eps and seed, momentum {DEFAULT_MOMENTUM:g})",
            seeds,
        ),
    ))
    return analysis


def setup(config: HyperparameterConfig) -> str:
    momenta = ", ".join(momentum_key(momentum) for momentum in config.momenta)
    epsilons = ", ".join(f"{eps:g}" for eps in config.epsilons)
    return (
        f"MLP, {config.depth} hidden layers of {config.width} {config.activation} units, our "
        f"BN before each activation. SGD (momentum {MOMENTUM}), batch {config.batch_size}, "
        f"{config.steps} steps; one learning rate for every run, chosen from "
        f"{', '.join(f'{rate:g}' for rate in config.tuning_rates)} on the validation part of the "
        f"tuning seeds at torch's defaults (momentum {DEFAULT_MOMENTUM:g}, eps "
        f"{DEFAULT_EPS:g}: where a practitioner starts, and what tuning is measured against), "
        "then held fixed so that only the swept value changes. One training "
        f"run per eps ({epsilons}) and seed; each keeps the running averages of every BN "
        f"momentum ({momenta}; 'cumulative' is momentum=None) beside the layers' own, since the "
        "momentum does not change training, and is scored with each on the validation and test "
        "parts. Usual ranges (where sensitivity is judged): momentum "
        f"{', '.join(momentum_key(m) for m in config.usual_momenta)}; eps "
        f"{', '.join(f'{eps:g}' for eps in config.usual_epsilons)}. Choices (best and worst "
        "value, tuned value) are made per seed on the validation part; the test part scores them."
    )


def cost(config: HyperparameterConfig, params: dict) -> float:
    return config.steps * 1.2


EXPERIMENT = Experiment(
    name="hyperparameters",
    claims=("C14",),
    question="Do BN's momentum and epsilon move the accuracy enough that they need tuning?",
    config_type=HyperparameterConfig,
    plan=plan,
    run=run,
    findings=findings,
    analyze=analyze,
    setup=setup,
    data="mnist1d",
    data_reason=(
        "A small MLP on MNIST-1D trains in about a second and stays well below its ceiling, so "
        "a hyperparameter that costs accuracy has room to show it."
    ),
    published="CLAIMS.md lists no published number for this claim.",
    tuning=TUNING,
    cost=cost,
)
