r"""Per-channel batch moments: the one place in the package where statistics are computed.

For a channel with values :math:`x_1, \dots, x_n` the batch norm statistics are

.. math::
    \mu = \frac{1}{n}\sum_i x_i, \qquad
    \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2 \quad\text{(biased, used to normalize)},

and the running variance is fed the unbiased :math:`\frac{n}{n-1}\sigma^2`.

The variance is computed in two passes over centred values, never as
:math:`E[x^2] - E[x]^2`: for a channel with mean 1e4 and standard deviation 1 in float32 the
latter loses every significant digit (1e8 against a difference of 1), while the centred sum keeps
the relative error near float32's epsilon. Inputs in float16/bfloat16 accumulate in float32 and
float64 inputs in float64.

Partial moments (count, mean, M2 = sum of squared deviations) of disjoint groups combine exactly
with Chan et al.'s pairwise formula (:func:`merge_moments`), which synchronized batch norm and
precise population statistics use to join batches or processes without a second pass.
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
from batchnorm.core.workspace import scratch_like


def centred_moments(
    x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and the centred input ``x - mean`` (in the accumulation dtype).

    The centred tensor is returned because normalizing needs it too: ``(x - mean) * scale + bias``
    is exact where ``x * scale + (bias - mean * scale)`` cancels when |mean| >> std.

    ``mask`` (bool, shape (N, *spatial)) restricts the statistics to the valid positions; the
    centred tensor still covers every position.
    """
    acc = accumulation_dtype(x.dtype)
    dims = reduce_dims(x)
    count = valid_per_channel(x, mask)
    if mask is None:
        mean = channel_sums(x, dims) / count
        centred = x.to(acc) - as_channel(mean, x)
        variance = sum_of_products(centred, centred, dims) / count
        return mean, variance, centred
    valid = mask_as_input(mask)
    mean = torch.where(valid, x, 0).sum(dim=dims, dtype=acc) / count
    centred = x.to(acc) - as_channel(mean, x)
    # padded deviations are selected out as exact zeros (no NaN to differentiate through)
    valid_centred = torch.where(valid, centred, 0)
    variance = (valid_centred * valid_centred).sum(dim=dims) / count
    return mean, variance, centred


# Up to this many samples, one float32 reduction over (N, *spatial) is as exact as planes joined
# in float64 (within 2x, at about one rounding of the sum) and costs less; see channel_sums.
SERIAL_JOIN_MAX_SAMPLES = 8


def channel_sums(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-channel sum of ``t`` over ``dims`` (every axis but the channel's), in the
    accumulation dtype. With more than :data:`SERIAL_JOIN_MAX_SAMPLES` samples, each sample's
    plane is summed in that dtype and the planes are joined in float64, as torch's own CPU
    batch norm does.

    torch's float32 reduction over (N, *spatial) of an NCHW tensor adds the N planes one after
    another in float32, so its error grows with the batch: relative to sum |x| (mean 3, std 1),
    1.2e-7 at N = 8, 2.6e-7 at 64 and 6e-7 at 256 planes of 8x8, against 4-7e-8 for planes
    joined in float64 (that is the final float32 rounding). As a batch norm of (256, 64, 8, 8)
    the single reduction gave 4x torch's error in the output and 8x in the weight gradient; the
    join brings both within 1.4x and 2.5x. It costs two small operators (a reduction over
    (N, C) and a cast), about 2.5 us each on the CPU, which is why small batches keep the single
    reduction. (N, C) inputs (no planes; torch's reduction over rows is accurate there) and
    float64 inputs take one reduction.
    """
    acc = accumulation_dtype(t.dtype)
    if t.dim() == 2 or acc == torch.float64 or t.shape[0] <= SERIAL_JOIN_MAX_SAMPLES:
        return t.sum(dim=dims, dtype=acc)
    planes = t.sum(dim=dims[1:], dtype=acc)  # (N, C): one sum over each sample's plane
    return planes.sum(dim=0, dtype=torch.float64).to(acc)


def sum_of_products(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-channel sum of ``a * b`` (see :func:`channel_sums`); outside autograd, torch.func
    transforms (an ``out=`` argument has no batching rule) and compilation the product goes to
    reused scratch memory."""
    if torch.is_grad_enabled() or transforms_active() or torch.compiler.is_compiling():
        return channel_sums(a * b, dims)
    like = b if b.dtype == torch.promote_types(a.dtype, b.dtype) else a  # the product's dtype
    return channel_sums(torch.mul(a, b, out=scratch_like(like)), dims)


def batch_moments(
    x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of ``x`` (N, C, *), in the accumulation dtype."""
    mean, variance, _ = centred_moments(x, mask)
    return mean, variance


def unbiased(variance: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """Bessel's correction n / (n - 1), for the running variance (count must exceed 1)."""
    return variance * (count / (count - 1))


def merge_moments(
    count_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Join the moments of two disjoint groups (Chan, Golub & LeVeque 1979).

    .. math::
        n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad
        \mu = \mu_a + \delta\,\frac{n_b}{n},\quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n}

    Empty groups (count 0) are neutral: merging with one returns the other unchanged.
    """
    count = count_a + count_b
    safe = torch.clamp(count, min=1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return count, mean, m2


def merge_many(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Join the moments of G groups given as stacked (G, C) tensors (counts may be (G,) or (G, C)).

    Uses the same exact identities as :func:`merge_moments`, in closed form over all groups:
    the pooled mean is count-weighted, and M2 adds each group's spread around the pooled mean.
    """
    if counts.dim() == 1:
        counts = counts.unsqueeze(1).expand_as(means)
    counts = counts.to(means.dtype)
    total = counts.sum(dim=0)
    safe = torch.clamp(total, min=1)
    mean = (counts * means).sum(dim=0) / safe
    deviation = means - mean
    m2 = m2s.sum(dim=0) + (counts * deviation * deviation).sum(dim=0)
    return total, mean, m2
