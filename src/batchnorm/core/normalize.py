r"""The per-channel normalization and its closed-form gradients (eager torch).

Forward, with batch or population statistics :math:`\mu, \sigma^2`:

.. math::
    \hat x = (x - \mu)\,s, \quad s = \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    y = \gamma \hat x + \beta .

Backward with batch statistics (they depend on :math:`x`), over the :math:`n` values of a channel:

.. math::
    \frac{\partial L}{\partial\beta} = \sum_i g_i, \qquad
    \frac{\partial L}{\partial\gamma} = \sum_i g_i \hat x_i, \qquad
    \frac{\partial L}{\partial x_i} = \gamma s \Big(g_i - \frac{1}{n}\sum_j g_j
        - \hat x_i \frac{1}{n}\sum_j g_j \hat x_j\Big)

where :math:`g = \partial L/\partial y`. With fixed (running) statistics the last term and the
mean of :math:`g` vanish: :math:`\partial L/\partial x_i = \gamma s\, g_i`.

With a mask, the statistics come from the :math:`n` valid positions but every position is
normalized, so the sums over :math:`g` still run over all positions (each output depends on the
statistics), divided by :math:`n`, and only valid inputs receive the two correction terms.

Every function here is written with differentiable torch operations, so autograd can
differentiate the gradient itself (double backward) when the statistics are recomputed from
``x`` inside the graph.
"""

from __future__ import annotations

import torch

