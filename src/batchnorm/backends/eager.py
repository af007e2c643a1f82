"""The eager torch backend: composes ``batchnorm.core`` from ordinary torch operations.

Runs on every device and dtype; it is also the path autograd differentiates for double backward.
"""

from __future__ import annotations

import torch

from batchnorm.core import normalize
from batchnorm.core.moments import centred_moments
from batchnorm.core.running import updated_running_stats  # noqa: F401 - the interface

name = "eager"
supports_mask = True


def supports(x: torch.Tensor) -> bool:
    return True


def train_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, variance, centred = centred_moments(x, mask)
    invstd = normalize.inverse_std(variance, eps)
    y = normalize.normalize_centred(centred, invstd, weight, bias, x.dtype)
    return y, mean, variance


def eval_forward(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    invstd = normalize.inverse_std(variance, eps)
    scale, shift = normalize.affine_coefficients(mean, invstd, weight, bias)
    return normalize.apply_affine(x, scale, shift)


def train_backward(grad_out, x, mean, variance, weight, eps, needs, mask=None):
    invstd = normalize.inverse_std(variance, eps)
    return normalize.train_backward(grad_out, x, mean, invstd, weight, needs, mask)


def eval_backward(grad_out, x, mean, variance, weight, eps, needs):
    invstd = normalize.inverse_std(variance, eps)
    return normalize.eval_backward(grad_out, x, mean, invstd, weight, needs)
