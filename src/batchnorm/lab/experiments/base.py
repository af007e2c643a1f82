"""What an experiment is: a frozen config, a plan of runs, a run function, and an analysis.

``plan(config, seeds)`` lists the runs as plain parameter dicts; ``run(config, params, data,
device)`` trains one model and returns plain numbers; ``analyze(config, runs)`` turns the saved
runs into findings (verdicts), tables and figures. The report uses only ``analyze``, so it can be
rendered again from the saved results without training.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batchnorm.lab.data import Dataset
from batchnorm.lab.models import MLP
from batchnorm.lab.training import TrainResult, seed_everything, train
from batchnorm.lab.verdict import Finding


@dataclass(frozen=True)
class Series:
    """One line of a plot; ``low``/``high`` draw a band (the range over seeds) when given."""

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


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Analysis:
    findings: list[Finding] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    """An experiment as data plus functions; see the module docstring."""

    name: str
    claims: tuple[str, ...]
    question: str  # one line for --list and the report
    config_type: type
    plan: Callable[[Any, Sequence[int]], list[dict]]
    run: Callable[[Any, dict, Dataset, str], dict]
    analyze: Callable[[Any, list[dict]], Analysis]
    setup: Callable[[Any], str]
    published: str = ""  # the published figures (from CLAIMS.md), in our words
    published_tables: tuple[Table, ...] = ()

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


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def mlp_builder(config: Any, data: Dataset, norm: str, **overrides: Any) -> Callable[[], MLP]:
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


def fit(
    model_builder: Callable[[], torch.nn.Module],
    data: Dataset,
    device: str,
    seed: int,
    *,
    images: bool,
    **train_arguments,
) -> tuple[torch.nn.Module, TrainResult]:
    """Seed, build the model, and train it on ``data`` (images for CNNs, vectors for MLPs)."""
    generator = seed_everything(seed)
    model = model_builder().to(device)
    if images:
        train_x, test_x = data.train_images, data.test_images
    else:
        train_x, test_x = data.train_vectors, data.test_vectors
    result = train(
        model,
        train_x.to(device),
        data.train_labels.to(device),
        test_x.to(device),
        data.test_labels.to(device),
        generator=generator,
        **train_arguments,
    )
    eval_every, steps = train_arguments.get("eval_every", 0), train_arguments["steps"]
    if result.nonfinite and eval_every:
        # A diverged model predicts nothing useful: its remaining checkpoints count as chance.
        for step in range(result.steps[-1] + eval_every, steps + 1, eval_every):
            result.steps.append(step)
            result.test_accuracy.append(1.0 / data.classes)
    return model, result


def by_params(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Group saved runs (``{"params": ..., "result": ...}``) by the given parameter names."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run["params"][key] for key in keys), []).append(run)
    return groups


def seeds_of(runs: list[dict]) -> list[int]:
    return sorted({run["params"]["seed"] for run in runs})


def spread_band(values_per_seed: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean, minimum and maximum across seeds, point by point (curves of equal length)."""
    columns = list(zip(*values_per_seed, strict=True))
    means = [sum(column) / len(column) for column in columns]
    return means, [min(column) for column in columns], [max(column) for column in columns]


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"
