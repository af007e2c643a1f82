r"""Frozen batch norm for fine-tuning and detection backbones: fixed statistics and affine.

.. math:: y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}}\,\gamma + \beta

with every quantity fixed: ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers,
not parameters, so an optimizer never sees them and ``model.train()`` does not unfreeze them.
Gradients flow to the input. State-dict keys are batch norm's, ``num_batches_tracked`` included,
so a checkpoint moves between frozen and trainable forms unchanged.

Whole models are frozen and unfrozen by ``batchnorm.freeze`` and ``batchnorm.unfreeze``
(``batchnorm.convert``, which imports this module, never the other way round).

Checkpoints of the model zoos' frozen layers (torchvision's ``FrozenBatchNorm2d``, timm's
``FrozenBatchNormAct2d``) have no ``num_batches_tracked``: one loads here with ``strict=True``
(the count starts at 0), and a layer converted from those holds none, so its keys stay theirs.

:class:`FrozenBatchNormWithAct2d` adds an activation and a drop layer as children, the layout of
timm's ``FrozenBatchNormAct2d``.
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm.core.checks import check_construction, check_input
from batchnorm.core.errors import BatchNormValueError
from batchnorm.functional import batch_norm_core, validate_arguments
from batchnorm.tracing import RefusesScripting, is_proxy, record_as_leaf


def _frozen(
    input, running_mean, running_var, weight, bias, eps, owner, input_checked=False
) -> torch.Tensor:
    """Validate once (``input_checked``: a module has applied its own rule to the input), then
    normalize with the fixed statistics (nothing receives a gradient but the input)."""
    if running_mean is None or running_var is None:
        raise BatchNormValueError(
            f"{owner}: expected running_mean and running_var tensors (the fixed statistics), got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    validate_arguments(
        input, running_mean, running_var, weight, bias, False, None, eps, owner, None,
        input_checked=input_checked,
    )
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    output, _, _, _ = batch_norm_core(
        input, running_mean, running_var, weight, bias, training=False, eps=eps, owner=owner,
        input_checked=True,
    )
    return output


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
    return _frozen(input, running_mean, running_var, weight, bias, eps, "frozen_batch_norm")


class _FrozenBatchNorm(RefusesScripting, nn.Module):
    """Fixed statistics and affine, held as buffers. Arguments as for ``torch.nn.BatchNorm*d``
    (``momentum`` and ``track_running_stats`` are kept only for unfreezing), including the
    keyword-only ``bias``: with ``bias=False`` an affine frozen batch norm has a scale but no
    shift, and no ``bias`` in its state dict."""

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
        *,
        bias: bool = True,
    ) -> None:
        check_construction(eps, momentum, type(self).__name__)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        # Kept so that unfreezing restores the original training behaviour.
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = True
        self.register_buffer("weight", torch.ones(num_features, **factory) if affine else None)
        self.register_buffer(
            "bias", torch.zeros(num_features, **factory) if affine and bias else None
        )
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if is_proxy(input):  # torch.fx: one call_module node, as torch's batch norms
            return record_as_leaf(self, input)
        owner = type(self).__name__
        check_input(
            input, allowed_dims=self._allowed_dims, num_features=self.num_features, owner=owner
        )
        buffers = self._buffers
        return _frozen(
            input, buffers["running_mean"], buffers["running_var"], buffers["weight"],
            buffers["bias"], self.eps, owner, input_checked=True,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # A zoo's frozen checkpoint has no count (ours starts at 0); a layer converted from a
        # zoo's frozen class holds none, and ignores one, as that class does.
        key = prefix + "num_batches_tracked"
        if self._buffers.get("num_batches_tracked") is None:
            state_dict.pop(key, None)
        elif key not in state_dict:
            state_dict[key] = torch.zeros_like(self._buffers["num_batches_tracked"])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, affine={self.affine}"
        return text + (", bias=False" if self.affine and self.bias is None else "")


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C) or (N, C, L) input."""

    _allowed_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, H, W) input."""

    _allowed_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, D, H, W) input."""

    _allowed_dims = (5,)


class FrozenBatchNormWithAct2d(FrozenBatchNorm2d):
    """Frozen batch norm over (N, C, H, W), then ``drop`` and ``act`` (child modules, default
    ``nn.Identity()``): ``act(drop(frozen(x)))``, the layout of timm's ``FrozenBatchNormAct2d``
    and the frozen form of ``batchnorm.modules.with_act.BatchNormWithAct2d``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if is_proxy(input):  # one node for the whole layer, activation included
            return record_as_leaf(self, input)
        return self.act(self.drop(super().forward(input)))