from batchnorm.core.context import transforms_active
from batchnorm.core.layout import (
    accumulation_dtype,
    as_channel,
    mask_as_input,
    reduce_dims,
    valid_per_channel,
)
from batchnorm.core.moments import channel_sums, sum_of_products

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def inverse_std(variance: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(variance + eps)


def affine_coefficients(
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale`` and ``shift`` with ``y = x * scale + shift``."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if bias is None:
        return scale, -(mean * scale)
    # bias - mean * scale in one operator (small layers pay per operator, not per value)
    return scale, torch.addcmul(bias.to(scale.dtype), mean.to(scale.dtype), scale, value=-1)


def scale_shift(
    t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``t * scale + shift`` with ``scale`` and ``shift`` broadcast per channel, into ``out``
    when given (which may be ``t`` itself).

    torch's ``addcmul`` does this in one pass, but with two broadcast operands it is only fast
    where the channel axis is innermost in memory (channels_last, (N, C)); on NCHW planes it
    measured 3-5x slower than a multiply followed by an in-place add (8x512x7x7: 51 against
    17 us; 8x1024x14x14: 391 against 135 us), so planes take the two operators.
    """
    if t.dim() == 2 or t.stride(1) == 1:
        return torch.addcmul(shift, t, scale, out=out)
    if out is not None:
        return torch.mul(t, scale, out=out).add_(shift)
    if torch.is_grad_enabled() or transforms_active():
        # out of place: under vmap a batched shift cannot be added in place into an unbatched
        # product (an ensemble over the bias alone)
        return torch.mul(t, scale) + shift
    return torch.mul(t, scale).add_(shift)


def normalize_centred(
    centred: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y = centred * (gamma * invstd) + beta``, from the already centred input.

    ``centred`` is a temporary owned by the caller; outside autograd it is scaled in place (one
    pass and no new allocation, which matters more than the arithmetic on the CPU).
    """
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    scale = as_channel(scale, centred)
    # out of place under autograd (recorded for a double backward) and under a torch.func
    # transform (a write into a temporary that is not batched as its operands are, or an out=
    # argument, has no batching rule: a module vmapped with track_running_stats=False)
    out_of_place = torch.is_grad_enabled() or transforms_active()
    if bias is None:
        y = centred * scale if out_of_place else centred.mul_(scale)
    elif out_of_place:
        y = scale_shift(centred, scale, as_channel(bias.to(centred.dtype), centred))
    else:  # in place (an exact alias of an input is allowed as the output)
        y = scale_shift(centred, scale, as_channel(bias.to(centred.dtype), centred), out=centred)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def apply_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``y = x * scale + shift``, computed in the accumulation dtype, returned in x's."""
    acc = accumulation_dtype(x.dtype)
    if scale.dtype != acc:
        scale, shift = scale.to(acc), shift.to(acc)
    y = scale_shift(x, as_channel(scale, x), as_channel(shift, x))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def gradient_sums(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-channel reductions of the backward: ``(centred, sum g, sum g * (x - mean))``.

    Synchronized batch norm all-reduces the two sums across processes before
    :func:`input_gradient`; the single-process backward uses them as they are.

    With a mask, a padded position whose output received no gradient adds exactly nothing,
    even when it holds a NaN or inf (0 * NaN would be NaN); one whose output was used adds its
    term as any position does.
    """
    acc = accumulation_dtype(x.dtype)
    dims = reduce_dims(x)
    centred = x.to(acc) - as_channel(mean, x)
    sum_grad = channel_sums(grad_out, dims)
    if mask is None:
        sum_grad_centred = sum_of_products(grad_out, centred, dims)
    else:
        counted = mask_as_input(mask) | (grad_out != 0)
        sum_grad_centred = (grad_out * torch.where(counted, centred, 0)).sum(dim=dims)
    return centred, sum_grad, sum_grad_centred


def input_gradient(
    grad_out: torch.Tensor,
    centred: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_grad: torch.Tensor,
    sum_grad_centred: torch.Tensor,
    count: int | torch.Tensor,
    out_dtype: torch.dtype,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dx from the two gradient sums over the ``count`` values the statistics came from."""
    gain = invstd if weight is None else invstd * weight.to(invstd.dtype)
    per_value = gain * (-1.0 / count)  # -gain / n, shared by both terms (fewer small ops)
    centred_coef = as_channel(per_value * sum_grad_centred * (invstd * invstd), centred)
    offset = as_channel(per_value * sum_grad, centred)
    if mask is not None:  # only valid inputs moved the statistics; padding is selected out
        valid = mask_as_input(mask)
        correction = torch.where(valid, torch.where(valid, centred, 0) * centred_coef + offset, 0)
        grad_input = correction + grad_out * as_channel(gain, centred)
    elif torch.is_grad_enabled():  # differentiable form, for double backward
        grad_input = centred * centred_coef + offset + grad_out * as_channel(gain, centred)
    else:  # the same, reusing the centred temporary in place (two fused passes)
        grad_input = scale_shift(centred, centred_coef, offset, out=centred)
        grad_input = grad_input.addcmul_(grad_out, as_channel(gain, centred))
    return grad_input if grad_input.dtype == out_dtype else grad_input.to(out_dtype)


def train_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    mask: torch.Tensor | None = None,
) -> Grads:
    """Gradients for input, weight and bias when the statistics came from this batch."""
    need_input, need_weight, need_bias = needs
    centred, sum_grad, sum_grad_centred = gradient_sums(grad_out, x, mean, mask)
    grad_weight = sum_grad_centred * invstd if (need_weight and weight is not None) else None
    grad_bias = sum_grad if need_bias else None
    grad_input = None
    if need_input:
        count = valid_per_channel(x, mask)
        grad_input = input_gradient(
            grad_out, centred, invstd, weight, sum_grad, sum_grad_centred, count, x.dtype, mask
        )
    return grad_input, grad_weight, grad_bias


def eval_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
) -> Grads:
    """Gradients for input, weight and bias when the statistics were fixed (running ones)."""
    need_input, need_weight, need_bias = needs
    acc = accumulation_dtype(x.dtype)
    dims = reduce_dims(x)
    grad_input = grad_weight = grad_bias = None
    if need_input:
        gain = invstd if weight is None else invstd * weight.to(acc)
        grad_input = (grad_out * as_channel(gain.to(acc), x)).to(x.dtype)
    if need_weight and weight is not None:
        centred = x.to(acc) - as_channel(mean.to(acc), x)
        grad_weight = sum_of_products(grad_out, centred, dims) * invstd.to(acc)
    if need_bias:
        grad_bias = channel_sums(grad_out, dims)
    return grad_input, grad_weight, grad_bias

