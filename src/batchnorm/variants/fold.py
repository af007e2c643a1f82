r"""Folding batch norm into the preceding convolution or linear layer for inference.

With population statistics a batch norm is one per-channel affine map,
:math:`y = s\,x + t` with :math:`s = \gamma / \sqrt{\hat\sigma^2 + \epsilon}` and
:math:`t = \beta - \hat\mu s`. When it directly follows a layer :math:`x = W u + b` whose output
it alone consumes, the two collapse into one layer with

.. math:: W' = s \odot W \ \text{(per output channel)}, \qquad b' = s\,b + t .

:func:`fold` returns an eval-mode copy of the model in which every such pair is folded. Pairs are
found by ``torch.fx`` tracing (any graph, residual connections included); when the model cannot
be traced, by adjacency inside ``nn.Sequential`` containers. A batch norm that cannot be folded
(after an activation, or whose input is also used elsewhere) is replaced by
:class:`ChannelAffine`, the same per-channel map without the statistics machinery.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from batchnorm.core.layout import as_channel
from batchnorm.core.normalize import affine_coefficients, inverse_std, scale_shift
from batchnorm.variants.frozen import _FrozenBatchNorm

_FOLDABLE = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)


class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (axis 1): an eval-mode batch norm, precomputed."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_shift(x, as_channel(self.scale.to(x.dtype), x),
                           as_channel(self.shift.to(x.dtype), x))

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


@dataclass
class FoldReport:
    """What :func:`fold` did: pairs folded ("layer <- batch norm") and batch norms left as a
    per-channel affine, by qualified name; ``method`` is "fx" or "sequential"."""

    method: str = "fx"
    folded: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s) ({self.method}):"]
        lines += [f"  {pair}" for pair in self.folded]
        lines.append(f"left {len(self.left)} as per-channel affine:")
        lines += [f"  {name}" for name in self.left]
        return "\n".join(lines)


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm))


def _affine_of(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a batch norm in eval mode, in float64 for the folding."""
    if bn.running_mean is None:
        raise ValueError(
            f"fold: {type(bn).__name__} has no running statistics (track_running_stats=False), "
            "so it normalizes with batch statistics even in eval mode and cannot be folded"
        )
    as64 = [None if t is None else t.detach().to(torch.float64)
            for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    mean, variance, weight, bias = as64
    return affine_coefficients(mean, inverse_std(variance, bn.eps), weight, bias)


def fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval statistics) into ``layer``'s weight and bias, in place."""
    scale, shift = _affine_of(bn)
    weight = layer.weight.detach().to(torch.float64)
    if isinstance(layer, nn.Linear) or not isinstance(
        layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    ):
        # Conv and Linear weights are (out, ...): scale along axis 0.
        folded = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    else:
        # Transposed conv weights are (in, out / groups, ...), output channel o = g * (out/groups)
        # + j lives at [g-th block of inputs, j]: scale per (group, j).
        groups = layer.groups
        in_channels, out_per_group = weight.shape[0], weight.shape[1]
        blocks = weight.reshape(groups, in_channels // groups, out_per_group, *weight.shape[2:])
        per_group = scale.reshape(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
        folded = (blocks * per_group).reshape(weight.shape)
    bias = layer.bias.detach().to(torch.float64) if layer.bias is not None else 0.0
    new_bias = bias * scale + shift
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(folded.to(dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(new_bias.to(dtype), requires_grad=False)


def _channel_affine(bn: nn.Module) -> ChannelAffine:
    scale, shift = _affine_of(bn)
    dtype = bn.running_mean.dtype
    return ChannelAffine(scale.to(dtype), shift.to(dtype))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _trace(model: nn.Module):
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        # Batch norms (ours included) are leaves: their forward is not traced through.
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return _is_batch_norm(module) or super().is_leaf_module(module, qualified_name)

    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph)


def _fold_by_fx(model: nn.Module, report: FoldReport) -> nn.Module:
    from collections import Counter

    import torch.fx

    graph_module = _trace(model)
    modules = dict(graph_module.named_modules())
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    replaced: set[str] = set()
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not _is_batch_norm(modules[node.target]):
            continue
        bn = modules[node.target]
        source = node.args[0] if node.args else None
        foldable = (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], _FOLDABLE)
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
            and len(node.args) == 1
            and not node.kwargs
        )
        if foldable:
            fold_pair(modules[source.target], bn)
            node.replace_all_uses_with(source)
            graph_module.graph.erase_node(node)
            report.folded.append(f"{source.target} <- {node.target}")
        elif node.target not in replaced:
            _set_submodule(graph_module, node.target, _channel_affine(bn))
            replaced.add(node.target)
            report.left.append(str(node.target))
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _fold_by_sequential(model: nn.Module, report: FoldReport) -> nn.Module:
    report.method = "sequential"
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Sequential):
            continue
        keys = list(module._modules)
        for previous_key, key in zip([None, *keys[:-1]], keys, strict=True):
            child = module._modules[key]
            if not _is_batch_norm(child):
                continue
            qualified = f"{name}.{key}" if name else key
            previous = module._modules[previous_key] if previous_key is not None else None
            if isinstance(previous, _FOLDABLE):
                fold_pair(previous, child)
                module._modules[key] = nn.Identity()
                report.folded.append(f"{name + '.' if name else ''}{previous_key} <- {qualified}")
    # Anything still a batch norm (outside a foldable pair) becomes a per-channel affine.
    for name, module in list(model.named_modules()):
        if _is_batch_norm(module) and name:
            _set_submodule(model, name, _channel_affine(module))
            report.left.append(name)
    return model


def fold(model: nn.Module, return_report: bool = False):
    """An eval-mode copy of ``model`` with batch norms folded into the layers before them.

    Returns the folded model, or ``(model, FoldReport)`` with ``return_report=True``. The
    original model is not modified.
    """
    model = copy.deepcopy(model).eval()
    report = FoldReport()
    if _is_batch_norm(model):
        folded: nn.Module = _channel_affine(model)
        report.left.append("<root>")
    else:
        try:
            folded = _fold_by_fx(model, report)
        except Exception:  # noqa: BLE001 - any tracing failure: fall back to adjacency
            report = FoldReport()
            folded = _fold_by_sequential(model, report)
    folded.eval()
    return (folded, report) if return_report else folded
