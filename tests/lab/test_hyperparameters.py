"""C14, hyperparameters: best and worst values are chosen on the validation part and scored on the
test part; each of the four findings gives the four verdicts on synthetic runs; a run sets eps
on the layers and scores every momentum; the learning rate is chosen on the validation part at
torch's defaults and trains every main run; the experiment runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.base import TUNING_SEEDS
from batchnorm.lab.experiments.hyperparameters import (
    DEFAULT_EPS,
    DEFAULT_MOMENTUM,
    EXPERIMENT,
    HyperparameterConfig,
    _chosen,
)
from batchnorm.lab.experiments.inference import CUMULATIVE, momentum_key
from batchnorm.lab.stats import encode_correct
from batchnorm.lab.suite import run_suite
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS, TEST_SIZE, VALIDATION_SIZE, jitter, outcome
from tests.lab.tuning_checks import check_saved_tuning, trained_at, tuning_runs

EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}
CONFIG = HyperparameterConfig()


def test_choices_come_from_validation_with_ties_to_the_first():
    validation = {"a": 0.5, "b": 0.7, "c": 0.7, "d": 0.3}
    assert _chosen(["a", "b", "c", "d"], validation) == ("b", "d")
    assert _chosen(["a", "b"], {"a": 0.5, "b": 0.5}) == ("a", "a")


def _entry(validation: float, test: float, seed: int, salt: int) -> dict:
    return {"validation_accuracy": validation, "test_accuracy": test,
            "test_correct": encode_correct(outcome(test, seed, salt))}


def hyperparameter_runs(case: str, which: str = "both") -> list[dict]:
    """Runs where one usual value of each hyperparameter (momentum 0.01, eps 1e-8) differs from
    the rest, which are flat up to a small per-seed scatter. The validation part rates that value
    ``validation_lift`` above the rest and the test part gives it ``test_lift``; every other value
    is rated by validation in a fixed order. So both the sensitivity (best minus worst on
    validation, scored on test) and the gain over the default are ``test_lift``, whose sign a
    flip reverses. Threshold 4.5 pp. ``which`` limits the effect to "momentum" or "eps"."""
    validation_lift, test_lift, scatter = {
        "supported": (12.0, 12.0, 2.0),
        "flipped": (12.0, -12.0, 2.0),  # validation's favourite is worse on test
        "not supported": (0.0, 0.0, 1.0),
        "inconclusive": (4.5, 4.5, 8.0),
    }[case]
    runs = []
    for seed in SEEDS:
        spread = jitter(seed, scatter) / 100
        for index, eps in enumerate(CONFIG.epsilons):
            special_eps = eps == 1e-8 and which in ("both", "eps")
            momenta = {}
            for salt, momentum in enumerate(CONFIG.momenta):
                special = special_eps or (momentum == 0.01 and eps == DEFAULT_EPS
                                          and which in ("both", "momentum"))
                noise = np.random.default_rng([seed, index, salt]).normal(0, 0.005)
                test = 0.5 + noise + (test_lift / 100 + spread if special else 0.0)
                # Validation rates the special value first and the others in a fixed order.
                validation = 0.5 + 0.001 * salt + 0.0001 * index + (
                    validation_lift / 100 + abs(spread) if special else 0.0)
                momenta[momentum_key(momentum)] = _entry(validation, test, seed,
                                                         100 * index + salt)
            runs.append({"params": {"eps": eps, "seed": seed, "learning_rate": 0.03}, "result": {
                "data": "synthetic", "validation_size": VALIDATION_SIZE,
                "test_size": TEST_SIZE, "nonfinite": False, "momenta": momenta}})
    return runs


@pytest.mark.parametrize("case", list(EXPECTED))
def test_hyperparameter_findings(case):
    found = EXPERIMENT.findings(CONFIG, hyperparameter_runs(case))
    assert len(found) == 4 and {f.claim for f in found} == {"C14"}
    for finding in found:
        assert finding.verdict == EXPECTED[case], finding
        assert finding.threshold == pytest.approx(4.5) and finding.split == "test"
        assert finding.example_se > 0


def test_each_hyperparameter_is_judged_on_its_own_sweep():
    found = EXPERIMENT.findings(CONFIG, hyperparameter_runs("supported", which="momentum"))
    verdicts = {f.measure.split()[0]: f.verdict for f in found}
    assert verdicts == {"momentum": SUPPORTED, "momentum:": SUPPORTED,
                        "eps": NOT_SUPPORTED, "eps:": NOT_SUPPORTED}


def test_sensitivity_is_judged_within_the_usual_range():
    # Flat within the usual values; the cumulative average (outside them) costs 20 pp.
    runs = hyperparameter_runs("not supported")
    for run in runs:
        seed, entry = run["params"]["seed"], run["result"]["momenta"][CUMULATIVE]
        test = entry["test_accuracy"] - 0.2
        run["result"]["momenta"][CUMULATIVE] = _entry(0.2, test, seed, 9)
    found = EXPERIMENT.findings(CONFIG, runs)
    assert {f.verdict for f in found} == {NOT_SUPPORTED}
    # The same loss at a usual value (0.3) is a sensitivity.
    for run in runs:
        seed, entry = run["params"]["seed"], run["result"]["momenta"]["0.3"]
        run["result"]["momenta"]["0.3"] = _entry(0.2, entry["test_accuracy"] - 0.2, seed, 9)
    found = EXPERIMENT.findings(CONFIG, runs)
    sensitivity = next(f for f in found if f.measure.startswith("momentum within"))
    assert sensitivity.verdict == SUPPORTED


def test_the_test_part_never_makes_a_choice():
    # Validation rates momentum 0.01 best and 0.3 worst; the test part says the opposite. The
    # sensitivity is test(0.01) - test(0.3), negative: not supported. Choosing on the test part
    # would have reported the same spread as positive.
    runs = hyperparameter_runs("not supported")
    for run in runs:
        seed = run["params"]["seed"]
        for key, test in (("0.01", 0.40), ("0.3", 0.60)):
            validation = 0.9 if key == "0.01" else 0.1
            noise = np.random.default_rng([seed, int(100 * test)]).normal(0, 0.01)
            run["result"]["momenta"][key] = _entry(validation, test + noise, seed,
                                                   7 if key == "0.01" else 8)
    found = EXPERIMENT.findings(CONFIG, runs)
    sensitivity = next(f for f in found if f.measure.startswith("momentum within"))
    gain = next(f for f in found if f.measure.startswith("momentum:"))
    assert sensitivity.effect == pytest.approx(-20.0, abs=2.0)
    assert gain.effect < -5  # the value validation liked is worse on test than the default
    assert sensitivity.verdict == gain.verdict == NOT_SUPPORTED


def test_hyperparameter_analysis_tables_and_figure():
    analysis = EXPERIMENT.analyze(CONFIG, hyperparameter_runs("supported"))
    momentum, eps = analysis.tables
    assert momentum.headers[1:] == ["0.01", "0.03", "0.1 (default)", "0.3",
                                    "0.9 (outside usual)", f"{CUMULATIVE} (outside usual)"]
    assert [row[0] for row in momentum.rows] == ["validation", "test",
                                                 "chosen on validation (seeds)"]
    assert momentum.rows[2][1] == str(len(SEEDS))  # every seed chose 0.01
    assert eps.headers[2] == "1e-05 (default)"
    (figure,) = analysis.figures
    assert [panel.xticklabels for panel in figure.panels][1] == ["1e-08", "1e-05", "0.001",
                                                                 "0.1"]
    assert all(len(panel.series) == 2 for panel in figure.panels)


# ---- The learning rate: tuned on validation at torch's defaults, held for every run -----------


def test_the_rate_is_tuned_at_the_defaults_on_validation():
    plan = EXPERIMENT.tuning.plan(CONFIG, False)
    assert {params["eps"] for params in plan} == {DEFAULT_EPS} == {1e-5}
    assert DEFAULT_MOMENTUM == 0.1  # the layers' own averages, which the tuning score reads
    assert sorted({params["learning_rate"] for params in plan}) == sorted(CONFIG.tuning_rates)
    assert {params["seed"] for params in plan} == set(TUNING_SEEDS)
    assert len(EXPERIMENT.tuning.plan(HyperparameterConfig.quick(), True)) == 1
    choice = EXPERIMENT.tuning.choose(CONFIG, tuning_runs(EXPERIMENT, CONFIG, best=0.03))
    assert choice == {"learning_rate": {"1e-05": 0.03}}


def test_every_main_run_trains_at_the_chosen_rate(monkeypatch):
    from batchnorm.lab.data.splits import load_splits
    from batchnorm.lab.experiments import hyperparameters

    choice = EXPERIMENT.tuning.choose(CONFIG, tuning_runs(EXPERIMENT, CONFIG, best=0.01))
    applied = [EXPERIMENT.tuning.apply(choice, params) for params in EXPERIMENT.plan(CONFIG, SEEDS)]
    assert {params["eps"] for params in applied} == set(CONFIG.epsilons)
    assert {params["learning_rate"] for params in applied} == {0.01}
    # ... and a run trains at the rate its parameters carry, with the layers at the default
    # momentum (whose running averages the tuning run was scored with).
    params = {"eps": 0.1, "seed": 0, "learning_rate": 0.037}
    assert trained_at(hyperparameters, monkeypatch, TINY, params, load_splits(TINY_DATA)) == [
        (0.037, {DEFAULT_MOMENTUM})]


def test_a_tuning_run_is_scored_on_validation_only():
    from batchnorm.lab.data.splits import load_splits

    result = EXPERIMENT.run(TINY, {"eps": DEFAULT_EPS, "seed": TUNING_SEEDS[0],
                                   "learning_rate": 0.1},
                            load_splits(TINY_DATA).without_test(), "cpu")
    json.dumps(result)
    assert len(result["validation_accuracy"]) == 2  # before training and at the end
    assert 0 <= result["validation_accuracy"][-1] <= 1
    assert not any(key.startswith("test") for key in result)


TINY = HyperparameterConfig(epsilons=(1e-5, 1e-1), usual_epsilons=(1e-5,), tuning_rates=(0.1,),
                            steps=10, width=8)


def test_a_run_sets_eps_and_scores_every_momentum(monkeypatch):
    from batchnorm.lab.data.splits import load_splits
    from batchnorm.lab.experiments import hyperparameters

    seen = []
    original = hyperparameters.RunningStatistics

    def spy(model, momenta):
        seen.extend(layer.eps for layer in hyperparameters.batch_norms(model))
        return original(model, momenta)

    monkeypatch.setattr(hyperparameters, "RunningStatistics", spy)
    result = EXPERIMENT.run(TINY, {"eps": 0.1, "seed": 0, "learning_rate": 0.1},
                            load_splits(TINY_DATA), "cpu")
    json.dumps(result)
    assert seen and set(seen) == {0.1}
    assert set(result["momenta"]) == {momentum_key(m) for m in TINY.momenta}
    for entry in result["momenta"].values():
        assert 0 <= entry["validation_accuracy"] <= 1 and 0 <= entry["test_accuracy"] <= 1
    # The record's own test figure is the network with the layers' own averages (0.1).
    assert result["test_accuracy"] == pytest.approx(result["momenta"]["0.1"]["test_accuracy"],
                                                    abs=0.01)


def test_the_suite_runs_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    run_suite({EXPERIMENT.name: TINY}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, progress=False)
    # Tuned at eps 1e-5; every eps trains at the chosen rate.
    report = check_saved_tuning(tmp_path, "eps", 1e-5, set(TINY.epsilons))
    assert "C14" in report and "hyperparameters" in report
