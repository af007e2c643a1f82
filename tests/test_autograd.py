"""gradcheck and gradgradcheck in float64: the closed-form backward and the double backward."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from batchnorm.functional import batch_norm, batch_norm_pure


def _inputs(shape, affine, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    c = shape[1]
    weight = (torch.rand(c, generator=generator, dtype=torch.float64) + 0.5) if affine else None
    bias = torch.randn(c, generator=generator, dtype=torch.float64) if affine else None
    tensors = [t.requires_grad_(True) for t in (x, weight, bias) if t is not None]
    return x, weight, bias, tensors


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 3, 2), (2, 2, 2, 2, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(shape, affine, training):
    x, weight, bias, tensors = _inputs(shape, affine)
    c = shape[1]
    running_mean = torch.randn(c, dtype=torch.float64)
    running_var = torch.rand(c, dtype=torch.float64) + 0.5

    def fn(*args):
        x_, w_, b_ = (list(args) + [None, None])[:3] if affine else (args[0], None, None)
        # The pure form: gradcheck calls fn many times and must not move the statistics.
        return batch_norm_pure(x_, running_mean, running_var, w_, b_, training=training)[0]

    assert gradcheck(fn, tensors)
    assert gradgradcheck(fn, tensors)


def test_gradient_penalty_matches_autograd_through_plain_ops():
    """A gradient penalty (double backward) equals the one from a plain-ops implementation."""
    x, weight, bias, _ = _inputs((6, 3, 4), True, seed=5)

    def plain(x_, w_, b_):
        mean = x_.mean(dim=(0, 2), keepdim=True)
        var = x_.var(dim=(0, 2), unbiased=False, keepdim=True)
        return (x_ - mean) / torch.sqrt(var + 1e-5) * w_.view(1, -1, 1) + b_.view(1, -1, 1)

    def penalty(forward):
        y = forward(x, weight, bias)
        (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        return torch.autograd.grad((gx**2).sum(), [x, weight, bias])

    ours = penalty(lambda a, b, c: batch_norm(a, None, None, b, c, training=True))
    expected = penalty(plain)
    for o, e in zip(ours, expected, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-8, atol=1e-10)
