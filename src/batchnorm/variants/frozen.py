r"""Frozen batch norm for fine-tuning and detection backbones: fixed statistics and affine.

.. math:: y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}}\,\gamma + \beta

with every quantity fixed: ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers,
not parameters, so an optimizer never sees them and ``model.train()`` does not unfreeze them.
Gradients flow to the input. State-dict keys are batch norm's, ``num_batches_tracked`` included,
so a checkpoint moves between frozen and trainable forms unchanged.

:func:`freeze` and :func:`unfreeze` convert whole models (torch.nn's batch norms and ours),
optionally only the modules whose qualified name matches a filter.
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm.core.checks import check_input
from batchnorm.functional import batch_norm_core


def frozen_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Functional frozen batch norm: the fixed statistics and affine, whatever the mode; the
    statistics and affine receive no gradient, the input does."""
    detached = [None if t is None else t.detach() for t in (weight, bias)]
    output, _, _, _ = batch_norm_core(
        input, running_mean, running_var, *detached, training=False, eps=eps,
        owner="frozen_batch_norm",
    )
    return output


class _FrozenBatchNorm(nn.Module):
    _allowed_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        # Kept so that unfreezing restores the original training behaviour.
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = True
        if affine:
            self.register_buffer("weight", torch.ones(num_features, **factory))
            self.register_buffer("bias", torch.zeros(num_features, **factory))
        else:
            self.register_buffer("weight", None)
            self.register_buffer("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_input(
            input,
            allowed_dims=self._allowed_dims,
            num_features=self.num_features,
            owner=type(self).__name__,
        )
        return frozen_batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C) or (N, C, L) input."""

    _allowed_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, H, W) input."""

    _allowed_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, D, H, W) input."""

    _allowed_dims = (5,)


def freeze(model: nn.Module, filter: str | None = None) -> nn.Module:
    """Replace every batch norm in ``model`` (torch.nn's, ours, renorm, ghost) by its frozen
    form, keeping its statistics and affine. ``filter``: a regular expression; only modules whose
    qualified name matches it (``re.search``) are frozen. Returns the model."""
    from batchnorm.convert import convert

    return convert(model, to="frozen", filter=filter)


def unfreeze(model: nn.Module, filter: str | None = None) -> nn.Module:
    """Replace every frozen batch norm by a trainable ``batchnorm.BatchNorm*d`` with the same
    statistics and affine (as parameters again). Returns the model."""
    from batchnorm.convert import convert

    return convert(model, to="batchnorm", filter=filter, only=(_FrozenBatchNorm,))
