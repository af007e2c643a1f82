"""C11, placement: the equivalence rule gives "placement matters" beyond the margin on either
side, "no practical difference" within it and "inconclusive" across it, and agrees with the
interval of the raw difference; the runs train the placement they name; the experiment runs end
to end."""

from __future__ import annotations

import json

import pytest
import torch

from batchnorm.lab.data.splits import load_splits
from batchnorm.lab.experiments import EXPERIMENTS, base
from batchnorm.lab.experiments import placement as placement_module
from batchnorm.lab.experiments.placement import (
    EXPERIMENT,
    PLACEMENTS,
    PlacementConfig,
    findings,
    run,
)
from batchnorm.lab.stats import accuracy_effect, mean_interval
from batchnorm.lab.suite import run_suite
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS, jitter, result


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train in milliseconds on one thread; on a loaded machine, threads that wait
    for each other make them take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# "flipped" is the supported case with the sign reversed: the claim is two-sided (either
# placement may be the better one), so it stays supported, with the other placement first.
EXPECTED = {"supported": SUPPORTED, "flipped": SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}
CONFIG = PlacementConfig()
TINY = PlacementConfig(models=("mlp", "cnn"), tuning_rates=(0.1,), width=16, widths=(4, 8, 8),
                       mlp_steps=6, cnn_steps=6)


def placement_runs(difference: float, scatter: float, model: str = "mlp") -> list[dict]:
    """Runs whose test accuracy after the activation minus before is ``difference`` pp (plus a
    per-seed scatter)."""
    runs = []
    for seed in SEEDS:
        accuracies = {"before": 0.6,
                      "after": 0.6 + (difference + jitter(seed, scatter)) / 100}
        for salt, placement in enumerate(PLACEMENTS):
            runs.append({"params": {"model": model, "placement": placement, "seed": seed,
                                    "learning_rate": 0.03},
                         "result": result(accuracies[placement], seed, salt=salt)})
    return runs


# The margin for a difference of two accuracies on 1000 examples: 4.5 pp.
CASES = {
    "supported": (15.0, 2.0),
    "flipped": (-15.0, 2.0),
    "not supported": (0.0, 2.0),
    "inconclusive": (4.5, 8.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equivalence_rule(case):
    (finding,) = findings(CONFIG, placement_runs(*CASES[case]))
    assert finding.claim == "C11" and finding.threshold == pytest.approx(4.5)
    assert finding.verdict == EXPECTED[case], finding
    assert finding.effect >= 0  # the better placement on average comes first
    first = "before" if case == "flipped" else "after"
    assert f"BN {first} the activation minus" in finding.measure
    assert "no practical difference" in finding.rule


def raw_equivalence(runs: list[dict], margin: float) -> str:
    """The verdict straight from the interval of after minus before: beyond the margin on one
    side, within plus or minus it, or neither."""
    outcomes = {placement: [] for placement in PLACEMENTS}
    for run_ in sorted(runs, key=lambda r: r["params"]["seed"]):
        outcomes[run_["params"]["placement"]].append(base.test_outcomes(run_["result"]))
    effect = accuracy_effect([(+1.0, outcomes["after"]), (-1.0, outcomes["before"])])
    interval = mean_interval(effect.per_seed, example_se=effect.example_se)
    if interval.low > margin or interval.high < -margin:
        return SUPPORTED
    if -margin < interval.low and interval.high < margin:
        return NOT_SUPPORTED
    return INCONCLUSIVE


@pytest.mark.parametrize("difference", [-12.0, -5.0, -3.0, -1.5, 0.0, 1.5, 3.0, 5.0, 12.0])
@pytest.mark.parametrize("scatter", [1.0, 6.0])
def test_the_oriented_rule_is_the_equivalence_test_of_the_raw_difference(difference, scatter):
    runs = placement_runs(difference, scatter)
    (finding,) = findings(CONFIG, runs)
    assert finding.verdict == raw_equivalence(runs, finding.threshold)


def test_an_interval_reaching_past_minus_the_margin_is_not_no_difference():
    # Before better by 3 pp on average with a wide scatter: the interval of after minus before
    # reaches below -4.5 pp, so "no practical difference" cannot be said.
    runs = placement_runs(-3.0, 6.0)
    (finding,) = findings(CONFIG, runs)
    assert finding.low < 4.5 < finding.high and finding.verdict == INCONCLUSIVE


def test_no_finding_without_both_placements():
    runs = [run_ for run_ in placement_runs(0.0, 2.0) if run_["params"]["placement"] == "after"]
    assert findings(CONFIG, runs) == []


def test_both_placements_get_the_same_tuning_budget():
    tuning = EXPERIMENT.tuning.plan(CONFIG, False)
    by_placement = {placement: sorted((p["learning_rate"], p["seed"]) for p in tuning
                                      if p["placement"] == placement)
                    for placement in PLACEMENTS}
    assert by_placement["before"] == by_placement["after"]
    assert len(by_placement["before"]) == len(CONFIG.tuning_rates) * 2


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_run_trains_the_placement_it_names(model, monkeypatch):
    data = load_splits(TINY_DATA)
    built = []
    real_fit = placement_module.fit

    def recording_fit(builder, *args, **kwargs):
        fitted = real_fit(builder, *args, **kwargs)
        built.append(fitted.model)
        return fitted

    monkeypatch.setattr(placement_module, "fit", recording_fit)
    for where in PLACEMENTS:
        params = {"model": model, "placement": where, "seed": 0, "learning_rate": 0.1}
        saved = run(TINY, params, data, "cpu")
        assert saved["test_size"] == len(data.test) and len(saved["validation_accuracy"]) == 2
        for block in built[-1].hidden if model == "mlp" else built[-1].features:
            kinds = [type(layer).__name__ for layer in block]
            norm = next(index for index, kind in enumerate(kinds) if kind.startswith("BatchNorm"))
            assert (norm < kinds.index("ReLU")) == (where == "before"), kinds


def test_the_experiment_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    config = PlacementConfig(tuning_rates=(0.1,), width=16, mlp_steps=6)
    run_suite({EXPERIMENT.name: config}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, quick=True, progress=False)
    saved = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*")]
    assert len(saved) == 2 + 3 * 2  # one tuning seed at one rate, then 3 seeds x 2 placements
    report = (tmp_path / "report.md").read_text()
    assert "C11" in report and "placement" in report and "no practical difference" in report



def test_the_analysis_shows_the_difference_against_the_margin():
    analysis = EXPERIMENT.analyze(CONFIG, placement_runs(15.0, 2.0))
    expected = 15.0 + sum(jitter(seed, 2.0) for seed in SEEDS) / len(SEEDS)
    (table,) = analysis.tables
    (row,) = table.rows
    assert row[0] == "MLP" and row[1].startswith("60.0%") and row[3] == f"{expected:+.1f} pp"
    (figure,) = analysis.figures
    difference, upper, lower = figure.panels[0].series
    assert difference.y[0] == pytest.approx(expected, abs=0.1)
    assert difference.low[0] < difference.y[0] < difference.high[0]
    assert upper.y == [4.5, 4.5] and lower.y == [-4.5, -4.5]
