"""Input validation shared by every batch norm in the package.

Each check raises a ``TypeError`` or ``ValueError`` that names what was expected and what came,
and runs before any tensor or buffer is touched, so a rejected call changes nothing.
"""

from __future__ import annotations

import torch

from batchnorm.core.layout import values_per_channel

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOATING_DTYPES:
        raise TypeError(
            f"{what} must have a real floating dtype (float16, bfloat16, float32 or float64), "
            f"got {tensor.dtype}"
        )


def check_input(
    x: torch.Tensor,
    *,
    allowed_dims: tuple[int, ...] | None = None,
    num_features: int | None = None,
    owner: str = "batch_norm",
) -> None:
    """Validate an input of shape (N, C, *spatial).

    ``allowed_dims``: the numbers of dimensions the caller accepts (a module's own rule);
    ``num_features``: the channel count the caller was built for.
    """
    check_floating(x, f"{owner}: input")
    if allowed_dims is not None and x.dim() not in allowed_dims:
        wanted = " or ".join(f"{d}D" for d in allowed_dims)
        raise ValueError(
            f"{owner}: expected {wanted} input, got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if x.dim() < 2:
        raise ValueError(
            f"{owner}: expected input of shape (N, C, *), at least 2D, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"{owner}: expected {num_features} channels (dimension 1 of the input), "
            f"got {x.shape[1]} in input of shape {tuple(x.shape)}"
        )


def check_per_channel(
    vector: torch.Tensor | None, num_channels: int, what: str, owner: str = "batch_norm"
) -> None:
    """A per-channel parameter or statistic: a floating tensor of shape (C,)."""
    if vector is None:
        return
    check_floating(vector, f"{owner}: {what}")
    if vector.dim() != 1 or vector.shape[0] != num_channels:
        raise ValueError(
            f"{owner}: expected {what} of shape ({num_channels},) to match the input's "
            f"{num_channels} channels, got shape {tuple(vector.shape)}"
        )


def check_mask(mask: torch.Tensor | None, x: torch.Tensor, owner: str = "batch_norm") -> None:
    """A validity mask: bool, shaped like the input without its channel axis."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{owner}: expected a bool tensor as mask, got {got}")
    expected = (x.shape[0], *x.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{owner}: expected mask of shape {expected} (the input's shape without the channel "
            f"axis), got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"{owner}: expected mask on {x.device}, got {mask.device}")


def check_batch_statistics_possible(
    x: torch.Tensor, owner: str = "batch_norm", mask: torch.Tensor | None = None
) -> None:
    """Batch statistics need more than one value per channel."""
    if mask is None:
        count = values_per_channel(x)
    elif torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; the count is traced as is
    else:
        count = int(mask.sum())
    if count <= 1:
        what = "value" if mask is None else "valid (unmasked) value"
        raise ValueError(
            f"{owner}: expected more than 1 {what} per channel to compute batch statistics in "
            f"training, got input of shape {tuple(x.shape)} ({count} per channel). The variance "
            "of one value is 0, so every output would equal the bias. Ways out: call .eval() to "
            "use the running statistics, use a larger batch, use GroupNorm or LayerNorm (which "
            "normalize within each sample), or use batch renormalization with running "
            "statistics."
        )


def check_momentum(momentum: float | None, owner: str = "batch_norm") -> None:
    if momentum is None:
        return
    if isinstance(momentum, torch.Tensor):
        return
    if not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{owner}: expected momentum in [0, 1] or None, got {momentum!r}")


def check_eps(eps: float, owner: str = "batch_norm") -> None:
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"{owner}: expected eps >= 0, got {eps!r}")
