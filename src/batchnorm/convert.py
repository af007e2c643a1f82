"""Model-wide conversion between torch.nn's batch norms and ours.

``convert(model)`` replaces every ``torch.nn.BatchNorm{1,2,3}d`` by ours; ``convert(model,
to="torch")`` does the reverse. Parameters, running statistics, ``num_batches_tracked``, the
constructor flags, device, dtype and train/eval mode are kept, so outputs are equal before and
after.

Only the exact classes are converted. A subclass of a batch norm carries behaviour of its own
(an overridden forward, extra state), which a conversion would silently drop; such modules are
left in place and named in a ``UserWarning``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {
    ours: theirs for theirs, ours in _TO_OURS.items()
}
_TARGETS = {"batchnorm": _TO_OURS, "torch": _TO_TORCH}


def _rebuild(module: nn.Module, target: type[nn.Module]) -> nn.Module:
    reference = module.running_mean if module.running_mean is not None else module.weight
    factory = {}
    if reference is not None:
        factory = {"device": reference.device, "dtype": reference.dtype}
    replacement = target(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        **factory,
    )
    with torch.no_grad():
        replacement.load_state_dict(module.state_dict(), strict=True)
    if module.weight is not None:
        replacement.weight.requires_grad_(module.weight.requires_grad)
        replacement.bias.requires_grad_(module.bias.requires_grad)
    replacement.train(module.training)
    return replacement


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace batch norms throughout ``model``; returns the model (converted in place, or a new
    module when ``model`` itself is a batch norm).

    Args:
        model: any module.
        to: ``"batchnorm"`` (this package) or ``"torch"`` (``torch.nn``).
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: expected to='batchnorm' or to='torch', got to={to!r}")
    mapping = _TARGETS[to]
    skipped: list[str] = []

    def visit(module: nn.Module, name: str) -> nn.Module:
        target = mapping.get(type(module))
        if target is not None:
            replacement = _rebuild(module, target)
            if to == "batchnorm":
                replacement._qualified_name = name or type(module).__name__
            return replacement
        known = type(module) in _TO_TORCH or type(module) in _TO_OURS
        if _is_batch_norm(module) and not known:
            skipped.append(f"{name or '<root>'} ({type(module).__qualname__})")
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
