"""What an experiment is: a frozen config, a plan of runs, a run function, and its analysis.

``plan(config, seeds)`` lists the runs as plain parameter dicts; ``run(config, params, data,
device)`` trains one model and returns plain numbers; ``findings(config, runs)`` turns the saved
runs into findings (measure, estimate, interval, rule, verdict) and is a pure function, so the
report, the tests (on synthetic runs whose answer is known) and any later re-analysis share it;
``analyze(config, runs)`` adds the tables and figures. The report uses only saved runs, so it can
be rendered again without training.

An experiment that must choose a value (a learning rate) first runs a ``Tuning`` stage on its own
seeds, scored on the validation part; its choice is a pure function of those runs and goes into
the parameters (and so the identity) of every run of the main stage.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from batchnorm.lab.data.splits import Splits
from batchnorm.lab.models import CNN, MLP
from batchnorm.lab.stats import decode_correct, encode_correct, mean_interval
from batchnorm.lab.training import TrainResult, correct_predictions, seed_everything, train
from batchnorm.lab.verdict import Finding

# The seeds of tuning runs: apart from the evaluation seeds (0, 1, ...), so that no evaluation
# run is also the run its setting was chosen on.
TUNING_SEEDS = (1000, 1001)
QUICK_TUNING_SEEDS = (1000,)


@dataclass(frozen=True)
class Series:
    """One line of a plot; ``low``/``high`` draw its band (a 95% interval across seeds)."""

    label: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None
    high: list[float] | None = None
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    xscale: str = "linear"
    yscale: str = "linear"
    xticklabels: list[str] | None = None  # category names for x = 0, 1, 2, ...


@dataclass(frozen=True)
class Figure:
    name: str  # the PNG's file stem
    panels: list[Panel]
    caption: str = ""  # what is plotted, over how many seeds, and what the band is


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Baseline:
    """One of our test accuracies to show beside a data set's published baselines."""

    data: str
    model: str  # the published model family it compares with ("MLP", "CNN")
    setting: str  # ours, in words
    accuracy: float  # mean test accuracy over seeds, in %
    seeds: int


@dataclass
class Analysis:
    findings: list[Finding] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)


@dataclass(frozen=True)
class Tuning:
    """A stage of runs on ``TUNING_SEEDS`` that chooses a value on the validation part.

    ``plan(config, quick)`` lists the tuning runs; ``choose(config, runs)`` returns the choice as
    plain JSON (a pure function of the saved runs); ``apply(choice, params)`` gives a main run's
    parameters with the chosen value in them; ``table(config, runs, choice)`` shows the choice.
    """

    plan: Callable[[Any, bool], list[dict]]
    choose: Callable[[Any, list[dict]], dict]
    apply: Callable[[dict, dict], dict]
    table: Callable[[Any, list[dict], dict], Table]


