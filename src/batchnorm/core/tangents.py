r"""Forward-mode derivatives (tangents) of batch norm's output, for ``jvp``.

In training, with :math:`\hat x = (x - \mu)\,s`, :math:`s = (\sigma^2 + \epsilon)^{-1/2}` and the
statistics over the :math:`n` (valid) values of a channel, a tangent :math:`\dot x` moves the
mean by :math:`\overline{\dot x}` and the inverse standard deviation by
:math:`-s^2\,\overline{\hat x \dot x}` (bars are channel means), so

.. math::
    \dot{\hat x} = s\,\big(\dot x - \overline{\dot x} - \hat x\,\overline{\hat x\,\dot x}\big),
    \qquad \dot y = \gamma\,\dot{\hat x} + \dot\gamma\,\hat x + \dot\beta .

With given (running) statistics the normalization is affine in :math:`x`:
:math:`\dot y = \gamma s\,\dot x + \dot\gamma\,\hat x + \dot\beta`; the statistics themselves
are buffers and carry no tangent, as in torch.

Computed with torch operations in the accumulation dtype (float32 for half inputs), so tangents
of any tensor subclass or device follow.
"""

from __future__ import annotations

import torch

from batchnorm.core.layout import accumulation_dtype, as_channel, reduce_dims


def _normalized(x, mean, variance, eps):
    acc = accumulation_dtype(x.dtype)
    invstd = torch.rsqrt(variance.to(acc) + eps)
    return (x.to(acc) - as_channel(mean.to(acc), x)) * as_channel(invstd, x), invstd


def _affine_tangent(normalized_tangent, normalized, weight, weight_tangent, bias_tangent, like):
    """gamma * d(x_hat) + d(gamma) * x_hat + d(beta), in ``like``'s dtype (None: no tangent)."""
    tangent = None
    if normalized_tangent is not None:
        tangent = normalized_tangent
        if weight is not None:
            tangent = tangent * as_channel(weight.to(tangent.dtype), like)
    if weight_tangent is not None:
        term = normalized * as_channel(weight_tangent.to(normalized.dtype), like)
        tangent = term if tangent is None else tangent + term
    if bias_tangent is not None:
        term = as_channel(bias_tangent.to(normalized.dtype), like)
        tangent = term.expand_as(normalized) if tangent is None else tangent + term
    if tangent is None:
        return torch.zeros_like(like)
    return tangent.to(like.dtype)


def train_output_tangent(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    variance: torch.Tensor,
    eps: float,
    x_tangent: torch.Tensor | None,
    weight_tangent: torch.Tensor | None,
    bias_tangent: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output's tangent when the statistics are the batch's own (they move with x)."""
    normalized, invstd = _normalized(x, mean, variance, eps)
    normalized_tangent = None
    if x_tangent is not None:
        dims = reduce_dims(x)
        tangent = x_tangent.to(normalized.dtype)
        if mask is None:
            count = x.numel() // max(x.shape[1], 1)
            valid_tangent, valid_product = tangent, normalized * tangent
        else:  # padded positions are selected out, never multiplied away (they may hold NaN)
            valid = mask.unsqueeze(1)
            count = mask.sum()
            valid_tangent = torch.where(valid, tangent, 0.0)
            valid_product = torch.where(valid, normalized * tangent, 0.0)
        tangent_mean = valid_tangent.sum(dim=dims) / count
        product_mean = valid_product.sum(dim=dims) / count
        normalized_tangent = (
            tangent - as_channel(tangent_mean, x) - normalized * as_channel(product_mean, x)
        ) * as_channel(invstd, x)
    return _affine_tangent(
        normalized_tangent, normalized, weight, weight_tangent, bias_tangent, x
    )


def eval_output_tangent(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    x_tangent: torch.Tensor | None,
    weight_tangent: torch.Tensor | None,
    bias_tangent: torch.Tensor | None,
) -> torch.Tensor:
    """The output's tangent with fixed (running) statistics."""
    normalized, invstd = _normalized(x, mean, variance, eps)
    normalized_tangent = None
    if x_tangent is not None:
        normalized_tangent = x_tangent.to(normalized.dtype) * as_channel(invstd, x)
    return _affine_tangent(
        normalized_tangent, normalized, weight, weight_tangent, bias_tangent, x
    )
