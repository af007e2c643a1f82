"""Shapes and dtypes: where the channels are and what the statistics are accumulated in.

Batch norm inputs are ``(N, C, *spatial)``. Statistics are per channel, reduced over every
other axis. All helpers here are layout-agnostic: they work for contiguous, channels_last and
arbitrarily strided tensors because they name axes, never strides.
"""

from __future__ import annotations

import torch

CHANNEL_AXIS = 1


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every axis except the channel axis."""
    return (0, *range(2, x.dim()))


def values_per_channel(x: torch.Tensor) -> int:
    """How many values each channel's statistics are computed over: N * prod(spatial)."""
    count = x.shape[0]
    for size in x.shape[2:]:
        count *= size
    return count


def channel_view_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x``: (1, C, 1, ..., 1)."""
    return (1, x.shape[CHANNEL_AXIS]) + (1,) * (x.dim() - 2)


def as_channel(vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) vector to broadcast against ``x`` (an (N, C) input takes it as it is)."""
    if x.dim() == 2:
        return vector
    return vector.reshape(channel_view_shape(x))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of half-precision inputs accumulate in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32



def mask_as_input(mask: torch.Tensor) -> torch.Tensor:
    """A (N, *spatial) validity mask as a (N, 1, *spatial) bool selector against the input.

    Padded positions are excluded by selection (``torch.where``), never by multiplying by the
    mask: a NaN or inf held in padding times 0 is NaN, and would poison every valid statistic,
    output and gradient."""
    return mask.unsqueeze(CHANNEL_AXIS)


def valid_per_channel(x: torch.Tensor, mask: torch.Tensor | None) -> int | torch.Tensor:
    """How many values each channel's statistics use: all of them, or the valid ones."""
    if mask is None:
        return values_per_channel(x)
    return mask.sum(dtype=accumulation_dtype(x.dtype))
