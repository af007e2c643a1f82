"""A training batch with one value per channel: refused by default, as torch refuses it; with
``module.single_sample = "running"``, normalized with the running statistics (as eval does),
which stay unchanged, on every module that keeps them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchnorm
from tests.conftest import assert_close

TORCH_CLASS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
MODULES = {
    "BatchNorm1d": (lambda c: batchnorm.BatchNorm1d(c), None),
    "BatchNorm2d": (lambda c: batchnorm.BatchNorm2d(c), None),
    "BatchNorm3d": (lambda c: batchnorm.BatchNorm3d(c), None),
    "BatchRenorm1d": (lambda c: batchnorm.BatchRenorm1d(c), None),
    "GhostBatchNorm1d": (lambda c: batchnorm.GhostBatchNorm1d(c, virtual_batch_size=4), None),
    "SyncBatchNorm": (lambda c: batchnorm.SyncBatchNorm(c), None),
    # unlinked: a batch of one never reaches the window (its training is in its own tests)
    "CrossIterationBatchNorm1d": (lambda c: batchnorm.CrossIterationBatchNorm1d(c, window=2),
                                  None),
    "BatchNormAct1d relu": (lambda c: batchnorm.BatchNormAct1d(c), torch.relu),
    "BatchNormAct2d leaky in place": (
        lambda c: batchnorm.BatchNormAct2d(c, activation="leaky_relu", inplace=True),
        F.leaky_relu,
    ),
}
SHAPES = {"BatchNorm1d": [(1, 3), (1, 3, 1)], "BatchNorm2d": [(1, 3, 1, 1)],
          "BatchNorm3d": [(1, 3, 1, 1, 1)], "BatchRenorm1d": [(1, 3)],
          "GhostBatchNorm1d": [(1, 3)], "CrossIterationBatchNorm1d": [(1, 3)],
          "SyncBatchNorm": [(1, 3, 1), (1, 3, 1, 1)],
          "BatchNormAct1d relu": [(1, 3)], "BatchNormAct2d leaky in place": [(1, 3, 1, 1)]}
CASES = [(name, shape) for name in MODULES for shape in SHAPES[name]]


def _module(name, seed=0):
    make, activation = MODULES[name]
    module = make(3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.rand(3, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(3, generator=generator))
        module.running_mean.copy_(torch.randn(3, generator=generator))
        module.running_var.copy_(torch.rand(3, generator=generator) + 0.5)
        module.num_batches_tracked.fill_(7)
    return module, (activation or (lambda t: t))


def _torch_eval(module, activation, shape):
    theirs = TORCH_CLASS[len(shape)](3)
    theirs.load_state_dict({k: v for k, v in module.state_dict().items()
                            if not k.startswith("history")})  # cross-iteration's own state
    return theirs.eval(), activation


def _forward_and_grads(module, x, grad, activation=None):
    leaf = x.clone().requires_grad_(True)
    y = module(leaf * 1)
    if activation is not None:
        y = activation(y)
    return (y.detach(), *torch.autograd.grad(y, [leaf, module.weight, module.bias], grad))


@pytest.mark.parametrize("name, shape", CASES)
def test_one_value_per_channel_is_refused_by_default_as_torch_refuses_it(name, shape):
    module, _ = _module(name)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="more than 1 value per channel") as caught:
        module(x)
    assert isinstance(caught.value, RuntimeError)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        TORCH_CLASS[len(shape)](3)(x)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name, shape", CASES)
def test_single_sample_running_normalizes_with_the_running_statistics(name, shape):
    """Output and gradients equal torch's layer in eval with the same state; the running
    statistics and num_batches_tracked stay as they were; the module stays in training."""
    module, activation = _module(name)
    module.single_sample = "running"
    before = {k: v.clone() for k, v in module.state_dict().items()}
    theirs, activation = _torch_eval(module, activation, shape)
    x, grad = torch.randn(shape), torch.randn(shape)
    mine = _forward_and_grads(module, x, grad)
    expected = _forward_and_grads(theirs, x, grad, activation)
    for a, b in zip(mine, expected, strict=True):
        assert_close(a, b, torch.float32)
    assert module.training
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", [n for n in MODULES if not n.startswith("CrossIteration")])
def test_single_sample_running_leaves_larger_batches_to_batch_statistics(name):
    """Two values per channel (a batch of two, or one sample with two positions) train as
    usual: the option changes nothing there."""
    shape = SHAPES[name][-1]
    for larger in ((2, *shape[1:]), (1, 3, 2, *shape[3:]) if len(shape) > 2 else (2, 3)):
        plain, _ = _module(name)
        option, _ = _module(name)
        option.single_sample = "running"
        x = torch.randn(larger)
        assert_close(option(x.clone()), plain(x.clone()), torch.float32)
        for key, value in plain.state_dict().items():
            assert torch.equal(option.state_dict()[key], value), key
        assert int(option.num_batches_tracked) == 8


def test_a_mask_with_one_valid_value_uses_the_running_statistics():
    module, _ = _module("BatchNorm1d")
    module.single_sample = "running"
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(2, 3, 4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    theirs, _ = _torch_eval(module, None, x.shape)
    assert_close(module(x, mask), theirs(x), torch.float32)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    mask[0, 0] = True  # two valid values: batch statistics again, as without the option
    reference = batchnorm.BatchNorm1d(3)
    reference.load_state_dict(before)
    assert_close(module(x, mask), reference(x, mask), torch.float32)
    assert_close(module.running_var, reference.running_var, torch.float32)
    assert int(module.num_batches_tracked) == 8


def test_without_running_statistics_the_batch_is_still_refused():
    module = batchnorm.BatchNorm1d(3, track_running_stats=False)
    module.single_sample = "running"
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3))


@pytest.mark.parametrize("value", ["eval", None, True])
def test_a_bad_choice_is_refused_before_anything_changes(value):
    module, _ = _module("BatchNorm1d")
    module.single_sample = value
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="expected single_sample 'error' or 'running'"):
        module(torch.randn(4, 3))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
