"""Bad input: a clear error naming what was expected and what came, and nothing modified."""

import pytest
import torch

import batchnorm
from batchnorm.functional import batch_norm


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "cls, shape, match",
    [
        (batchnorm.BatchNorm1d, (4, 3, 2, 2), r"expected 2D or 3D input, got 4D"),
        (batchnorm.BatchNorm2d, (4, 3, 5), r"expected 4D input, got 3D"),
        (batchnorm.BatchNorm3d, (4, 3, 5, 5), r"expected 5D input, got 4D"),
        (batchnorm.BatchNorm2d, (4, 5, 2, 2), r"expected 3 channels .* got 5"),
        (batchnorm.BatchNorm1d, (4, 2), r"expected 3 channels .* got 2"),
    ],
)
def test_wrong_shape(cls, shape, match):
    module = cls(3)
    before = _snapshot(module)
    with pytest.raises(ValueError, match=match):
        module(torch.randn(shape))
    _assert_unchanged(module, before)


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.complex64, torch.bool]
)
def test_non_floating_dtype(dtype):
    module = batchnorm.BatchNorm1d(3)
    before = _snapshot(module)
    x = torch.ones(4, 3).to(dtype)
    with pytest.raises(TypeError, match=rf"real floating dtype .* got {dtype}"):
        module(x)
    _assert_unchanged(module, before)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_single_value_per_channel_in_training(shape):
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[len(shape)]
    module = cls(3)
    before = _snapshot(module)
    with pytest.raises(ValueError) as info:
        module(torch.randn(shape))
    message = str(info.value)
    assert "more than 1 value per channel" in message
    for way_out in ("eval()", "larger batch", "GroupNorm", "LayerNorm", "renormalization"):
        assert way_out in message
    _assert_unchanged(module, before)
    module.eval()
    assert module(torch.randn(shape)).shape == shape  # eval mode is fine


def test_functional_mismatched_statistics():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"running_mean of shape \(3,\) .* got shape \(4,\)"):
        batch_norm(x, torch.zeros(4), torch.ones(3), training=True)
    with pytest.raises(ValueError, match=r"weight of shape \(3,\)"):
        batch_norm(x, torch.zeros(3), torch.ones(3), weight=torch.ones(2))
    with pytest.raises(ValueError, match="both given or both None"):
        batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(TypeError, match="running_var must have a real floating dtype"):
        batch_norm(x, torch.zeros(3), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2D"):
        batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        batch_norm([1.0, 2.0], None, None)


def test_functional_error_leaves_running_statistics_untouched():
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError):
        batch_norm(torch.randn(1, 3), running_mean, running_var, training=True)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_bad_momentum_and_eps():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\]"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=1.5)
    with pytest.raises(ValueError, match="eps >= 0"):
        batch_norm(x, torch.zeros(3), torch.ones(3), eps=-1.0)
