r"""Batch renormalization (Ioffe 2017): batch norm that also works with small or non-i.i.d.
batches by correcting the batch statistics toward the running ones.

In training, with batch statistics :math:`\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and
running statistics :math:`\mu, \sigma = \sqrt{\hat\sigma^2 + \epsilon}`:

.. math::
    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big), \quad
    y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

with :math:`r` and :math:`d` treated as constants in backprop. Since they are constants this is
batch norm with scale :math:`\gamma r` and shift :math:`\gamma d + \beta`, which is how it is
computed: the core normalizes, and only the affine step differs. With :math:`r_{max} = 1` and
:math:`d_{max} = 0` it is exactly batch norm. In eval mode it is batch norm with the running
statistics.

The running statistics are torch's: the running mean and the running (unbiased) variance, updated
with momentum, so a checkpoint moves between this and ``torch.nn.BatchNorm*d`` unchanged;
:math:`\sigma` is derived from the running variance.

The limits follow the published schedule by default (:class:`RenormSchedule`): :math:`r_{max} = 1`
and :math:`d_{max} = 0` for a warm-up, then relaxed linearly to 3 and 5. The schedule is driven by
``num_batches_tracked``, which is saved in checkpoints, so a resumed run continues where it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from batchnorm.core import checks
from batchnorm.core.errors import BatchNormTypeError, BatchNormValueError
from batchnorm.core.layout import values_per_channel
from batchnorm.core.moments import batch_moments
from batchnorm.dispatch import running_stats_updater
from batchnorm.functional import (
    Momentum,
    batch_norm_core,
    commit_running_stats,
    normalize_with_batch_statistics,
    validate_arguments,
)
from batchnorm.modules.batchnorm import _BatchNorm


def check_limits(
    r_max: float | torch.Tensor,
    d_max: float | torch.Tensor,
    owner: str,
    device: torch.device | None = None,
) -> None:
    """The clipping limits: finite, ``r_max >= 1`` and ``d_max >= 0`` (below that the clip ranges
    are empty, and torch.clamp would silently return the upper bound). Numbers, or 0-dim real
    tensors on the input's ``device`` or the CPU."""
    for name, limit, lowest in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        value = checks.scalar_value(limit, name, owner, device)
        if value is not None and not (math.isfinite(value) and value >= lowest):
            raise BatchNormValueError(
                f"{owner}: expected a finite {name} >= {lowest:g}, got {name}={value:g}"
            )


