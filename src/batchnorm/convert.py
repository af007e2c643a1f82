"""Model-wide conversion between batch-norm forms, keeping parameters and statistics.

``convert(model, to=...)`` replaces every batch norm of a known class by the same-dimensional
class of the target form:

- ``"batchnorm"``: ``batchnorm.BatchNorm{1,2,3}d`` (the default); a frozen layer stays frozen
  (our ``FrozenBatchNorm*d``): :func:`unfreeze` is what makes frozen layers trainable;
- ``"torch"``: ``torch.nn.BatchNorm{1,2,3}d``, or, for a layer that came from a model zoo's own
  class (below), that class again;
- ``"renorm"``: ``BatchRenorm{1,2,3}d`` (options ``r_max``, ``d_max``, ``schedule``);
- ``"ghost"``: ``GhostBatchNorm{1,2,3}d`` (option ``virtual_batch_size``, required unless the
  source is already a ghost batch norm);
- ``"frozen"``: ``FrozenBatchNorm{1,2,3}d``;
- ``"cross_iteration"``: ``CrossIterationBatchNorm{1,2,3}d`` (options ``window``, ``burn_in``);
- ``"sync"`` (or ``sync=True``): ``batchnorm.SyncBatchNorm`` (options ``process_group``,
  ``timeout``); ``"torch_sync"``: ``torch.nn.SyncBatchNorm``. Synchronized batch norms convert
  to each other, but not back to a 1d/2d/3d form (they do not record which it was).

Parameters, running statistics, ``num_batches_tracked``, the constructor flags (``bias=False``
included: a scale without a shift stays one, with no ``bias`` in the state dict), device, dtype and
train/eval mode are kept, so outputs in eval mode are equal before and after (and in training
mode too, between forms that compute the same thing).

Model zoos' classes, recognised by their qualified names (neither zoo is imported here):

- timm's ``BatchNormAct2d`` (a batch norm holding an ``act`` and a ``drop`` child) becomes
  ``batchnorm.modules.with_act.BatchNormWithAct2d`` with the same children, so the same
  state-dict keys; our fused kernel computes the activation where we have it (ReLU, SiLU, GELU,
  leaky ReLU, identity), any other runs after our batch norm. timm's ``FrozenBatchNormAct2d``
  becomes our ``FrozenBatchNormWithAct2d``, torchvision's ``FrozenBatchNorm2d`` our
  ``FrozenBatchNorm2d`` (neither has a ``num_batches_tracked``, nor do the converted layers);
- ``to="torch"`` gives back the zoo's own class, of the same kind (frozen or not: a frozen timm
  layer returns as timm's ``FrozenBatchNormAct2d``), with the same children and outputs.
  Freezing or unfreezing in between moves to the zoo's class of the other kind where it has one
  (timm's two), else to torch's (torchvision's frozen layer, unfrozen, is ``nn.BatchNorm2d``);
- a form without an activation (renorm, ghost, cross-iteration, synchronized) takes no layer
  that holds one: those are left in place and named in a ``UserWarning``.

Only exact classes are converted. A subclass of a batch norm carries behaviour of its own (an
overridden forward, extra state) that a conversion would silently drop; such modules are left in
place and named in a ``UserWarning``. (Our own ``BatchNormAct1d/2d`` is one of them: it names its
activation by a string, which no other form holds.)

:func:`freeze` and :func:`unfreeze` are conversions to and from the frozen form. This module is the
whole-model layer: it imports the modules and variants, and none of them imports it.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.modules.with_act import BatchNormWithAct2d
from batchnorm.variants.cross_iteration import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
)
from batchnorm.variants.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormWithAct2d,
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
# Our layers that hold an activation module (2d only, as the zoos'), trainable and frozen.
_WITH_ACT = {"batchnorm": BatchNormWithAct2d, "frozen": FrozenBatchNormWithAct2d}
_KNOWN[BatchNormWithAct2d] = ("batchnorm", 1)
_KNOWN[FrozenBatchNormWithAct2d] = ("frozen", 1)


@dataclass(frozen=True)
class _ZooClass:
    """A model zoo's batch-norm class: its form, whether it holds an activation, and its
    partner of the other kind (frozen for a trainable class, trainable for a frozen one) in the
    same zoo, by name (None: torch's class is the partner)."""

    family: str  # "torch" (trainable) or "frozen"
    with_act: bool
    partner: str | None


_ZOO: dict[str, _ZooClass] = {
    "timm.layers.norm_act.BatchNormAct2d": _ZooClass(
        "torch", True, "FrozenBatchNormAct2d"
    ),
    "timm.layers.norm_act.FrozenBatchNormAct2d": _ZooClass("frozen", True, "BatchNormAct2d"),
    "torchvision.ops.misc.FrozenBatchNorm2d": _ZooClass("frozen", False, None),
}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_family(name: str, classes, options: tuple[str, ...] = ()) -> None:
    """Add a form (three classes for 1d, 2d, 3d) that ``convert`` can convert to and from."""
    FAMILIES[name] = tuple(classes)
    if options:
        _OPTIONS[name] = options
    for index, cls in enumerate(classes):
        _KNOWN[cls] = (name, index)


@dataclass(frozen=True)
class _Source:
    """What a convertible module is: its form, 1d/2d/3d (None: synchronized), whether it holds
    an activation module, and the zoo classes it returns to under ``to="torch"``: (trainable,
    frozen), either None where torch's class (or none) serves."""

    family: str
    index: int | None
    with_act: bool
    zoo: tuple[type | None, type | None]

    @property
    def frozen(self) -> bool:
        return self.family == "frozen"


def _source(module: nn.Module) -> _Source | None:
    cls = type(module)
    zoo = _ZOO.get(_qualified(cls))
    if zoo is not None:
        partner = None
        if zoo.partner is not None:
            partner = getattr(inspect.getmodule(cls), zoo.partner, None)
        trainable, frozen = (partner, cls) if zoo.family == "frozen" else (cls, partner)
        return _Source(zoo.family, 1, zoo.with_act, (trainable, frozen))
    known = _KNOWN.get(cls)
    if known is None:
        return None
    family, index = known
    zoo_classes = getattr(module, "_zoo_classes", (None, None))
    return _Source(family, index, cls in (BatchNormWithAct2d, FrozenBatchNormWithAct2d),
                   zoo_classes)


def _is_batch_norm_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm))


