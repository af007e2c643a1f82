"""Checks shared by the experiments that tune one learning rate at a reference setting and hold
it for every main run (``base.held_rate``): synthetic tuning runs whose right choice is known,
the rate and momenta a run really trains at, and the suite's saved choice."""

from __future__ import annotations

import json
from pathlib import Path

from batchnorm.lab.experiments.base import Experiment
from batchnorm.lab.experiments.inference import batch_norms


def tuning_runs(experiment: Experiment, config, best: float) -> list[dict]:
    """``experiment``'s tuning runs, with results whose final validation accuracy is highest at
    ``best``; their first checkpoint (before training) and a stray test figure both favour
    another rate, so only a choice made on the final validation accuracy lands on ``best``."""
    decoy = next(rate for rate in config.tuning_rates if rate != best)
    return [
        {"params": params, "result": {
            "validation_accuracy": [0.9 if params["learning_rate"] == decoy else 0.1,
                                    0.6 if params["learning_rate"] == best else 0.4],
            "test_accuracy": 0.9 if params["learning_rate"] == decoy else 0.1,
        }}
        for params in experiment.tuning.plan(config, False)
    ]


def trained_at(module, monkeypatch, config, params: dict, data) -> list[tuple[float, set]]:
    """Run ``module``'s experiment once, watching its ``fit``: the learning rate each fit got
    and the momenta its batch norms ended with."""
    seen = []
    original = module.fit

    def spy(*args, **kwargs):
        fitted = original(*args, **kwargs)
        seen.append((kwargs["learning_rate"],
                     {layer.momentum for layer in batch_norms(fitted.model)}))
        return fitted

    monkeypatch.setattr(module, "fit", spy)
    module.EXPERIMENT.run(config, params, data, "cpu")
    return seen


def check_saved_tuning(out: Path, key: str, reference, swept: set) -> str:
    """The suite's saved runs in ``out``: every tuning run at ``key`` = ``reference`` with no
    test outcome, and every main run (over the ``swept`` values of ``key``) at the chosen rate.
    Gives the report's text."""
    (entry,) = json.loads((out / "results.json").read_text())["experiments"]
    tuning = entry["tuning"]
    assert {run["params"][key] for run in tuning["runs"]} == {reference}
    assert all("test_accuracy" not in run["result"] for run in tuning["runs"])
    (chosen,) = tuning["chosen"]["learning_rate"].values()
    assert {run["params"][key] for run in entry["runs"]} == swept
    assert {run["params"]["learning_rate"] for run in entry["runs"]} == {chosen}
    report = (out / "report.md").read_text()
    assert "Learning rate chosen on the validation part" in report
    return report
