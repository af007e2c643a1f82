"""C12, inference: the running averages kept at several momenta from one run equal those of layers
built with each momentum; each way of scoring a network gives the known answer on hand-built
models; the findings give the four verdicts on synthetic runs; the learning rate is chosen on the
validation part at the reference batch and trains every main run; the experiment runs end to
end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.experiments import EXPERIMENTS, inference
from batchnorm.lab.experiments.base import TUNING_SEEDS
from batchnorm.lab.experiments.inference import (
    CUMULATIVE,
    DEFAULT_MOMENTUM,
    EXPERIMENT,
    InferenceConfig,
    RunningStatistics,
    batch_norms,
    batch_statistics_correct,
    fold_comparison,
    fold_note,
    momentum_key,
    with_precise_statistics,
)
from batchnorm.lab.models import MLP
from batchnorm.lab.stats import encode_correct
from batchnorm.lab.suite import run_suite
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS, TEST_SIZE, VALIDATION_SIZE, jitter, outcome
from tests.lab.tuning_checks import check_saved_tuning, trained_at, tuning_runs

EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}


# ---- Running averages at several momenta ------------------------------------------------------


def _train_steps(model: nn.Module, steps: int = 6) -> None:
    generator = torch.Generator().manual_seed(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        inputs = torch.randn(8, 6, generator=generator) * 3 + 1
        labels = torch.randint(0, 3, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_one_run_keeps_the_running_averages_of_every_momentum():
    torch.manual_seed(0)
    model = MLP(6, 3, depth=2, width=5, norm="batch")
    twins = {momentum: copy.deepcopy(model) for momentum in (0.01, 0.5, None)}
    tracker = RunningStatistics(model, list(twins))
    _train_steps(model)
    tracker.close()
    for momentum, twin in twins.items():
        for layer in batch_norms(twin):
            layer.momentum = momentum  # the momentum does not change training, only these
        _train_steps(twin)
        kept = tracker.statistics(momentum)
        for ours, theirs in zip(batch_norms(model), batch_norms(twin), strict=True):
            mean, var = kept[ours]
            torch.testing.assert_close(mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(var, theirs.running_var, rtol=1e-5, atol=1e-6)
    # The layers' own momentum (0.1) was not tracked; 0.5 differs from it.
    assert tracker.largest_difference_from_layers(0.5) > 1e-3


def test_running_averages_ignore_eval_inputs_and_use_restores_the_layers():
    torch.manual_seed(0)
    model = MLP(6, 3, depth=1, width=4, norm="batch")
    tracker = RunningStatistics(model, [0.1, 0.9])
    _train_steps(model, steps=3)
    before = {m: [t.clone() for t in tracker.statistics(m)[batch_norms(model)[0]]]
              for m in (0.1, 0.9)}
    model.eval()
    model(torch.randn(4, 6) * 10)  # eval inputs are not recorded
    for momentum, saved in before.items():
        for kept, old in zip(tracker.statistics(momentum)[batch_norms(model)[0]], saved,
                             strict=True):
            assert torch.equal(kept, old)
    assert tracker.largest_difference_from_layers(0.1) < 1e-6  # the layers' own momentum
    layer = batch_norms(model)[0]
    own = layer.running_mean.clone()
    with tracker.use(0.9):
        assert torch.equal(layer.running_mean, tracker.statistics(0.9)[layer][0])
    assert torch.equal(layer.running_mean, own)
    assert momentum_key(None) == CUMULATIVE and momentum_key(0.01) == "0.01"


# ---- The ways of scoring a network ------------------------------------------------------------


def _normalizing_model() -> nn.Module:
    """Logits = the batch-normalized input (two features, weight 1, bias 0)."""
    return nn.Sequential(batchnorm.BatchNorm1d(2))


def test_batch_statistics_normalize_each_test_batch_by_its_own_statistics():
    model = _normalizing_model().eval()
    # Feature 0 of (5, 7) normalizes to (-1, +1) within the batch, feature 1 to 0: the 7 is
    # class 0 and the 5 class 1. With the running statistics (mean 0, variance 1) the logits are
    # the inputs themselves, so both are class 0.
    inputs = torch.tensor([[5.0, 0.0], [7.0, 0.0]])
    labels = torch.tensor([1, 0])
    correct = batch_statistics_correct(model, inputs, labels, batch_size=2, seed=0)
    assert correct.tolist() == [True, True]
    with torch.no_grad():
        assert (model(inputs).argmax(1) == labels).tolist() == [False, True]
    # Nothing of the model changed, and it is still in eval mode.
    assert not model.training
    assert torch.equal(model[0].running_mean, torch.zeros(2))
    assert int(model[0].num_batches_tracked) == 0
    # Three examples in batches of two: the last (single) example joins the batch before.
    three = torch.tensor([[5.0, 0.0], [7.0, 0.0], [6.0, 0.0]])
    result = batch_statistics_correct(model, three, torch.tensor([1, 0, 1]), 2, seed=1)
    assert result.shape == (3,)


def test_precise_statistics_are_those_of_the_data():
    model = _normalizing_model()
    data = torch.randn(300, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([3.0, -1.0])
    precise = with_precise_statistics(model, data, batch_size=64)
    torch.testing.assert_close(precise[0].running_mean, data.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(precise[0].running_var, data.var(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(model[0].running_mean, torch.zeros(2))  # the original is untouched


def test_folding_changes_the_logits_only_by_rounding():
    torch.manual_seed(1)
    model = MLP(6, 3, depth=2, width=5, norm="batch")
    for layer in batch_norms(model):
        layer.running_mean.uniform_(-2, 2)
        layer.running_var.uniform_(0.5, 3)
    inputs = torch.randn(50, 6)
    comparison = fold_comparison(model, inputs)
    assert comparison["max_logit_difference"] < 1e-5
    assert comparison["changed_predictions"] == 0
    assert comparison["largest_logit"] > 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in comparison["folded"].modules())


# ---- Findings on synthetic runs ---------------------------------------------------------------


def _score(accuracy: float, seed: int, salt: int) -> dict:
    return {"test_accuracy": accuracy, "test_correct": encode_correct(outcome(accuracy, seed,
                                                                              salt))}


def inference_runs(case: str, config: InferenceConfig | None = None) -> list[dict]:
    """Runs whose train-mode gap (eval minus training mode) and estimate gap (exact minus running
    averages) at the small batch are both ``gap`` pp, with per-seed scatter; threshold 4.5 pp."""
    config = config or InferenceConfig()
    gap, scatter = {"supported": (12.0, 2.0), "flipped": (-12.0, 2.0),
                    "not supported": (0.0, 2.0), "inconclusive": (4.5, 8.0)}[case]
    runs = []
    for seed in SEEDS:
        for size in config.batch_sizes:
            shift = (gap + jitter(seed, scatter)) / 100 if size == min(config.batch_sizes) else 0
            usual = 0.5
            ema = {momentum_key(m): _score(usual - (0.02 if m != 0.1 else 0), seed, 10 + i)
                   for i, m in enumerate(config.momenta)}
            ema["0.1"] = _score(usual, seed, 1)
            params = {"batch_size": size, "seed": seed, "learning_rate": 0.01}
            runs.append({"params": params, "result": {
                "data": "synthetic", "validation_size": VALIDATION_SIZE, "test_size": TEST_SIZE,
                "nonfinite": False,
                "ema": ema,
                "precise": _score(usual + shift, seed, 2),
                "batch_statistics": _score(usual - shift, seed, 3),
                "fold": {"max_logit_difference": 1e-6, "largest_logit": 9.0,
                         "changed_predictions": 0, **_score(usual, seed, 1)},
                "tracking_error": 1e-6,
            }})
    return runs


@pytest.mark.parametrize("case", list(EXPECTED))
def test_inference_findings(case):
    found = EXPERIMENT.findings(InferenceConfig(), inference_runs(case))
    assert [f.claim for f in found] == ["C12", "C12", "C12"]
    train_mode, estimate, growth = found
    for finding in (train_mode, estimate):
        assert finding.verdict == EXPECTED[case], finding
        assert finding.threshold == pytest.approx(4.5) and finding.unit == "pp"
        assert finding.example_se > 0 and finding.seeds == len(SEEDS)
    assert "training mode" in train_mode.measure and "exact population" in estimate.measure
    # The large batch has no gap in these runs, so the gap's growth is the small batch's gap,
    # judged against four accuracies' noise (6.4 pp).
    assert "batch 4 minus the same at batch 64" in growth.measure
    assert growth.threshold == pytest.approx(6.4, abs=0.05) and growth.example_se > 0
    assert growth.effect == pytest.approx(train_mode.effect)
    assert growth.verdict == {"supported": SUPPORTED, "flipped": NOT_SUPPORTED,
                              "not supported": NOT_SUPPORTED,
                              "inconclusive": INCONCLUSIVE}[case], growth


def test_the_gap_against_the_batch_size_reads_both_sizes():
    """A gap as large at batch 64 as at batch 4 does not grow as the batch shrinks (here the
    same gap to the example at both sizes: zero in every seed, a degenerate interval)."""
    runs = inference_runs("supported")
    for run in runs:
        if run["params"]["batch_size"] == 64:
            small = next(other["result"] for other in runs if other["params"] == {
                **run["params"], "batch_size": 4})
            run["result"]["batch_statistics"] = small["batch_statistics"]
            run["result"]["ema"] = small["ema"]
    train_mode, _, growth = EXPERIMENT.findings(InferenceConfig(), runs)
    assert train_mode.verdict == SUPPORTED
    assert growth.effect == pytest.approx(0.0) and growth.verdict == INCONCLUSIVE
    assert growth.degenerate


def test_inference_findings_judge_the_small_batch_only():
    runs = inference_runs("supported")
    # The large batch's numbers play no part: make them say the opposite.
    for run in runs:
        if run["params"]["batch_size"] == 64:
            run["result"]["batch_statistics"] = _score(0.9, run["params"]["seed"], 4)
    train_mode, estimate, _ = EXPERIMENT.findings(InferenceConfig(), runs)
    assert {train_mode.verdict, estimate.verdict} == {SUPPORTED}


def test_inference_analysis_tables_and_figure():
    config = InferenceConfig()
    analysis = EXPERIMENT.analyze(config, inference_runs("supported"))
    titles = [table.title for table in analysis.tables]
    assert len(titles) == 3 and "Folding" in titles[2]
    accuracy, gaps, folding = analysis.tables
    assert [row[0] for row in accuracy.rows] == ["4", "64"]
    assert accuracy.rows[1][len(config.momenta) + 1] == "50.0%"  # exact, large batch
    assert folding.rows[0][3] == "0" and folding.rows[0][4].startswith("+0.0")
    (figure,) = analysis.figures
    assert len(figure.panels) == 2 and "5 seeds" in figure.caption
    assert any("float rounding" in note for note in analysis.notes)


def test_the_fold_note_says_whether_folding_changed_more_than_rounding():
    exact = {"max_logit_difference": 2e-6, "largest_logit": 10.0, "changed_predictions": 0}
    assert fold_note([exact, exact]).startswith("Folding changed nothing beyond float rounding")
    off = {**exact, "max_logit_difference": 0.5, "changed_predictions": 3}
    assert fold_note([exact, off]).startswith("Folding changed more than float rounding")
    assert "3 predictions changed" in fold_note([exact, off])
    assert fold_note([]) == ""


# ---- The learning rate: tuned on validation at the reference batch, held for every run ---------


def test_the_rate_is_tuned_at_the_reference_batch_with_the_default_momentum():
    config = InferenceConfig()
    plan = EXPERIMENT.tuning.plan(config, False)
    assert config.reference_batch == min(config.batch_sizes) == 4
    assert {params["batch_size"] for params in plan} == {4}
    assert sorted({params["learning_rate"] for params in plan}) == sorted(config.tuning_rates)
    assert {params["seed"] for params in plan} == set(TUNING_SEEDS)
    assert len(EXPERIMENT.tuning.plan(InferenceConfig.quick(), True)) == 1
    assert DEFAULT_MOMENTUM == 0.1  # the running averages the tuning score is read with
    choice = EXPERIMENT.tuning.choose(config, tuning_runs(EXPERIMENT, config, best=0.03))
    assert choice == {"learning_rate": {"4": 0.03}}


def test_every_main_run_trains_at_the_chosen_rate(monkeypatch, lab_data):
    config = InferenceConfig()
    choice = EXPERIMENT.tuning.choose(config, tuning_runs(EXPERIMENT, config, best=0.003))
    applied = [EXPERIMENT.tuning.apply(choice, params) for params in EXPERIMENT.plan(config, SEEDS)]
    assert {params["batch_size"] for params in applied} == set(config.batch_sizes)
    assert {params["learning_rate"] for params in applied} == {0.003}
    # ... and a run trains at the rate its parameters carry, with the layers at the default
    # momentum (whose running averages the tuning run was scored with).
    params = {"batch_size": 16, "seed": 0, "learning_rate": 0.037}
    assert trained_at(inference, monkeypatch, TINY, params, lab_data) == [(0.037,
                                                                          {DEFAULT_MOMENTUM})]


def test_a_tuning_run_is_scored_on_validation_only(lab_data):
    result = EXPERIMENT.run(TINY, {"batch_size": 4, "seed": TUNING_SEEDS[0],
                                   "learning_rate": 0.01}, lab_data.without_test(), "cpu")
    json.dumps(result)
    assert len(result["validation_accuracy"]) == 2  # before training and at the end
    assert 0 <= result["validation_accuracy"][-1] <= 1
    assert not any(key.startswith("test") for key in result)


# ---- End to end ----------------------------------------------------------------------------------


TINY = InferenceConfig(steps=12, batch_sizes=(4, 16), tuning_rates=(0.01,), width=8,
                       precise_batch=100)


def test_a_run_gives_every_score_on_real_data(lab_data):
    result = EXPERIMENT.run(TINY, {"batch_size": 4, "seed": 0, "learning_rate": 0.01}, lab_data,
                            "cpu")
    json.dumps(result)  # plain data
    assert set(result["ema"]) == {"0.01", "0.1", "0.5", CUMULATIVE}
    assert result["tracking_error"] < 1e-5
    assert result["fold"]["max_logit_difference"] < 1e-4
    for entry in (*result["ema"].values(), result["precise"], result["batch_statistics"]):
        assert 0 <= entry["test_accuracy"] <= 1
    assert np.isfinite(result["fold"]["largest_logit"])
    # The record's own test figure is the usual inference (the layers' own averages, 0.1).
    assert result["test_accuracy"] == pytest.approx(result["ema"]["0.1"]["test_accuracy"],
                                                    abs=0.01)


@pytest.fixture(scope="module")
def lab_data():
    from batchnorm.lab.data.splits import load_splits

    return load_splits(TINY_DATA)


def test_the_suite_runs_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    run_suite({EXPERIMENT.name: TINY}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, progress=False)
    # Tuned at the smallest batch; every batch size trains at the chosen rate.
    report = check_saved_tuning(tmp_path, "batch_size", 4, set(TINY.batch_sizes))
    assert "C12" in report and "inference" in report