def _target(source: _Source, to: str, keep_frozen: bool) -> type[nn.Module] | str:
    """The class to build, or the reason there is none."""
    if to == "batchnorm" and source.frozen and keep_frozen:
        to = "frozen"
    if to == "torch":
        zoo_class = source.zoo[1 if source.frozen else 0]
        if zoo_class is not None:
            return zoo_class
    if source.with_act:
        if to in _WITH_ACT:
            return _WITH_ACT[to]
        if to == "torch":
            return "torch has no batch norm that holds an activation"
        return f"to={to!r} has no form that holds an activation"
    if source.index is None and to not in ("sync", "torch_sync"):
        return "a synchronized batch norm does not record whether it was 1d, 2d or 3d"
    return FAMILIES[to][source.index or 0]


def _reference(module: nn.Module) -> torch.Tensor | None:
    """A per-channel tensor of the layer, for its device and dtype."""
    return module.running_mean if module.running_mean is not None else module.weight


def _constructor_arguments(module: nn.Module, target: type[nn.Module], to: str,
                           options: dict[str, Any]) -> dict[str, Any]:
    """What ``target``'s constructor takes of the layer's settings (zoo classes take fewer)."""
    reference = _reference(module)
    accepted = inspect.signature(target.__init__).parameters
    values = {
        "eps": module.eps,
        "momentum": getattr(module, "momentum", 0.1),
        "affine": getattr(module, "affine", module.weight is not None),
        "track_running_stats": getattr(module, "track_running_stats", True),
    }
    if reference is not None:
        values.update(device=reference.device, dtype=reference.dtype)
    for option in _OPTIONS.get(to, ()):
        if option in options:
            values[option] = options[option]
        elif hasattr(module, option):
            values[option] = getattr(module, option)
    return {key: value for key, value in values.items() if key in accepted}


