import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNorm2d, freeze, unfreeze


def _trained_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), batchnorm.BatchNorm2d(4)))
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6))
    return model


def test_frozen_stays_frozen_under_train_and_passes_gradients():
    model = _trained_model()
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model)
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[3][1], FrozenBatchNorm2d)
    model.train()
    xr = x.clone().requires_grad_(True)
    y = model(xr)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    names = {name for name, _ in model.named_parameters()}
    assert names == {"0.weight", "0.bias", "3.0.weight", "3.0.bias"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_freeze_with_a_filter_and_unfreeze_round_trip():
    model = _trained_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model, filter=r"^3\.")
    assert type(model[1]) is nn.BatchNorm2d and isinstance(model[3][1], FrozenBatchNorm2d)
    unfreeze(model)
    assert type(model[3][1]) is batchnorm.BatchNorm2d
    assert model[3][1].weight.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_frozen_checks_its_input():
    with pytest.raises(ValueError, match="expected 4D input"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        FrozenBatchNorm2d(3)(torch.randn(2, 4, 2, 2))


def test_functional_form_passes_gradient_to_the_input_only():
    from batchnorm.variants.frozen import frozen_batch_norm

    x = torch.randn(4, 3, requires_grad=True)
    weight = torch.rand(3, requires_grad=True)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    y = frozen_batch_norm(x, mean, var, weight, None)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, mean, var, weight))
    y.sum().backward()
    assert x.grad is not None and weight.grad is None


def test_the_functional_form_needs_the_fixed_statistics():
    from batchnorm.variants.frozen import frozen_batch_norm

    with pytest.raises(ValueError, match="expected running_mean and running_var tensors .the "
                                         "fixed statistics., got running_mean=None"):
        frozen_batch_norm(torch.randn(4, 3), None, None)
    with pytest.raises(TypeError, match="weight must have a real floating dtype"):
        frozen_batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3),
                          torch.ones(3, dtype=torch.int64))


class _Shift(nn.Module):
    """A deterministic stand-in for a drop layer (DropBlock's place): adds 1."""

    def forward(self, x):
        return x + 1


def test_frozen_with_an_activation_applies_drop_then_act_and_stays_frozen():
    from batchnorm.variants.frozen import FrozenBatchNormWithAct2d

    torch.manual_seed(0)
    layer = FrozenBatchNormWithAct2d(3, eps=1e-3, act=nn.PReLU(3), drop=_Shift())
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.act.weight.fill_(0.3)
    # the activation's parameter is a key of its own; the batch norm's are buffers
    assert [n for n, _ in layer.named_parameters()] == ["act.weight"]
    assert "act.weight" in layer.state_dict() and "num_batches_tracked" in layer.state_dict()
    x = (torch.randn(4, 3, 2, 2) * 3).requires_grad_(True)
    affine = nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                      layer.bias, eps=1e-3)
    expected = nn.functional.prelu(affine + 1, layer.act.weight)
    for mode in (False, True):  # frozen statistics in training too
        layer.train(mode)
        torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert x.grad is not None and layer.act.weight.grad is not None
