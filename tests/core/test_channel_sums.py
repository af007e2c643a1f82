"""The per-channel sums of the eager path: planes joined in float64 beyond a few samples, which
keeps the error of a large batch at the final rounding where one float32 reduction grows with N."""

from __future__ import annotations

import pytest
import torch

from batchnorm.backends import eager
from batchnorm.backends import reference as exact
from batchnorm.core.layout import reduce_dims
from batchnorm.core.moments import SERIAL_JOIN_MAX_SAMPLES, channel_sums
from tests.conftest import make_input


def _relative_error(sums: torch.Tensor, x: torch.Tensor) -> float:
    dims = reduce_dims(x)
    truth = x.double().sum(dim=dims)
    return ((sums.double() - truth).abs() / x.double().abs().sum(dim=dims)).max().item()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_batch_sums_keep_the_final_rounding(layout):
    # 256 planes of 8x8, mean 3: one float32 reduction measured 6e-7 of sum |x| (NCHW)
    x = make_input((256, 64, 8, 8), layout=layout, seed=3, offset=3.0)
    sums = channel_sums(x, reduce_dims(x))
    assert sums.dtype == torch.float32
    assert _relative_error(sums, x) < 1.2e-7


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((SERIAL_JOIN_MAX_SAMPLES, 5, 4, 4), torch.float32),  # small batch: one reduction
        ((4096, 64), torch.float32),  # rows have no planes
        ((64, 5, 4, 4), torch.float64),
    ],
)
def test_one_reduction_where_joining_gains_nothing(shape, dtype):
    x = make_input(shape, dtype=dtype, seed=1)
    dims = reduce_dims(x)
    assert torch.equal(channel_sums(x, dims), x.sum(dim=dims))


def test_half_input_sums_in_float32():
    x = make_input((32, 6, 5, 5), dtype=torch.bfloat16, seed=2, offset=2.0)
    sums = channel_sums(x, reduce_dims(x))
    assert sums.dtype == torch.float32
    assert _relative_error(sums, x) < 1.2e-7


def test_eager_layer_near_torch_on_a_large_batch():
    """The layer the sums serve: output and parameter gradients of a (256, 64, 8, 8) batch with
    mean 3 against float64, beside torch's batch norm. Measured over four inputs: the output
    1.2-1.7x torch's error, the gradients 0.9-1.2x; with one float32 reduction the output was
    4x."""
    x = make_input((256, 64, 8, 8), seed=5, offset=3.0)
    g = make_input((256, 64, 8, 8), seed=6)
    weight, bias = torch.rand(64, dtype=torch.float32) + 0.5, torch.randn(64)
    y, mean, variance = eager.train_forward(x, weight, bias, 1e-5)
    _, grad_weight, grad_bias = eager.train_backward(
        g, x, mean, variance, weight, 1e-5, (False, True, True)
    )
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_torch = torch.nn.functional.batch_norm(leaves[0], None, None, *leaves[1:], training=True)
    y_torch.backward(g)
    y_exact, _, _ = exact.train_forward(x.double(), weight.double(), bias.double(), 1e-5)
    _, w_exact, b_exact = exact.train_backward(
        g.double(), x.double(), None, None, weight.double(), 1e-5, (False, True, True)
    )
    for ours, theirs, truth in [
        (y, y_torch.detach(), y_exact),
        (grad_weight, leaves[1].grad, w_exact),
        (grad_bias, leaves[2].grad, b_exact),
    ]:
        error = (ours.double() - truth).abs().max().item()
        torch_error = (theirs.double() - truth).abs().max().item()
        assert error <= 2.5 * max(torch_error, 1e-7 * truth.abs().max().item())