def _rebuild(module: nn.Module, source: _Source, target: type[nn.Module], to: str,
             options: dict[str, Any]) -> nn.Module:
    kwargs = _constructor_arguments(module, target, to, options)
    if to == "ghost" and "virtual_batch_size" not in kwargs:
        raise ValueError(
            "convert: converting to ghost batch norm needs virtual_batch_size=..., got none"
        )
    # torchvision's frozen layer does not record its number of channels
    num_features = getattr(module, "num_features", None) or _reference(module).numel()
    accepted = inspect.signature(target.__init__).parameters
    drops_bias = module.weight is not None and module.bias is None
    takes_bias = "bias" in accepted
    if drops_bias and takes_bias:
        kwargs["bias"] = False
    if source.with_act and "act" in accepted:
        kwargs.update(act=module.act, drop=module.drop)
    replacement = target(num_features, **kwargs)
    reference = _reference(module)
    if "device" not in accepted and reference is not None:  # (torchvision's frozen layer)
        replacement.to(device=reference.device, dtype=reference.dtype)
    if source.with_act and "act" not in accepted:  # a zoo class, built with default children
        replacement.act, replacement.drop = module.act, module.drop
    if drops_bias and not takes_bias:  # a form (or a torch) without the keyword: drop it here
        if "bias" in replacement._parameters:
            replacement.register_parameter("bias", None)
        else:
            replacement.register_buffer("bias", None)
    state = module.state_dict()
    # State of the source form's own (cross-iteration's history) has no place in the target
    expected = replacement.state_dict().keys()
    for key in set(module._buffers) - set(_BATCH_NORM_STATE) - set(expected):
        state.pop(key, None)
    counts = "num_batches_tracked" in state
    if not counts and isinstance(replacement, _FrozenBatchNorm):
        # from a zoo's frozen layer, which counts nothing: keep its keys
        replacement.register_buffer("num_batches_tracked", None)
    elif not counts and getattr(replacement, "num_batches_tracked", None) is not None:
        state["num_batches_tracked"] = torch.zeros_like(replacement.num_batches_tracked)
    with torch.no_grad():
        replacement.load_state_dict(state, strict=True)
    for name in ("weight", "bias"):
        source_tensor, built = getattr(module, name), getattr(replacement, name)
        if isinstance(source_tensor, nn.Parameter) and isinstance(built, nn.Parameter):
            built.requires_grad_(source_tensor.requires_grad)
    if _qualified(target) in _ZOO:
        _restore_attributes(replacement, getattr(module, "_zoo_attributes", {}).get(target, {}))
    else:
        replacement._zoo_classes = source.zoo
        attributes = dict(getattr(module, "_zoo_attributes", {}))
        if _qualified(type(module)) in _ZOO:
            attributes[type(module)] = _plain_attributes(module)
        if attributes:
            replacement._zoo_attributes = attributes
    replacement.train(module.training)
    return replacement


_BATCH_NORM_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A zoo layer's own plain attributes (numbers, flags, strings), to set again when it is
    rebuilt (timm's freeze_batch_norm_2d adds ``num_features`` and ``affine`` to its frozen
    layers, which their constructor does not set)."""
    return {
        key: value for key, value in vars(module).items()
        if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))
    }


def _restore_attributes(module: nn.Module, attributes: dict[str, Any]) -> None:
    for key, value in attributes.items():
        if key not in vars(module):
            setattr(module, key, value)


def _convert(model, to, filter, only, options, keep_frozen):
    pattern = re.compile(filter) if filter is not None else None
    skipped: dict[str, list[str]] = {}

    def selected(module: nn.Module, name: str) -> bool:
        if pattern is not None and not pattern.search(name):
            return False
        return only is None or only(module)

    def visit(module: nn.Module, name: str) -> nn.Module:
        source = _source(module)
        if source is not None and selected(module, name):
            target = _target(source, to, keep_frozen)
            if isinstance(target, str):
                skipped.setdefault(target, []).append(
                    f"{name or '<root>'} ({type(module).__qualname__})"
                )
                return module
            if type(module) is not target or options:  # same form with new options: rebuilt
                replacement = _rebuild(module, source, target, to, options)
                replacement._qualified_name = name or type(module).__name__
                return replacement
            return module
        if source is None and _is_batch_norm_like(module) and selected(module, name):
            reason = "they are subclasses whose own behaviour a conversion would drop"
            skipped.setdefault(reason, []).append(
                f"{name or '<root>'} ({type(module).__qualname__})"
            )
            return module
        for child_name, child in list(module.named_children()):
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    result = visit(model, "")
    for reason, names in skipped.items():
        warnings.warn(
            f"convert: left these batch norms unchanged because {reason}: " + ", ".join(names),
            UserWarning,
            stacklevel=3,
        )
    return result


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
    kinds = None if only is None else (lambda module: isinstance(module, only))
    return _convert(model, to, filter, kinds, options, keep_frozen=True)


def freeze(model: nn.Module, filter: str | None = None) -> nn.Module:
    """Replace every batch norm in ``model`` (torch.nn's, ours, renorm, ghost, timm's with its
    activation) by its frozen form, keeping its statistics, affine and activation.
    ``filter``: a regular expression; only modules whose qualified name matches it
    (``re.search``) are frozen. Returns the model."""
    return convert(model, to="frozen", filter=filter)


def _is_frozen(module: nn.Module) -> bool:
    source = _source(module)
    return source is not None and source.frozen


def unfreeze(model: nn.Module, filter: str | None = None) -> nn.Module:
    """Replace every frozen batch norm (ours, torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``) by a trainable ``batchnorm.BatchNorm*d`` (or
    ``BatchNormWithAct2d``, with the same activation) with the same statistics and affine (as
    parameters again). Returns the model."""
    return _convert(model, "batchnorm", filter, _is_frozen, {}, keep_frozen=False)
