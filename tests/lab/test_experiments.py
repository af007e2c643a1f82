"""Each experiment's pieces: configs survive results.json, plans, and the analysis helpers."""

from __future__ import annotations

import json

import pytest

from batchnorm.lab.experiments import EXPERIMENTS, get_experiment
from batchnorm.lab.experiments.base import config_to_dict
from batchnorm.lab.experiments.convergence import best_runs, steps_to_target
from batchnorm.lab.experiments.learning_rate import LearningRateConfig, largest_stable_rate


@pytest.mark.parametrize("name", list(EXPERIMENTS))
@pytest.mark.parametrize("quick", [False, True])
def test_configs_round_trip_through_json(name, quick):
    experiment = EXPERIMENTS[name]
    config = experiment.config(quick)
    restored = experiment.config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert restored == config and hash(restored) == hash(config)
    plan = experiment.plan(config, [0, 1])
    assert len(plan) == len({json.dumps(p, sort_keys=True) for p in plan})  # no duplicate runs
    assert {p["seed"] for p in plan} == {0, 1}
    assert experiment.setup(config) and experiment.question and experiment.published


def test_unknown_config_fields_and_experiments_are_refused():
    with pytest.raises(ValueError, match="unknown config fields"):
        get_experiment("init").config_from_dict({"stepz": 3})
    with pytest.raises(KeyError, match="expected one of convergence"):
        get_experiment("dropout")


def test_steps_to_target_and_best_rate():
    assert steps_to_target([0, 10, 20], [0.1, 0.96, 0.99], 0.95) == 10
    assert steps_to_target([0, 10], [0.1, 0.5], 0.95) is None

    def run(rate, reached, final):
        result = {"steps_to_target": reached, "test_accuracy": [0.1, final]}
        return {"params": {"norm": "batch", "seed": 0, "learning_rate": rate}, "result": result}

    runs = [run(0.01, None, 0.99), run(0.1, 50, 0.97), run(0.3, 50, 0.98)]
    best = best_runs(runs)
    assert best[("batch", 0)]["params"]["learning_rate"] == 0.3  # tie on steps: higher accuracy


def test_largest_stable_rate_bounds_when_nothing_is_stable():
    config = LearningRateConfig(learning_rates=(0.1, 1.0))

    def run(rate, accuracy, nonfinite=False):
        result = {"final_test_accuracy": accuracy, "nonfinite": nonfinite}
        return {"params": {"learning_rate": rate}, "result": result}

    assert largest_stable_rate(config, [run(0.1, 0.9), run(1.0, 0.95, nonfinite=True)]) == 0.1
    assert largest_stable_rate(config, [run(0.1, 0.2), run(1.0, 0.1)]) == 0.05
