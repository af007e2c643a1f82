"""Each experiment's pieces: configs survive results.json, plans, and the analysis helpers."""

from __future__ import annotations

import json

import pytest

from batchnorm.lab.experiments import EXPERIMENTS, get_experiment
from batchnorm.lab.experiments.base import TUNING_SEEDS, config_to_dict
from batchnorm.lab.experiments.convergence import steps_to_target
from batchnorm.lab.experiments.learning_rate import largest_tolerated_rate


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
    assert experiment.data in ("mnist1d", "digits") and experiment.data_reason
    if experiment.tuning is not None:
        tuning = experiment.tuning.plan(config, quick)
        assert tuning and not {p["seed"] for p in tuning} & {0, 1, 2, 3, 4}  # own seeds
        assert {p["seed"] for p in tuning} <= set(TUNING_SEEDS)


def test_unknown_config_fields_and_experiments_are_refused():
    with pytest.raises(ValueError, match="unknown config fields"):
        get_experiment("init").config_from_dict({"stepz": 3})
    with pytest.raises(KeyError, match="expected one of convergence"):
        get_experiment("dropout")


def test_steps_to_target():
    assert steps_to_target([0, 10, 20], [0.1, 0.96, 0.99], 0.95) == 10
    assert steps_to_target([0, 10], [0.1, 0.5], 0.95) is None


def test_tuning_chooses_on_validation_and_feeds_the_main_runs():
    experiment = get_experiment("init")
    config = experiment.config()
    tuning = experiment.tuning.plan(config, False)
    assert {p["scale"] for p in tuning} == {1.0}  # tuned at the standard scale only

    def score(params):  # BN best at 0.1, none best at 0.03 (and a tie at 0.01 for none)
        best = {"batch": 0.1, "none": 0.03}[params["norm"]]
        return 0.9 if params["learning_rate"] == best else 0.5

    runs = [{"params": p, "result": {"validation_accuracy": [0.1, score(p)],
                                     "test_accuracy": 0.0}} for p in tuning]
    choice = experiment.tuning.choose(config, runs)
    assert choice == {"learning_rate": {"none": 0.03, "batch": 0.1}}
    # The test accuracy plays no part in the choice.
    for run in runs:
        run["result"]["test_accuracy"] = 1.0 if run["params"]["learning_rate"] == 0.01 else 0.0
    assert experiment.tuning.choose(config, runs) == choice
    main = experiment.tuning.apply(choice, {"norm": "batch", "scale": 10.0, "seed": 0})
    assert main["learning_rate"] == 0.1
    table = experiment.tuning.table(config, runs, choice)
    assert table.rows and "validation" in table.title


def test_tuning_ties_go_to_the_smaller_rate():
    experiment = get_experiment("regularization")
    config = experiment.config()
    runs = [{"params": p, "result": {"validation_accuracy": [0.7]}}
            for p in experiment.tuning.plan(config, False)]
    choice = experiment.tuning.choose(config, runs)["learning_rate"]
    assert set(choice) == {"none/0.0", "none/0.3", "batch/0.0", "batch/0.3"}
    assert set(choice.values()) == {min(config.tuning_rates)}


def test_largest_tolerated_rate_interpolates_on_the_log_axis():
    rates = [0.01, 0.02, 0.04, 0.08]
    # Best 0.6, level 0.3: the accuracy falls from 0.5 at 0.02 to 0.1 at 0.04, crossing 0.3
    # halfway, so the edge is sqrt(0.02 * 0.04) on the log axis.
    rate, censored = largest_tolerated_rate(rates, [0.6, 0.5, 0.1, 0.1], 0.5)
    assert rate == pytest.approx((0.02 * 0.04) ** 0.5) and not censored
    rate, censored = largest_tolerated_rate(rates, [0.6, 0.6, 0.6, 0.5], 0.5)
    assert rate == 0.08 and censored  # tolerated at the top: a lower bound
    rate, _ = largest_tolerated_rate(rates, [0.6, 0.0, 0.0, 0.0], 0.5)
    assert 0.01 < rate < 0.02


def test_cross_iteration_runs_are_linked_to_their_preceding_layers():
    """The batch-size experiment's cross-iteration norm trains with its window: each of the lab
    model's blocks links it to the layer before it, and the run differs from batch norm's."""
    from batchnorm import CrossIterationBatchNorm1d
    from batchnorm.lab.data.splits import load_splits
    from batchnorm.lab.experiments.base import fit, mlp_builder
    from batchnorm.lab.experiments.batch_size import BatchSizeConfig

    data = load_splits("digits")
    config = BatchSizeConfig()
    assert "cross-iteration" in config.mlp_norms
    outcomes = {}
    for norm in ("batch", "cross-iteration"):
        fitted = fit(mlp_builder(config, data, norm), data, "cpu", 0, images=False, steps=12,
                     batch_size=4, learning_rate=0.05)
        outcomes[norm] = fitted.test_record()["test_correct"]
        if norm == "cross-iteration":
            layers = [m for m in fitted.model.modules()
                      if isinstance(m, CrossIterationBatchNorm1d)]
            assert len(layers) == config.depth
            assert all(layer.preceding is not None for layer in layers)
    assert outcomes["batch"] != outcomes["cross-iteration"]
