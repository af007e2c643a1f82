"""Masked batch norm for padded sequences: equals batch norm on the valid subset."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
from batchnorm import reference
from batchnorm.functional import batch_norm, batch_norm_pure


def _padded(lengths, channels, steps, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), channels, steps, generator=generator, dtype=dtype) * 2 + 1
    mask = torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def _valid_table(x, mask):
    """The valid positions as a plain (M, C) batch."""
    return x.permute(0, 2, 1)[mask]


@given(
    lengths=st.lists(st.integers(1, 6), min_size=2, max_size=5).filter(lambda ls: sum(ls) >= 2),
    seed=st.integers(0, 1000),
)
def test_equals_batch_norm_on_the_valid_subset(lengths, seed):
    x, mask = _padded(lengths, 3, 6, seed)
    module = batchnorm.BatchNorm1d(3, momentum=0.4, dtype=torch.float64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    x.requires_grad_(True)
    y = module(x, mask)
    # Downstream ignores padded positions: their gradient is zero.
    g = torch.randn_like(x) * mask[:, None, :]
    grads = torch.autograd.grad(y, (x, module.weight, module.bias), g)

    table = _valid_table(x.detach(), mask).requires_grad_(True)
    w = module.weight.detach().clone().requires_grad_(True)
    b = module.bias.detach().clone().requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = F.batch_norm(table, rm, rv, w, b, training=True, momentum=0.4)
    torch.testing.assert_close(_valid_table(y.detach(), mask), expected.detach())
    ref_grads = torch.autograd.grad(expected, (table, w, b), _valid_table(g, mask))
    torch.testing.assert_close(_valid_table(grads[0], mask), ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1])
    torch.testing.assert_close(grads[2], ref_grads[2])
    torch.testing.assert_close(module.running_mean, rm)
    torch.testing.assert_close(module.running_var, rv)


def test_padded_positions_are_normalized_with_the_valid_statistics():
    x, mask = _padded([2, 4, 3], 2, 4, seed=1)
    y = batch_norm(x, None, None, training=True, mask=mask)
    mean, var = reference.moments(x.numpy(), mask.numpy())
    expected = (x.numpy() - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10)


def test_gradients_against_the_reference_with_padded_gradients():
    x, mask = _padded([3, 1, 4], 2, 4, seed=2)
    g = torch.randn_like(x)  # padded positions receive gradient too
    weight = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    y = batch_norm(xr, None, None, weight, None, training=True, mask=mask)
    dx, dw = torch.autograd.grad(y, (xr, weight), g)
    ref_dx, ref_dw, _ = reference.backward_train(
        g.numpy(), x.numpy(), weight.detach().numpy(), 1e-5, mask.numpy()
    )
    np.testing.assert_allclose(dx.numpy(), ref_dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dw.numpy(), ref_dw, rtol=1e-9)
    with batchnorm.use_backend("reference"):
        y_ref = batch_norm(x, None, None, weight.detach(), None, training=True, mask=mask)
    torch.testing.assert_close(y.detach(), y_ref)


def test_gradcheck_and_gradgradcheck_with_mask():
    x, mask = _padded([2, 3, 1], 2, 3, seed=3)
    weight = torch.rand(2, dtype=torch.float64) + 0.5
    bias = torch.randn(2, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, weight, bias)]

    def fn(a, w, b):
        return batch_norm_pure(a, None, None, w, b, training=True, mask=mask)[0]

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_mask_on_two_dimensional_input():
    x = torch.randn(6, 3, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    y = batch_norm(x, None, None, training=True, mask=mask)
    torch.testing.assert_close(y[mask], F.batch_norm(x[mask], None, None, training=True))


def test_bad_masks():
    module = batchnorm.BatchNorm1d(2)
    x = torch.randn(3, 2, 4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected mask of shape \(3, 4\).*got \(3, 2, 4\)"):
        module(x, torch.ones(3, 2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor as mask, got torch.float32"):
        module(x, torch.ones(3, 4))
    only_one = torch.zeros(3, 4, dtype=torch.bool)
    only_one[0, 0] = True
    with pytest.raises(ValueError, match=r"more than 1 valid \(unmasked\) value per channel"):
        module(x, only_one)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_garbage_in_padding_changes_nothing_valid(garbage, backend):
    """Padding is selected out, never multiplied away: NaN, inf or huge values held at padded
    positions leave the valid outputs, the statistics and every gradient exactly as with
    zeros there (downstream ignores padded outputs: their gradient is zero)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=generator) > 0.4
    g = torch.where(mask.unsqueeze(1), torch.randn(4, 3, 6, generator=generator,
                                                    dtype=torch.float64), 0.0)
    results = []
    for fill in (0.0, garbage):
        module = batchnorm.BatchNorm1d(3).double()
        filled = torch.where(mask.unsqueeze(1), x, fill).requires_grad_(True)
        with batchnorm.use_backend(backend):
            y = module(filled, mask)
            grads = torch.autograd.grad(y, (filled, module.weight, module.bias), g)
        valid = mask.unsqueeze(1).expand_as(y)
        results.append((y[valid], grads[0][valid], grads[1], grads[2],
                        module.running_mean.clone(), module.running_var.clone()))
    for clean, dirty in zip(*results, strict=True):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean, rtol=1e-12, atol=1e-12)


def test_garbage_in_padding_with_double_backward():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=generator) > 0.3
    penalties = []
    for fill in (0.0, float("nan")):
        filled = torch.where(mask.unsqueeze(1), x, fill).requires_grad_(True)
        weight = torch.ones(2, dtype=torch.float64, requires_grad=True)
        y = batchnorm.functional.batch_norm(filled, None, None, weight, training=True, mask=mask)
        loss = torch.where(mask.unsqueeze(1), y, 0.0).pow(3).sum()
        (gx,) = torch.autograd.grad(loss, filled, create_graph=True)
        (gw,) = torch.autograd.grad(torch.where(mask.unsqueeze(1), gx, 0.0).pow(2).sum(), weight)
        penalties.append(gw)
    assert torch.isfinite(penalties[1]).all()
    torch.testing.assert_close(penalties[1], penalties[0], rtol=1e-10, atol=1e-12)
