r"""Ghost batch norm (Hoffer et al. 2017): a large batch split into "ghost" batches of
``virtual_batch_size`` samples, each normalized with its own statistics; gamma and beta are
shared.

A batch whose size is not a multiple of the virtual size ends with a smaller ghost. A ghost with
a single value per channel cannot be normalized and raises the core's error. With
``virtual_batch_size >= N`` there is one ghost and the result is exactly batch norm.

Running statistics: one update per call, from the ghosts pooled the way they were used. The batch
mean is the count-weighted mean of the ghost means (the mean of the whole batch) and the batch
variance is the count-weighted mean of the ghosts' unbiased variances, i.e. the spread *within*
a ghost that each normalization saw, not the whole batch's spread (which would also count the
differences between ghost means). With one ghost this is exactly batch norm's update.
"""

from __future__ import annotations

import torch

from batchnorm.core import checks
from batchnorm.core.errors import BatchNormTypeError, BatchNormValueError
from batchnorm.core.layout import values_per_channel
from batchnorm.core.moments import unbiased
from batchnorm.dispatch import running_stats_updater
from batchnorm.functional import (
    Momentum,
    batch_norm_core,
    commit_running_stats,
    normalize_with_batch_statistics,
    validate_arguments,
)
from batchnorm.modules.batchnorm import _BatchNorm


def check_virtual_batch_size(virtual_batch_size: int, owner: str) -> None:
    if (
        not isinstance(virtual_batch_size, int)
        or isinstance(virtual_batch_size, bool)
        or virtual_batch_size < 1
    ):
        raise BatchNormValueError(
            f"{owner}: expected a positive integer virtual_batch_size, got {virtual_batch_size!r}"
        )


def ghost_batch_norm_core(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: Momentum,
    eps: float,
    virtual_batch_size: int,
    owner: str = "ghost_batch_norm",
    input_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Like ``batch_norm_core``: ``(output, new_running_mean, new_running_var, finite)``.

    Every argument is validated once, before anything is computed: here, unless
    ``input_checked`` (the caller, a module, has run ``validate_arguments`` on them)."""
    check_virtual_batch_size(virtual_batch_size, owner)
    use_batch_stats = training or running_mean is None
    if not input_checked:
        validate_arguments(
            input, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
            owner, None,
        )
    if not use_batch_stats:
        return batch_norm_core(
            input, running_mean, running_var, weight, bias, False, momentum, eps, owner,
            input_checked=True,
        )
    ghosts = torch.split(input, virtual_batch_size, dim=0)
    if len(ghosts) <= 1:  # one ghost batch (or none) is batch norm, and records the same numbers
        return batch_norm_core(
            input, running_mean, running_var, weight, bias, training, momentum, eps, owner,
            input_checked=True,
        )
    for ghost in ghosts:
        checks.check_batch_statistics_possible(ghost, f"{owner} (a ghost batch of {len(ghost)})")
    outputs, means, variances, counts = [], [], [], []
    for ghost in ghosts:
        output, mean, variance = normalize_with_batch_statistics(ghost, weight, bias, eps)
        count = values_per_channel(ghost)
        outputs.append(output)
        means.append(mean)
        variances.append(unbiased(variance, count))
        counts.append(count)
    output = torch.cat(outputs, dim=0)
    if not training or running_mean is None:
        return output, None, None, None
    total = sum(counts)
    pooled_mean = sum(c * m for c, m in zip(counts, means, strict=True)) / total
    pooled_var = sum(c * v for c, v in zip(counts, variances, strict=True)) / total
    new_mean, new_var, finite = running_stats_updater(input)(
        running_mean, running_var, pooled_mean, pooled_var, momentum
    )
    return output, new_mean, new_var, finite


def ghost_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
) -> torch.Tensor:
    """Functional ghost batch norm; updates the running statistics in place in training."""
    output, new_mean, new_var, finite = ghost_batch_norm_core(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        virtual_batch_size,
    )
    commit_running_stats(running_mean, running_var, new_mean, new_var, finite, "ghost_batch_norm")
    return output


class _GhostBatchNorm(_BatchNorm):
    """Ghost batch norm: torch's batch-norm arguments plus ``virtual_batch_size``, and the
    keyword-only ``bias`` (``bias=False``: a scale without a shift)."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        check_virtual_batch_size(virtual_batch_size, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.virtual_batch_size = virtual_batch_size

    def _core(self, input, running_mean, running_var, training, momentum, **options):
        if options:
            raise BatchNormTypeError(
                f"{type(self).__name__}: ghost batch norm takes no {', '.join(options)}"
            )
        parameters = self._parameters
        return ghost_batch_norm_core(
            input, running_mean, running_var, parameters["weight"], parameters["bias"], training,
            momentum, self.eps, self.virtual_batch_size, owner=type(self).__name__,
            input_checked=True,  # by the module's _validate
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input."""

    _allowed_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input."""

    _allowed_dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, D, H, W) input."""

    _allowed_dims = (5,)
