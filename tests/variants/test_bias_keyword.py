"""The keyword-only ``bias=`` (torch 2.13's): ``bias=False`` keeps the scale and drops the shift.

Every variant with affine parameters takes it, and with ``bias=False`` it behaves exactly as with
``bias=True`` and a shift held at zero, has ``bias`` None and no ``bias`` in its state dict, and
exchanges checkpoints with ``torch.nn.BatchNorm*d(..., bias=False)`` under ``strict=True``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm

# name -> (factory taking **kwargs, input shape, torch class with the same state dict, call)
VARIANTS = {
    "renorm": (lambda **kw: batchnorm.BatchRenorm2d(3, r_max=1.5, d_max=0.5, **kw),
               (6, 3, 2, 2), nn.BatchNorm2d),
    "renorm-schedule": (lambda **kw: batchnorm.BatchRenorm1d(3, **kw), (6, 3), nn.BatchNorm1d),
    "ghost": (lambda **kw: batchnorm.GhostBatchNorm1d(3, virtual_batch_size=3, **kw),
              (7, 3, 2), nn.BatchNorm1d),
    "ghost-one": (lambda **kw: batchnorm.GhostBatchNorm3d(3, virtual_batch_size=8, **kw),
                  (4, 3, 2, 2, 2), nn.BatchNorm3d),
    "frozen": (lambda **kw: batchnorm.FrozenBatchNorm2d(3, **kw), (4, 3, 2, 2), nn.BatchNorm2d),
    "sync": (lambda **kw: batchnorm.SyncBatchNorm(3, **kw), (5, 3, 4), nn.BatchNorm1d),
    "act1d": (lambda **kw: batchnorm.BatchNormAct1d(3, activation="silu", **kw), (6, 3),
              nn.BatchNorm1d),
    "act2d": (lambda **kw: batchnorm.BatchNormAct2d(3, **kw), (4, 3, 3, 3), nn.BatchNorm2d),
}


def _run(module, x, grad):
    """Two training steps and one eval step: outputs, input and weight gradients."""
    results = []
    for training in (True, True, False):
        module.train(training)
        xr = x.detach().clone().requires_grad_(True)
        y = module(xr)
        wanted = [xr] + ([module.weight] if isinstance(module.weight, nn.Parameter) else [])
        results += [y.detach(), *torch.autograd.grad(y, wanted, grad)]
    return results


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_bias_is_a_shift_held_at_zero(name, dtype):
    factory, shape, _ = VARIANTS[name]
    without = factory(bias=False, dtype=dtype)
    held = factory(dtype=dtype)
    assert without.bias is None and "bias" not in without.state_dict()
    assert "bias=False" in repr(without)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        held.weight.copy_(torch.rand(3, generator=generator, dtype=dtype) + 0.5)
        held.running_mean.copy_(torch.randn(3, generator=generator, dtype=dtype))
        held.running_var.copy_(torch.rand(3, generator=generator, dtype=dtype) + 0.5)
    if isinstance(held.bias, nn.Parameter):
        held.bias.requires_grad_(False)
    without.load_state_dict({k: v for k, v in held.state_dict().items() if k != "bias"})
    x = torch.randn(shape, generator=generator, dtype=dtype) * 2 + 1
    grad = torch.randn(shape, generator=generator, dtype=dtype)
    for ours, reference in zip(_run(without, x, grad), _run(held, x, grad), strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    for key, value in without.state_dict().items():
        torch.testing.assert_close(value, held.state_dict()[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_checkpoints_move_to_and_from_torch_without_bias(name):
    factory, _, torch_class = VARIANTS[name]
    theirs = torch_class(3, bias=False)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.running_mean.normal_()
    ours = factory(bias=False)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torch_class(3, bias=False)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        ours.load_state_dict(torch_class(3).state_dict(), strict=True)


def test_recurrent_batch_norm_without_bias():
    torch.manual_seed(0)
    without = batchnorm.RecurrentBatchNorm(3, max_steps=2, bias=False, dtype=torch.float64)
    held = batchnorm.RecurrentBatchNorm(3, max_steps=2, dtype=torch.float64)
    held.bias.requires_grad_(False)
    assert without.bias is None and "bias" not in without.state_dict()
    assert "bias=False" in repr(without)
    without.load_state_dict({k: v for k, v in held.state_dict().items() if k != "bias"})
    for t, training in ((0, True), (1, True), (5, True), (5, False)):
        held.train(training)
        without.train(training)
        x = torch.randn(6, 3, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = without(xa, t), held(xb, t)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        ga = torch.autograd.grad(ya.sum(), (xa, without.weight))
        gb = torch.autograd.grad(yb.sum(), (xb, held.weight))
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in without.state_dict().items():
        assert torch.equal(value, held.state_dict()[key]), key