@dataclass(frozen=True)
class Experiment:
    """An experiment as data plus functions; see the module docstring."""

    name: str
    claims: tuple[str, ...]
    question: str  # one line for --list and the report
    config_type: type
    plan: Callable[[Any, Sequence[int]], list[dict]]
    run: Callable[[Any, dict, Splits, str], dict]
    findings: Callable[[Any, list[dict]], list[Finding]]
    analyze: Callable[[Any, list[dict]], Analysis]
    setup: Callable[[Any], str]
    data: str = "mnist1d"  # the data set it runs on unless --data says otherwise
    data_reason: str = ""  # why that data set, for the report
    published: str = ""  # the published figures (from CLAIMS.md), in our words
    published_tables: tuple[Table, ...] = ()
    tuning: Tuning | None = None
    cost: Callable[[Any, dict], float] | None = None  # relative work of a run (for the ETA)

    def config(self, quick: bool = False):
        return self.config_type.quick() if quick else self.config_type()

    def config_from_dict(self, values: dict):
        """Rebuild the frozen config from its saved dict (lists back to tuples)."""
        hints = typing.get_type_hints(self.config_type)
        known = {item.name for item in dataclasses.fields(self.config_type)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{self.name}: unknown config fields {sorted(unknown)}")
        converted = {}
        for key, value in values.items():
            is_tuple = typing.get_origin(hints[key]) is tuple
            converted[key] = tuple(value) if is_tuple and isinstance(value, list) else value
        return self.config_type(**converted)

    def run_cost(self, config, params: dict) -> float:
        return 1.0 if self.cost is None else float(self.cost(config, params))


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---- Building and training models ----------------------------------------------------------


def mlp_builder(config: Any, data: Splits, norm: str, **overrides: Any) -> Callable[[], MLP]:
    """A factory for ``fit`` of the MLP a config describes (its depth, width and activation),
    with ``norm`` and any other MLP option given in ``overrides``."""
    options = {
        "depth": config.depth,
        "width": config.width,
        "activation": getattr(config, "activation", "relu"),
        "norm": norm,
        **overrides,
    }
    return lambda: MLP(data.input_size, data.classes, **options)


def cnn_builder(data: Splits, widths: tuple[int, ...], norm: str) -> Callable[[], CNN]:
    """A factory of the lab's CNN for ``data``: 1-D convolutions for signals (height 1)."""
    channels, height, _ = data.image_shape
    return lambda: CNN(channels, data.classes, widths=widths, norm=norm,
                       one_dimensional=height == 1)


@dataclass
class Fitted:
    model: torch.nn.Module
    training: TrainResult
    # which test examples the final model classifies correctly; None in a tuning run, which is
    # given no test part
    test_correct: torch.Tensor | None
    data: str
    validation_size: int

    def record(self, **extra) -> dict:
        """A run's result as most experiments save it: the validation checkpoints, whether the
        loss became non-finite, any ``extra`` fields, and the test record."""
        return {
            "validation_accuracy": self.training.validation_accuracy,
            "nonfinite": self.training.nonfinite,
            **extra,
            **self.test_record(),
        }

    def test_record(self) -> dict:
        """The test outcome as plain data: accuracy, size and which examples were right (and the
        data set's name and validation size, which the analysis needs for its noise). A tuning
        run has no test outcome: its record holds only the data set's name and validation size."""
        if self.test_correct is None:
            return {"data": self.data, "validation_size": self.validation_size}
        return {
            "data": self.data,
            "validation_size": self.validation_size,
            "test_accuracy": float(self.test_correct.float().mean()),
            "test_size": len(self.test_correct),
            "test_correct": encode_correct(self.test_correct),
        }


def fit(
    model_builder: Callable[[], torch.nn.Module],
    data: Splits,
    device: str,
    seed: int,
    *,
    images: bool,
    **train_arguments,
) -> Fitted:
    """Seed, build the model, train it on ``data.train`` (checkpoints on the validation part),
    then score the test part once (unless the splits have none: a tuning run)."""
    generator = seed_everything(seed)
    model = model_builder().to(device)
    result = train(
        model,
        data.train.inputs(images).to(device),
        data.train.labels.to(device),
        data.validation.inputs(images).to(device),
        data.validation.labels.to(device),
        generator=generator,
        **train_arguments,
    )
    eval_every, steps = train_arguments.get("eval_every", 0), train_arguments["steps"]
    if result.nonfinite and eval_every:
        # A diverged model predicts nothing useful: its remaining checkpoints count as chance.
        for step in range(result.steps[-1] + eval_every, steps + 1, eval_every):
            result.steps.append(step)
            result.validation_accuracy.append(1.0 / data.classes)
    test_correct = None if data.test is None else correct_predictions(
        model, data.test.inputs(images).to(device), data.test.labels.to(device)
    )
    return Fitted(model, result, test_correct, data.name, len(data.validation))


# ---- Reading saved runs ----------------------------------------------------------------------


def by_params(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Group saved runs (``{"params": ..., "result": ...}``) by the given parameter names."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run["params"][key] for key in keys), []).append(run)
    return groups


def one_per(runs: list[dict], *keys: str) -> dict[tuple, dict]:
    """The result of the one run for each combination of ``keys``."""
    return {key: group[0]["result"] for key, group in by_params(runs, *keys).items()}


def seeds_of(runs: list[dict]) -> list[int]:
    return sorted({run["params"]["seed"] for run in runs})


def data_of(runs: list[dict]) -> str:
    names = sorted({run["result"].get("data", "?") for run in runs})
    return ", ".join(names) if names else "?"


def test_outcomes(result: dict) -> np.ndarray:
    """Which test examples a run got right (a boolean vector)."""
    return decode_correct(result["test_correct"], result["test_size"])


def test_size(runs: list[dict]) -> int:
    sizes = {run["result"]["test_size"] for run in runs}
    if len(sizes) != 1:
        raise ValueError(f"runs scored on test sets of different sizes: {sorted(sizes)}")
    return sizes.pop()


def interval_band(
    values_per_seed: Sequence[Sequence[float]],
) -> tuple[list[float], list[float], list[float]]:
    """Mean and 95% t-interval across seeds, point by point (curves of equal length); with one
    seed the band collapses onto the mean."""
    columns = list(zip(*values_per_seed, strict=True))
    means, lows, highs = [], [], []
    for column in columns:
        interval = mean_interval(column)
        means.append(interval.mean)
        lows.append(interval.mean if math.isnan(interval.low) else interval.low)
        highs.append(interval.mean if math.isnan(interval.high) else interval.high)
    return means, lows, highs


def percent(fraction: float) -> str:
    """A fraction (0.612) as a percentage ("61.2%"), the one unit of accuracy in the report."""
    return "n/a" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.1f}%"


def band_caption(what: str, seeds: int, extra: str = "") -> str:
    """The caption every figure carries: what is plotted, over how many seeds, what the band is."""
    band = (
        "the shaded band is the 95% t-interval of the mean across seeds"
        if seeds >= 2
        else "one seed, so no band"
    )
    return f"{what}; mean over {seeds} seed{'s' if seeds != 1 else ''}; {band}." + (
        f" {extra}" if extra else ""
    )


# ---- Learning-rate tuning on the validation part -----------------------------------------------


def rate_tuning(
    keys: tuple[str, ...],
    groups: Callable[[Any], list[dict]],
    rates: Callable[[Any], Sequence[float]],
    score: Callable[[Any, dict], float],
    score_name: str,
    *,
    fixed: Callable[[Any], dict] | None = None,
    score_text: Callable[[Any, float], str] | None = None,
) -> Tuning:
    """A ``Tuning`` of the learning rate for each group of runs (a norm, or a model and a norm).

    ``groups(config)`` lists the groups as parameter dicts over ``keys`` (e.g.
    ``{"norm": "batch"}``); ``rates(config)`` the candidate rates; ``score(config, result)`` the
    validation score of a tuning run (higher is better); ``fixed(config)`` any fixed parameters of
    the tuning runs (the standard initial scale, the reference batch). The chosen rate has the
    best mean score over the tuning seeds, ties going to the smaller rate. ``score_text(config,
    mean score)`` writes a cell of the table (default: the score as a percentage).
    """

    def text(config, value: float) -> str:
        return percent(value) if score_text is None else score_text(config, value)

    def name(params: dict) -> str:
        return "/".join(str(params[key]) for key in keys)

    def plan(config, quick: bool) -> list[dict]:
        seeds = QUICK_TUNING_SEEDS if quick else TUNING_SEEDS
        constant = fixed(config) if fixed else {}
        return [
            {**group, **constant, "learning_rate": rate, "seed": seed}
            for seed in seeds
            for group in groups(config)
            for rate in rates(config)
        ]

    def mean_scores(config, runs: list[dict]) -> dict[str, dict[float, float]]:
        scores: dict[str, dict[float, list[float]]] = {}
        for run in runs:
            by_rate = scores.setdefault(name(run["params"]), {})
            by_rate.setdefault(run["params"]["learning_rate"], []).append(
                score(config, run["result"])
            )
        return {
            group: {rate: sum(values) / len(values) for rate, values in by_rate.items()}
            for group, by_rate in scores.items()
        }

    def choose(config, runs: list[dict]) -> dict:
        chosen = {}
        for group, by_rate in mean_scores(config, runs).items():
            best = max(by_rate.values())
            chosen[group] = min(rate for rate, value in by_rate.items() if value == best)
        return {"learning_rate": chosen}

    def apply(choice: dict, params: dict) -> dict:
        return {**params, "learning_rate": choice["learning_rate"][name(params)]}

    def table(config, runs: list[dict], choice: dict) -> Table:
        scores = mean_scores(config, runs)
        candidates = list(rates(config))
        rows = [
            [group,
             *(text(config, by_rate[rate]) if rate in by_rate else "-" for rate in candidates),
             f"{choice['learning_rate'][group]:g}"]
            for group, by_rate in scores.items()
        ]
        seeds = len(seeds_of(runs))
        return Table(
            f"Learning rate chosen on the validation part: {score_name} by rate, mean over "
            f"{seeds} tuning seed{'s' if seeds != 1 else ''} (never an evaluation seed)",
            ["/".join(keys), *(f"{rate:g}" for rate in candidates), "chosen"],
            rows,
        )

    return Tuning(plan=plan, choose=choose, apply=apply, table=table)


def held_rate(choice: dict, params: dict) -> dict:
    """``Tuning.apply`` for one learning rate tuned at a reference setting: every main run,
    whatever its setting, trains at that rate."""
    (rate,) = choice["learning_rate"].values()
    return {**params, "learning_rate": rate}


def final_validation_accuracy(config, result: dict) -> float:
    """The tuning score of most experiments: validation accuracy at the end of training."""
    return result["validation_accuracy"][-1]
