"""The baselines experiment: its models, and the rows it hands to the data-set table."""

from __future__ import annotations

import pytest
import torch

from batchnorm.lab.data.mnist1d import PUBLISHED_ACCURACY
from batchnorm.lab.experiments.baselines import (
    MODELS,
    PUBLISHED_NAME,
    BaselinesConfig,
    GRUClassifier,
    LogisticRegression,
    analyze,
    plan,
)
from tests.lab.synthetic import result


def test_every_model_is_named_as_its_published_row():
    assert {PUBLISHED_NAME[model] for model in MODELS} <= set(PUBLISHED_ACCURACY)


@pytest.mark.parametrize("model", [LogisticRegression(40, 10), GRUClassifier(10, hidden=8)])
def test_models_read_mnist1d_signals(model):
    signals = torch.randn(5, 1, 1, 40)
    logits = model(signals)
    assert logits.shape == (5, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_gru_reads_the_signal_in_order():
    """A GRU is no bag of values: reversing the signal changes its output."""
    torch.manual_seed(0)
    model, signal = GRUClassifier(10, hidden=8), torch.randn(1, 1, 1, 40)
    assert not torch.allclose(model(signal), model(signal.flip(-1)))


def test_analysis_hands_each_models_mean_test_accuracy_to_the_table():
    config = BaselinesConfig(models=("logistic", "gru"))
    accuracy = {"logistic": 0.3, "gru": 0.6}
    runs = [{"params": {**params, "learning_rate": 0.1},
             "result": {**result(accuracy[params["model"]] + 0.01 * params["seed"],
                                 params["seed"]), "data": "MNIST-1D"}}
            for params in plan(config, [0, 1, 2])]
    analysis = analyze(config, runs)
    assert analysis.findings == []
    means = {baseline.model: baseline.accuracy for baseline in analysis.baselines}
    assert set(means) == {"logistic regression", "GRU"}
    assert means["GRU"] > means["logistic regression"] + 20
    assert all(baseline.seeds == 3 for baseline in analysis.baselines)
    assert analysis.tables and len(analysis.tables[0].rows) == 2
