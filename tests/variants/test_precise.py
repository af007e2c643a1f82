import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import precise_bn


def test_population_statistics_over_the_concatenated_data():
    torch.manual_seed(0)
    linear = nn.Linear(5, 4)
    model = nn.Sequential(linear, batchnorm.BatchNorm1d(4, momentum=0.3), nn.ReLU(),
                          nn.Linear(4, 3), nn.BatchNorm1d(3))
    batches = [torch.randn(n, 5) * 2 + 1 for n in (7, 3, 12, 5)]  # uneven batch sizes
    model.eval()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    used = precise_bn(model, [(b, torch.zeros(len(b))) for b in batches], progress=False)
    assert used == 4
    data = torch.cat(batches)
    with torch.no_grad():
        first = linear(data)
    torch.testing.assert_close(model[1].running_mean, first.mean(0))
    torch.testing.assert_close(model[1].running_var, first.var(0, unbiased=True))
    # The second layer's inputs are computed in training mode, batch by batch.
    replay = copy.deepcopy(model).train()
    with torch.no_grad():
        second = torch.cat([replay[3](replay[2](replay[1](replay[0](b)))) for b in batches])
    torch.testing.assert_close(model[4].running_mean, second.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[4].running_var, second.var(0, unbiased=True), rtol=1e-4,
                               atol=1e-5)
    assert not model.training and model[1].momentum == 0.3
    for key in ("1.num_batches_tracked", "4.num_batches_tracked"):
        assert torch.equal(model.state_dict()[key], state_before[key])


def test_num_batches_limit_and_empty_input():
    model = nn.Sequential(nn.BatchNorm1d(2))
    batches = [torch.randn(4, 2) + i for i in range(5)]
    assert precise_bn(model, iter(batches), num_batches=2, progress=False) == 2
    torch.testing.assert_close(model[0].running_mean, torch.cat(batches[:2]).mean(0))
    before = model[0].running_mean.clone()
    with pytest.raises(ValueError, match="at least one batch"):
        precise_bn(model, [], progress=False)
    assert torch.equal(model[0].running_mean, before)
