"""BatchNormAct1d/2d against torch.nn's batch norm followed by the activation, on the fused
kernel path and on the composed (eager) path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import batchnorm
from tests.conftest import assert_close, make_input

TORCH_ACTIVATIONS = {"identity": lambda t: t, "relu": torch.relu, "silu": F.silu, "gelu": F.gelu}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
OURS = {2: batchnorm.BatchNormAct1d, 3: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d}


def _pair(ndim, channels, activation, dtype, seed):
    ours = OURS[ndim](channels, activation=activation, dtype=dtype)
    theirs = TORCH_BN[ndim](channels, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(channels, generator=generator, dtype=dtype) + 0.5)
        ours.bias.copy_(torch.randn(channels, generator=generator, dtype=dtype))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(module, x, residual, grad, activation=None):
    """Output and gradients of input, residual, weight, bias; ``activation`` set for torch."""
    inputs = [x.detach().clone().requires_grad_(True)]
    if residual is not None:
        inputs.append(residual.detach().clone().requires_grad_(True))
    if activation is None:
        y = module(*inputs)
    else:
        y = module(inputs[0])
        if residual is not None:
            y = y + inputs[1]
        y = TORCH_ACTIVATIONS[activation](y)
    grads = torch.autograd.grad(y, [*inputs, module.weight, module.bias], grad)
    return (y.detach(), *grads)


def _check(shape, layout, dtype, activation, with_residual, seed, backend=None):
    ours, theirs = _pair(len(shape), shape[1], activation, dtype, seed)
    x = make_input(shape, dtype, layout, seed=seed, scale=2.0, offset=0.5)
    residual = make_input(shape, dtype, layout, seed=seed + 1) if with_residual else None
    grad = make_input(shape, dtype, layout, seed=seed + 2)
    with batchnorm.use_backend(backend):
        for _ in range(2):  # two training steps: the running statistics are used and updated
            mine = _step(ours, x, residual, grad)
            expected = _step(theirs, x, residual, grad, activation)
            for a, b in zip(mine, expected, strict=True):
                assert_close(a, b, dtype, scale=8)
        if layout == "channels_last":
            assert mine[0].is_contiguous(memory_format=torch.channels_last)
        for key, value in theirs.state_dict().items():
            assert_close(ours.state_dict()[key], value, dtype)
        ours.eval()
        theirs.eval()
        for a, b in zip(_step(ours, x, residual, grad),
                        _step(theirs, x, residual, grad, activation), strict=True):
            assert_close(a, b, dtype, scale=8)
        expected = _step(theirs, x, residual, grad, activation)[0]
        with torch.no_grad():
            y = ours(x, residual) if with_residual else ours(x)
        assert_close(y, expected, dtype)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_matches_torch_batch_norm_then_activation(activation, with_residual, backend):
    _check((4, 6, 5, 7), "channels_last", torch.float32, activation, with_residual, 0, backend)
    _check((4, 6, 35), "contiguous", torch.float64, activation, with_residual, 1, backend)


@given(
    ndim=st.integers(2, 4),
    batch=st.integers(2, 5),
    channels=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 5), min_size=2, max_size=2),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    activation=st.sampled_from(["relu", "silu", "gelu"]),
    with_residual=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_inputs_match_torch(ndim, batch, channels, spatial, layout, dtype, activation,
                                   with_residual, seed):
    if layout == "channels_last" and ndim != 4:
        layout = "contiguous"
    shape = (batch, channels, *spatial[: ndim - 2])
    _check(shape, layout, dtype, activation, with_residual, seed)


def test_large_input_on_the_parallel_kernels():
    _check((4, 16, 40, 40), "contiguous", torch.float32, "relu", True, 3)
    _check((4, 16, 40, 40), "channels_last", torch.float32, "silu", True, 4)
    _check((2, 8, 30, 30), "contiguous", torch.float32, "gelu", False, 5)  # planes over 512


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_double_backward(activation):
    module = batchnorm.BatchNormAct1d(3, activation=activation, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: module(a, b), (x, residual))


def test_state_dict_is_plain_batch_norms():
    fused = batchnorm.BatchNormAct2d(5, activation="gelu")
    plain = nn.BatchNorm2d(5)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    assert "activation=gelu" in repr(fused)


def test_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        batchnorm.BatchNormAct2d(3, activation="tanh")


@pytest.mark.parametrize("shape, layout", [((8, 64, 64, 68), "channels_last"),
                                           ((8400, 257), "contiguous")])
def test_relu_on_gradients_the_kernels_prefetch(shape, layout):
    """Rows inputs over ``PREFETCH_ABOVE_BYTES``: the ReLU backward prefetches the gradient
    rows, which must leave every value as it is."""
    from batchnorm.backends.cpu import kernels

    assert torch.Size(shape).numel() * 4 > kernels.PREFETCH_ABOVE_BYTES
    _check(shape, layout, torch.float32, "relu", False, 6, "cpu")
    _check(shape, layout, torch.float32, "relu", True, 7, "cpu")


RESIDUAL_CASES = {
    # a (C - 1,) vector broadcasts against the last axis when W == C - 1: it must not
    "broadcasting vector": (lambda x: torch.randn(x.shape[1] - 1), ValueError,
                            r"residual of the input's shape \(4, 6, 5, 5\), got shape \(5,\)"),
    "other shape": (lambda x: torch.randn(4, 6, 5, 4), ValueError, r"got shape \(4, 6, 5, 4\)"),
    "integer tensor": (lambda x: torch.ones(x.shape, dtype=torch.int64), TypeError,
                       "floating tensor of the input's shape .*, got a torch.int64 tensor"),
    "number": (lambda x: 1.0, TypeError, "floating tensor of the input's shape .*, got float"),
    "meta device": (lambda x: torch.empty(x.shape, device="meta"), ValueError,
                    "residual on the input's device cpu, got residual on meta"),
}


@pytest.mark.parametrize("case", sorted(RESIDUAL_CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_bad_residual_is_refused_before_anything_changes(case, training, backend):
    make, error, message = RESIDUAL_CASES[case]
    layer = batchnorm.BatchNormAct2d(6).train(training)
    x = torch.randn(4, 6, 5, 5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with batchnorm.use_backend(backend), pytest.raises(error, match=message) as caught:
        layer(x, make(x))
    assert isinstance(caught.value, RuntimeError)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_mask_passed_as_the_residual_is_named():
    layer = batchnorm.BatchNormAct1d(3)
    x, mask = torch.randn(4, 3, 7), torch.ones(4, 7, dtype=torch.bool)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=r"got a torch.bool tensor \(a mask\? this module takes "
                                        "none: its second argument is the residual"):
        layer(x, mask)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_residual_of_another_floating_dtype_promotes_as_torch(backend):
    ours, theirs = _pair(4, 6, "relu", torch.float32, 0)
    x = make_input((4, 6, 3, 3), torch.float32, "contiguous", seed=1)
    residual = make_input((4, 6, 3, 3), torch.float64, "contiguous", seed=2)
    with batchnorm.use_backend(backend):
        y = ours(x, residual)
    expected = torch.relu(theirs(x) + residual)
    assert y.dtype == torch.float64
    assert_close(y, expected, torch.float32)  # the batch norm itself ran in float32
    assert_close(ours.running_var, theirs.running_var, torch.float32)
