"""``results.json``: every run's parameters and numbers, the suite's settings, and the findings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from batchnorm.lab.experiments import get_experiment
from batchnorm.lab.experiments.base import Analysis, Experiment, Table

RESULTS_FILE = "results.json"
# 2: a validation split, tuning runs, per-example test outcomes and the data per experiment.
FORMAT = 2


class ResultsError(ValueError):
    """A results file that is missing or not one the lab wrote."""


@dataclass
class AnalyzedExperiment:
    experiment: Experiment
    config: object
    runs: list[dict]
    analysis: Analysis
    data: dict  # spec, description and sizes of the data set it ran on
    tuning: Table | None  # how its tuned value was chosen, when it tunes


def write_results(folder: Path, document: dict) -> Path:
    path = Path(folder) / RESULTS_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=1, allow_nan=True))
    temporary.replace(path)
    return path


def read_results(folder: Path) -> dict:
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        raise ResultsError(
            f"no {RESULTS_FILE} in '{folder}': expected the output folder of a lab run"
        )
    try:
        document = json.loads(path.read_text())
    except ValueError as error:
        raise ResultsError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ResultsError(f"{path}: expected a lab results file of format {FORMAT}")
    return document


def analyze_results(document: dict) -> list[AnalyzedExperiment]:
    """Re-run every experiment's analysis (and the tuning tables) on the saved runs."""
    analyzed = []
    for entry in document["experiments"]:
        experiment = get_experiment(entry["name"])
        config = experiment.config_from_dict(entry["config"])
        analysis = experiment.analyze(config, entry["runs"])
        tuning = None
        if experiment.tuning is not None and "tuning" in entry:
            runs = entry["tuning"]["runs"]
            chosen = experiment.tuning.choose(config, runs)
            if chosen != entry["tuning"]["chosen"]:
                # The analysis code changed how it chooses: the saved runs were trained at
                # another choice, so their report would not describe them.
                raise ResultsError(
                    f"{entry['name']}: its tuning runs now choose {chosen}, but its runs were "
                    f"trained at {entry['tuning']['chosen']}; run the lab again"
                )
            tuning = experiment.tuning.table(config, runs, chosen)
        analyzed.append(
            AnalyzedExperiment(experiment, config, entry["runs"], analysis, entry["data"], tuning)
        )
    return analyzed
