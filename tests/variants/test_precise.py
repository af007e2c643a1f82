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


def _two_layer_model():
    torch.manual_seed(0)
    # torch's layer and ours: torch's lets a NaN batch into its running statistics even with
    # momentum 0 (0 * NaN), ours keeps them; precise_bn must leave neither with a NaN
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2),
                         batchnorm.BatchNorm1d(2))


def test_a_non_finite_batch_is_skipped_with_a_warning_naming_it():
    model = _two_layer_model()
    model[1].warn_on_nonfinite = True  # a setting of its own, to be kept
    batches = [torch.randn(6, 3) * 2 + i for i in range(4)]
    poisoned = batches[2].clone()
    poisoned[1, 0] = float("nan")
    named = r"batch 2 \(0-based\).* at 1 \(BatchNorm1d\)"
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning, match=named):
        used = precise_bn(model, batches[:2] + [poisoned] + batches[3:], progress=False)
    assert used == 3
    expected = copy.deepcopy(model)
    precise_bn(expected, batches[:2] + batches[3:], progress=False)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    # the layers' own warnings were held back, and the setting is restored
    assert "warn_on_nonfinite" not in vars(model[4]) and not model[4]._warned_nonfinite
    assert model[1].warn_on_nonfinite is True


def test_only_non_finite_batches_change_nothing():
    model = _two_layer_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning):
        with pytest.raises(ValueError, match="at least one batch with finite statistics, got 2"):
            precise_bn(model, [torch.full((4, 3), float("inf")), torch.full((4, 3), float("nan"))],
                       progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_loader_shorter_than_num_batches_warns_how_many_were_used():
    model = nn.Sequential(nn.BatchNorm1d(2))
    batches = [torch.randn(4, 2) + i for i in range(3)]
    with pytest.warns(UserWarning, match=r"num_batches=10.*only 3 batch.*from 3 batch"):
        assert precise_bn(model, batches, num_batches=10, progress=False) == 3
    torch.testing.assert_close(model[0].running_mean, torch.cat(batches).mean(0))


def test_a_padding_mask_restricts_the_statistics_to_valid_positions():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = batchnorm.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x, x[:, 0] > -1.0)

    model = Masked()
    batches = [torch.randn(4, 3, 5) for _ in range(3)]
    precise_bn(model, batches, progress=False)
    valid = torch.cat([b.transpose(1, 2)[b[:, 0] > -1.0] for b in batches])  # (values, C)
    torch.testing.assert_close(model.bn.running_mean, valid.mean(0))
    torch.testing.assert_close(model.bn.running_var, valid.var(0, unbiased=True))
