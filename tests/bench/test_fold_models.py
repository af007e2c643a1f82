"""batchnorm.bench.fold_models: the folded model's latency against the unfolded one's, as built
and converted to ours, on a model the caller gives."""

import pytest
import torch
from torch import nn

from batchnorm.bench import fold_models


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8))
    return model


def test_measure_and_format():
    row = fold_models.measure("tiny", _model(), torch.randn(2, 3, 8, 8), rounds=2)
    assert (row.batch_norms, row.folded, row.input_size) == (2, 1, (2, 3, 8, 8))
    assert row.folded_vs_zoo.rounds == 2 and row.folded_vs_ours.median_ratio > 0
    table = fold_models.format_rows([row])
    assert table.splitlines()[2].startswith("| tiny | 2x3x8x8 | 2 | 1 |")


def test_a_fold_that_changes_outputs_is_not_timed(monkeypatch):
    fold = fold_models.fold

    def wrong_fold(model, return_report):  # folds, then changes what the model computes
        folded, report = fold(model, return_report=True)
        return nn.Sequential(folded, nn.Tanh()), report

    monkeypatch.setattr(fold_models, "fold", wrong_fold)
    with pytest.raises(AssertionError, match="tiny: the folded model's outputs moved"):
        fold_models.measure("tiny", _model(), torch.randn(2, 3, 8, 8), rounds=1)
