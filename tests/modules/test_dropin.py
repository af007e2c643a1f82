"""Drop-in behaviours measured against torch 2.13: empty batches, eps, the exception classes
torch code catches, the class hierarchy helpers look for, and inputs refused before anything
changes."""

import math

import pytest
import torch

import batchnorm
from batchnorm.functional import batch_norm, batch_norm_pure

PAIRS = [
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (0, 3)),
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (0, 3, 5)),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (0, 3, 4, 4)),
    (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d, (0, 3, 2, 2, 2)),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 0, 4)),
]


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_in_training_matches_torch(ours_cls, torch_cls, shape, momentum):
    ours, theirs = ours_cls(3, momentum=momentum), torch_cls(3, momentum=momentum)
    x = torch.randn(shape, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.shape == y_theirs.shape == x.shape and y_ours.dtype == x.dtype
    (y_ours.sum() + 0).backward()
    y_theirs.sum().backward()
    for name in ("weight", "bias"):
        expected = getattr(theirs, name).grad
        actual = getattr(ours, name).grad
        assert actual is not None and torch.equal(actual, expected)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_empty_batch_functional_forms():
    x = torch.randn(0, 4, 3)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    before = (mean.clone(), var.clone())
    assert batch_norm(x, mean, var, training=True).shape == x.shape
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])
    y, new_mean, new_var = batch_norm_pure(x, mean, var, training=True)
    assert y.shape == x.shape and torch.equal(new_mean, mean) and torch.equal(new_var, var)


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.nan])
def test_eps_not_positive_in_training_is_refused_before_any_change(eps):
    module = batchnorm.BatchNorm2d(3)
    if not eps >= 0:  # negative or NaN: refused when the module is built
        with pytest.raises(ValueError, match="eps"):
            batchnorm.BatchNorm2d(3, eps=eps)
        module.eps = eps  # set by hand afterwards: refused at the call
    else:
        module = batchnorm.BatchNorm2d(3, eps=eps)
    before = _state(module)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="eps"):
        module(x)
    with pytest.raises(ValueError, match="eps"):
        batch_norm(x, module.running_mean, module.running_var, training=True, eps=eps)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_eps_zero_in_eval_is_allowed_as_in_torch():
    ours, theirs = batchnorm.BatchNorm2d(3, eps=0.0).eval(), torch.nn.BatchNorm2d(3, eps=0.0).eval()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))


BAD_CALLS = {
    "short running_mean": lambda x: batch_norm(x, torch.zeros(2), torch.ones(3), training=True),
    "short weight": lambda x: batch_norm(x, torch.zeros(3), torch.ones(3), torch.ones(2)),
    "long bias": lambda x: batch_norm(x, None, None, None, torch.ones(4), training=True),
    "meta running_var": lambda x: batch_norm(
        x, torch.zeros(3), torch.ones(3, device="meta"), training=False
    ),
    "meta weight": lambda x: batch_norm(x, None, None, torch.ones(3, device="meta"),
                                        training=True),
    "channels": lambda x: batchnorm.BatchNorm2d(2)(x),
    "integer input": lambda x: batchnorm.BatchNorm2d(3)(x.long()),
    "one value": lambda x: batchnorm.BatchNorm2d(3)(x[:1, :, :1, :1]),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_catchable_as_torch_raises_it(case):
    """For each of these torch raises RuntimeError (or ValueError); ours is both, with our
    message."""
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError) as caught:
        BAD_CALLS[case](x)
    assert isinstance(caught.value, (ValueError, TypeError))
    try:
        BAD_CALLS[case](x)
    except Exception as torch_style:  # noqa: BLE001 - what code written for torch catches
        assert isinstance(torch_style, RuntimeError)


def test_misplaced_buffers_on_modules_raise_instead_of_crashing():
    for training in (True, False):
        module = batchnorm.BatchNorm2d(3).train(training)
        module.running_mean = torch.zeros(3, device="meta")
        with pytest.raises(RuntimeError, match="running_mean"):
            module(torch.randn(4, 3, 2, 2))
        module = batchnorm.BatchNorm2d(3).train(training)
        module.weight = torch.nn.Parameter(torch.ones(2))
        before = _state(module)
        with pytest.raises(RuntimeError, match=r"weight of shape \(3,\)"):
            module(torch.randn(4, 3, 2, 2))
        for key, value in module.state_dict().items():
            if key != "weight":
                assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("momentum", [torch.tensor(2.0), torch.tensor(math.nan), math.nan, -0.1,
                                      torch.ones(3) * 0.1, "0.1"])
def test_bad_momentum_is_refused_before_any_change(momentum):
    mean, var = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="momentum"):
        batch_norm(torch.randn(4, 3), mean, var, training=True, momentum=momentum)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))
    module = batchnorm.BatchNorm1d(3)
    module.momentum = momentum
    with pytest.raises(RuntimeError, match="momentum"):
        module(torch.randn(4, 3))
    assert int(module.num_batches_tracked) == 0
    assert torch.equal(module.running_mean, torch.zeros(3))


def test_tensor_momentum_in_range_is_used():
    mean, var = torch.zeros(3), torch.ones(3)
    x = torch.randn(8, 3)
    batch_norm(x, mean, var, training=True, momentum=torch.tensor(0.5))
    torch.testing.assert_close(mean, x.mean(0) * 0.5)


@pytest.mark.parametrize("ours,theirs", [
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d),
    (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d),
])
def test_subclass_of_torch_class_with_same_state_and_repr(ours, theirs):
    for kwargs in ({}, {"bias": False}, {"affine": False}, {"track_running_stats": False}):
        module, reference = ours(5, **kwargs), theirs(5, **kwargs)
        assert isinstance(module, theirs)
        assert repr(module) == repr(reference)
        assert list(module.state_dict()) == list(reference.state_dict())
        module.load_state_dict(reference.state_dict(), strict=True)
        reference.load_state_dict(module.state_dict(), strict=True)


def test_bias_false_matches_torch_in_training_and_eval():
    ours, theirs = batchnorm.BatchNorm2d(3, bias=False), torch.nn.BatchNorm2d(3, bias=False)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.bias is None and "bias" not in ours.state_dict()