@dataclass(frozen=True)
class RenormSchedule:
    """The published relaxation of the limits (Ioffe 2017): held at r_max=1, d_max=0 for
    ``warmup_steps``, then linear to ``r_max`` at ``r_max_steps`` and to ``d_max`` at
    ``d_max_steps``. The limits are checked here, once, so every step's are valid."""

    warmup_steps: int = 5_000
    r_max: float = 3.0
    r_max_steps: int = 40_000
    d_max: float = 5.0
    d_max_steps: int = 25_000

    def __post_init__(self) -> None:
        check_limits(self.r_max, self.d_max, "RenormSchedule")
        for name in ("warmup_steps", "r_max_steps", "d_max_steps"):
            steps = getattr(self, name)
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise BatchNormValueError(
                    f"RenormSchedule: expected {name} as an integer >= 0, got {steps!r}"
                )

    def limits(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at training step ``step`` (a tensor, so it traces under compile)."""
        step = step.to(torch.float64)
        r_span = max(self.r_max_steps - self.warmup_steps, 1)
        d_span = max(self.d_max_steps - self.warmup_steps, 1)
        r_progress = ((step - self.warmup_steps) / r_span).clamp(0.0, 1.0)
        d_progress = ((step - self.warmup_steps) / d_span).clamp(0.0, 1.0)
        return 1.0 + (self.r_max - 1.0) * r_progress, self.d_max * d_progress


def renorm_corrections(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    r_max: float | torch.Tensor,
    d_max: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped corrections r and d (detached: constants for backprop)."""
    batch_std = torch.sqrt(batch_var.detach() + eps)
    running_std = torch.sqrt(running_var.to(batch_std.dtype) + eps)
    r_max = torch.as_tensor(r_max, dtype=batch_std.dtype, device=batch_std.device)
    d_max = torch.as_tensor(d_max, dtype=batch_std.dtype, device=batch_std.device)
    r = torch.clamp(batch_std / running_std, 1.0 / r_max, r_max)
    d = (batch_mean.detach() - running_mean.to(batch_std.dtype)) / running_std
    d = torch.clamp(d, -d_max, d_max)
    return r, d


def batch_renorm_core(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: Momentum,
    eps: float,
    r_max: float | torch.Tensor,
    d_max: float | torch.Tensor,
    owner: str = "batch_renorm",
    input_checked: bool = False,
    limits_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Like ``batch_norm_core``: ``(output, new_running_mean, new_running_var, finite)``.

    Every argument is validated once, before anything is computed: here, unless
    ``input_checked`` (the caller, a module, has run ``validate_arguments`` on them), and the
    limits unless ``limits_checked`` (they come from a :class:`RenormSchedule`, valid by
    construction, and reading them would cost a device synchronisation per step)."""
    if training and (running_mean is None or running_var is None):
        raise BatchNormValueError(
            f"{owner}: batch renormalization needs running statistics in training, got None "
            "(use track_running_stats=True)"
        )
    if not input_checked:
        validate_arguments(
            input, running_mean, running_var, weight, bias, training or running_mean is None,
            momentum, eps, owner, None,
        )
    if not limits_checked:
        check_limits(r_max, d_max, owner, input.device)
    if not training or input.numel() == 0:  # eval, or nothing to correct
        return batch_norm_core(
            input, running_mean, running_var, weight, bias, training, momentum, eps, owner,
            input_checked=True,
        )
    # r and d are constants for backprop, so the batch moments are read once without a graph;
    # the core then normalizes with scale gamma*r and shift gamma*d + beta.
    with torch.no_grad():
        mean, variance = batch_moments(input)
        r, d = renorm_corrections(mean, variance, running_mean, running_var, eps, r_max, d_max)
    scale, shift = (r, d) if weight is None else (weight * r, weight * d)
    if bias is not None:
        shift = shift + bias
    # The running update uses the statistics of the normalizing pass itself, as batch norm's
    # does, so that with r_max=1 and d_max=0 both record the same numbers.
    output, mean, variance = normalize_with_batch_statistics(input, scale, shift, eps)
    update = running_stats_updater(input)
    new_mean, new_var, finite = update(
        running_mean, running_var, mean, variance, momentum, values_per_channel(input)
    )
    return output, new_mean, new_var, finite


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: Momentum = 0.01,
    eps: float = 1e-5,
    r_max: float | torch.Tensor = 3.0,
    d_max: float | torch.Tensor = 5.0,
) -> torch.Tensor:
    """Functional batch renormalization; updates the running statistics in place in training.

    ``r_max`` (finite, >= 1) and ``d_max`` (finite, >= 0) bound the corrections; numbers or 0-dim
    tensors. Every argument is checked before anything is computed or modified.

    Example::

        >>> rm, rv = torch.zeros(4), torch.ones(4)
        >>> y = batch_renorm(torch.randn(2, 4), rm, rv, training=True, r_max=1.5, d_max=0.5)
    """
    output, new_mean, new_var, finite = batch_renorm_core(
        input, running_mean, running_var, weight, bias, training, momentum, eps, r_max, d_max
    )
    commit_running_stats(running_mean, running_var, new_mean, new_var, finite, "batch_renorm")
    return output


class _BatchRenorm(_BatchNorm):
    """Batch renormalization; torch's batch-norm arguments plus ``r_max``, ``d_max`` and
    ``schedule``. Give ``r_max`` and ``d_max`` for constant limits, or leave them None to follow
    ``schedule`` (default: the published :class:`RenormSchedule`). Default momentum 0.01, the
    paper's moving-average rate. ``bias=False`` (keyword-only): a scale without a shift."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        r_max: float | None = None,
        d_max: float | None = None,
        schedule: RenormSchedule | None = None,
        *,
        bias: bool = True,
    ) -> None:
        owner = type(self).__name__
        if not track_running_stats:
            raise BatchNormValueError(
                f"{owner}: batch renormalization corrects toward running statistics, so it "
                "needs track_running_stats=True, got False"
            )
        if (r_max is None) != (d_max is None):
            raise BatchNormValueError(
                f"{owner}: expected r_max and d_max both given (constant limits) or both None "
                f"(a schedule), got r_max={r_max!r}, d_max={d_max!r}"
            )
        if r_max is not None:
            check_limits(r_max, d_max, owner)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.r_max, self.d_max = r_max, d_max
        self.schedule = schedule if schedule is not None or r_max is not None else RenormSchedule()

    def current_limits(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(r_max, d_max) for the next training step."""
        if self.r_max is not None:
            return self.r_max, self.d_max
        return self.schedule.limits(self.num_batches_tracked)

    def _core(self, input, running_mean, running_var, training, momentum, **options):
        if options:
            raise BatchNormTypeError(
                f"{type(self).__name__}: batch renormalization takes no {', '.join(options)}"
            )
        r_max, d_max = self.current_limits()
        parameters = self._parameters
        return batch_renorm_core(
            input, running_mean, running_var, parameters["weight"], parameters["bias"], training,
            momentum, self.eps, r_max, d_max, owner=type(self).__name__, input_checked=True,
            limits_checked=self.r_max is None,  # a schedule's limits are valid by construction
        )

    def extra_repr(self) -> str:
        limits = (
            f"r_max={self.r_max}, d_max={self.d_max}"
            if self.r_max is not None
            else f"schedule={self.schedule}"
        )
        return f"{super().extra_repr()}, {limits}"


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over (N, C) or (N, C, L) input."""

    _allowed_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over (N, C, H, W) input."""

    _allowed_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization over (N, C, D, H, W) input."""

    _allowed_dims = (5,)
