r"""``BatchNormWithAct2d``: batch norm holding its activation and a drop layer as child modules,
:math:`y = \mathrm{act}(\mathrm{drop}(\mathrm{BN}(x)))`, the layout of timm's ``BatchNormAct2d``.

Model zoos (timm first) build their networks from a batch norm that subclasses the plain one, so
its state-dict keys stay a batch norm's, and keeps the activation (``act``) and a regularizer such
as DropBlock (``drop``) as children. ``batchnorm.convert`` turns such layers into this class and
back, with the same children and so the same state-dict keys (an activation with parameters,
such as PReLU, keeps its ``act.weight``).

Where the two children compute an activation our fused layer has (``drop`` is ``nn.Identity``
and ``act`` is ``nn.Identity``, ``nn.ReLU``, ``nn.SiLU``, ``nn.GELU()`` or ``nn.LeakyReLU``), the
forward is :class:`~batchnorm.BatchNormAct2d`'s, fused; ``act`` is then kept for the keys and
the conversion back, and not called. Any other activation (Hardswish, PReLU, tanh-approximated
GELU, a zoo's own class) runs after our batch norm, as the children say. Replacing ``act`` or
``drop`` later is noticed at the next call.

This class is not a ``torch.nn.BatchNorm2d`` (as our ``BatchNormAct2d`` is not): helpers that
rebuild any ``BatchNorm2d`` as a plain one (timm's ``freeze_batch_norm_2d``, detectron2's
``FrozenBatchNorm2d.convert_frozen_batchnorm``) would drop the activation, so they do not
recognise it; ``batchnorm.freeze`` does, and keeps the activation.
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm.backends.traceable import capturing
from batchnorm.modules.batchnorm import _BatchNorm
from batchnorm.modules.norm_act import BatchNormAct2d, check_residual
from batchnorm.tracing import is_proxy, record_as_leaf


def fused_activation(act: nn.Module, drop: nn.Module) -> tuple[str, float | None] | None:
    """``(activation, negative_slope)`` of our fused layer that computes ``act(drop(y))``, or
    None when it has none (only exact torch classes qualify: a subclass may compute anything)."""
    if type(drop) is not nn.Identity:
        return None
    kind = type(act)
    if kind is nn.Identity:
        return "identity", None
    if kind is nn.ReLU:
        return "relu", None
    if kind is nn.SiLU:
        return "silu", None
    if kind is nn.GELU and act.approximate == "none":
        return "gelu", None
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(act.negative_slope)
    return None


class BatchNormWithAct2d(BatchNormAct2d):
    r"""Batch norm over (N, C, H, W), then ``drop`` and ``act`` (child modules).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as for ``BatchNorm2d``.
        act: the activation module (default ``nn.Identity()``).
        drop: the module applied between the batch norm and the activation (default
            ``nn.Identity()``), e.g. DropBlock.
        bias (keyword-only): as for ``BatchNorm2d``.

    ``fused`` tells whether our fused kernel computes ``act`` (see the module docstring).
    A residual, when given, is added before ``drop`` and ``act``.

    Example::

        >>> layer = BatchNormWithAct2d(8, act=nn.SiLU())
        >>> layer.fused, layer.activation
        (True, 'silu')
        >>> BatchNormWithAct2d(8, act=nn.Hardswish()).fused
        False
    """

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
        act = nn.Identity() if act is None else act
        drop = nn.Identity() if drop is None else drop
        activation, slope = fused_activation(act, drop) or ("identity", None)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, activation, device, dtype,
            bias=bias, negative_slope=slope,
        )
        self.drop = drop
        self.act = act
        self._fused_for = (act, drop)
        self.fused = activation != "identity" or type(act) is nn.Identity

    def _adopt_children(self) -> None:
        """Decide the fusion again for children replaced since the last call."""
        act, drop = self._modules["act"], self._modules["drop"]
        activation, slope = fused_activation(act, drop) or ("identity", None)
        self.activation, self.negative_slope = activation, slope
        self.fused = activation != "identity" or type(act) is nn.Identity
        self._fused_for = (act, drop)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if is_proxy(input):
            return record_as_leaf(self, input, *(() if residual is None else (residual,)))
        modules = self._modules
        act, drop = modules["act"], modules["drop"]
        if act is not self._fused_for[0] or drop is not self._fused_for[1]:
            self._adopt_children()
        if self.fused and not capturing():
            return super().forward(input, residual)
        # the children in order; while a graph is captured the plain batch norm, whose
        # operations the graph records (the fused kernel runs outside torch)
        if residual is not None:
            self._check_input_dim(input)
            check_residual(residual, input, type(self).__name__)
        y = _BatchNorm.forward(self, input)
        if residual is not None:
            y = y + residual
        return act(drop(y))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.fused}"
