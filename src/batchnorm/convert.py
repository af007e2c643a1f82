"""Model-wide conversion between batch-norm forms, keeping parameters and statistics.

``convert(model, to=...)`` replaces every batch norm of a known class by the same-dimensional
class of the target form:

- ``"batchnorm"``: ``batchnorm.BatchNorm{1,2,3}d`` (the default);
- ``"torch"``: ``torch.nn.BatchNorm{1,2,3}d``;
- ``"renorm"``: ``BatchRenorm{1,2,3}d`` (options ``r_max``, ``d_max``, ``schedule``);
- ``"ghost"``: ``GhostBatchNorm{1,2,3}d`` (option ``virtual_batch_size``, required unless the
  source is already a ghost batch norm);
- ``"frozen"``: ``FrozenBatchNorm{1,2,3}d``;
- ``"sync"`` (or ``sync=True``): ``batchnorm.SyncBatchNorm`` (options ``process_group``,
  ``timeout``); ``"torch_sync"``: ``torch.nn.SyncBatchNorm``. Synchronized batch norms convert
  to each other, but not back to a 1d/2d/3d form (they do not record which it was).

Parameters, running statistics, ``num_batches_tracked``, the constructor flags (``bias=False``
included: a scale without a shift stays one, with no ``bias`` in the state dict), device, dtype and
train/eval mode are kept, so outputs in eval mode are equal before and after (and in training
mode too, between forms that compute the same thing).

Only exact classes are converted. A subclass of a batch norm carries behaviour of its own (an
overridden forward, extra state) that a conversion would silently drop; such modules are left in
place and named in a ``UserWarning``.

:func:`freeze` and :func:`unfreeze` are conversions to and from the frozen form. This module is the
whole-model layer: it imports the modules and variants, and none of them imports it.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import torch
from torch import nn

from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.variants.cross_iteration import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
)
from batchnorm.variants.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNorm,
)
from batchnorm.variants.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from batchnorm.variants.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from batchnorm.variants.sync import SyncBatchNorm

FAMILIES: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "batchnorm": (BatchNorm1d, BatchNorm2d, BatchNorm3d),
    "renorm": (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
    "ghost": (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d),
    "frozen": (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d),
    "cross_iteration": (
        CrossIterationBatchNorm1d, CrossIterationBatchNorm2d, CrossIterationBatchNorm3d
    ),
    # Synchronized forms take any number of dimensions: one class serves all three.
    "sync": (SyncBatchNorm,) * 3,
    "torch_sync": (nn.SyncBatchNorm,) * 3,
}
# Options each form's constructor takes beyond torch's batch-norm arguments.
_OPTIONS = {
    "renorm": ("r_max", "d_max", "schedule"),
    "ghost": ("virtual_batch_size",),
    "cross_iteration": ("window", "burn_in"),
    "sync": ("process_group", "timeout"),
    "torch_sync": ("process_group",),
}
_KNOWN: dict[type[nn.Module], tuple[str, int]] = {
    cls: (family, index)
    for family, classes in FAMILIES.items()
    for index, cls in enumerate(classes)
}
# A synchronized batch norm does not say whether it is 1d, 2d or 3d.
_KNOWN[SyncBatchNorm] = ("sync", None)
_KNOWN[nn.SyncBatchNorm] = ("torch_sync", None)


def register_family(name: str, classes, options: tuple[str, ...] = ()) -> None:
    """Add a form (three classes for 1d, 2d, 3d) that ``convert`` can convert to and from."""
    FAMILIES[name] = tuple(classes)
    if options:
        _OPTIONS[name] = options
    for index, cls in enumerate(classes):
        _KNOWN[cls] = (name, index)


def _is_batch_norm_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm))


def _rebuild(module: nn.Module, to: str, index: int | None, options: dict[str, Any]) -> nn.Module:
    if index is None and to not in ("sync", "torch_sync"):
        raise ValueError(
            f"convert: cannot convert {type(module).__name__} to {to!r}: a synchronized batch norm "
            "does not record whether it was 1d, 2d or 3d"
        )
    target = FAMILIES[to][index or 0]
    reference = module.running_mean if module.running_mean is not None else module.weight
    kwargs: dict[str, Any] = {}
    if reference is not None:
        kwargs = {"device": reference.device, "dtype": reference.dtype}
    for option in _OPTIONS.get(to, ()):
        if option in options:
            kwargs[option] = options[option]
        elif hasattr(module, option):
            kwargs[option] = getattr(module, option)
    if to == "ghost" and "virtual_batch_size" not in kwargs:
        raise ValueError(
            "convert: converting to ghost batch norm needs virtual_batch_size=..., got none"
        )
    drops_bias = module.affine and module.bias is None
    takes_bias = "bias" in inspect.signature(target.__init__).parameters
    if drops_bias and takes_bias:
        kwargs["bias"] = False
    replacement = target(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        **kwargs,
    )
    if drops_bias and not takes_bias:  # a form (or a torch) without the keyword: drop it here
        if "bias" in replacement._parameters:
            replacement.register_parameter("bias", None)
        else:
            replacement.register_buffer("bias", None)
    with torch.no_grad():
        replacement.load_state_dict(module.state_dict(), strict=True)
    for name in ("weight", "bias"):
        source, built = getattr(module, name), getattr(replacement, name)
        if isinstance(source, nn.Parameter) and isinstance(built, nn.Parameter):
            built.requires_grad_(source.requires_grad)
    replacement.train(module.training)
    return replacement


def convert(
    model: nn.Module,
    to: str = "batchnorm",
    *,
    filter: str | None = None,
    only: tuple[type[nn.Module], ...] | None = None,
    sync: bool = False,
    **options: Any,
) -> nn.Module:
    """Replace batch norms throughout ``model``; returns the model (converted in place, or a new
    module when ``model`` itself is a batch norm).

    Args:
        model: any module.
        to: the target form (see the module docstring).
        filter: a regular expression; only modules whose qualified name matches (``re.search``)
            are converted.
        only: convert only modules of these classes.
        sync: shorthand for ``to="sync"``: ``batchnorm.SyncBatchNorm`` across processes.
        **options: constructor options of the target form (``virtual_batch_size`` for ghost,
            ``r_max``/``d_max``/``schedule`` for renorm).
    """
    if sync:
        to = "sync"
    if to not in FAMILIES:
        raise ValueError(f"convert: expected to= one of {sorted(FAMILIES)}, got to={to!r}")
    allowed = set(_OPTIONS.get(to, ()))
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"convert: to={to!r} takes options {sorted(allowed) or 'none'}, got {sorted(unknown)}"
        )
    pattern = re.compile(filter) if filter is not None else None
    skipped: list[str] = []

    def selected(module: nn.Module, name: str) -> bool:
        if pattern is not None and not pattern.search(name):
            return False
        return only is None or isinstance(module, only)

    def visit(module: nn.Module, name: str) -> nn.Module:
        known = _KNOWN.get(type(module))
        if known is not None and selected(module, name):
            family, index = known
            if family != to or options:  # same form with new options: rebuilt too
                replacement = _rebuild(module, to, index, options)
                replacement._qualified_name = name or type(module).__name__
                return replacement
            return module
        if known is None and _is_batch_norm_like(module) and selected(module, name):
            skipped.append(f"{name or '<root>'} ({type(module).__qualname__})")
            return module
        for child_name, child in list(module.named_children()):
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    result = visit(model, "")
    if skipped:
        warnings.warn(
            "convert: left these batch norms unchanged because they are subclasses whose own "
            "behaviour a conversion would drop: " + ", ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return result


def freeze(model: nn.Module, filter: str | None = None) -> nn.Module:
    """Replace every batch norm in ``model`` (torch.nn's, ours, renorm, ghost) by its frozen
    form, keeping its statistics and affine. ``filter``: a regular expression; only modules whose
    qualified name matches it (``re.search``) are frozen. Returns the model."""
    return convert(model, to="frozen", filter=filter)


def unfreeze(model: nn.Module, filter: str | None = None) -> nn.Module:
    """Replace every frozen batch norm by a trainable ``batchnorm.BatchNorm*d`` with the same
    statistics and affine (as parameters again). Returns the model."""
    return convert(model, to="batchnorm", filter=filter, only=(_FrozenBatchNorm,))
