"""Smooth activations (silu, gelu) around a backend's fused batch norm entry points.

Kernels fuse the activations that are a select per value (identity, ReLU). silu and gelu are
applied by torch's vectorized operators around them instead: in place on the kernel's output
(in the compute dtype) in the forward, and on the pre-activation recomputed from the input in
the backward, so no second tensor is stored. Computed inside the CPU kernels, one exp or erf at a
time, they made the layer 4-10x slower than torch's batch norm followed by the activation; this
way 0.6-1.5x (training step, ``compare`` with 9 rounds, shapes from 256x1024 to 8x64x56x56).

A backend's ``forward``/``backward`` call :func:`forward`/:func:`backward` here for these
activations, handing themselves in; the plain batch norm does the rest.
"""

from __future__ import annotations

import torch

ACTIVATIONS = {
    "silu": (lambda z: torch.nn.functional.silu(z, inplace=True),
             lambda grad, z: torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=z)),
    "gelu": (torch.ops.aten.gelu_,
             lambda grad, z: torch.ops.aten.gelu_backward.grad_input(grad, z, grad_input=z)),
}


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def forward(fused_forward, x, weight, bias, eps, activation, mean, variance, residual):
    """``activation(BN(x) [+ residual])`` and the batch statistics, from ``fused_forward``."""
    z, batch_mean, batch_var = fused_forward(
        x, weight, bias, eps, mean=mean, variance=variance, residual=residual, compute_dtype=True
    )
    ACTIVATIONS[activation][0](z)
    return _in_dtype(z, x.dtype), batch_mean, batch_var


def backward(fused_forward, fused_backward, grad_out, x, mean, variance, weight, bias, eps,
             needs, train, activation, residual, need_residual, checked=False):
    """(dx, dweight, dbias, dresidual): ``g f'(z)`` with ``z = BN(x) [+ r]`` recomputed, then the
    gradients of plain batch norm (``checked`` passed on to ``fused_backward``: the tensors are
    those a common call accepted)."""
    z = fused_forward(x, weight, bias, eps, mean=mean, variance=variance, residual=residual,
                      compute_dtype=True)[0]
    grad = ACTIVATIONS[activation][1](_in_dtype(grad_out, z.dtype), z)
    grad_input, grad_weight, grad_bias, _ = fused_backward(
        grad, x, mean, variance, weight, bias, eps, needs, train=train,
        **({"checked": True} if checked else {}),
    )
    return grad_input, grad_weight, grad_bias, _in_dtype(grad, x.dtype) if need_residual else None
