r"""Folding batch norm into the preceding convolution or linear layer for inference.

With population statistics a batch norm is one per-channel affine map,
:math:`y = s\,x + t` with :math:`s = \gamma / \sqrt{\hat\sigma^2 + \epsilon}` and
:math:`t = \beta - \hat\mu s`. When it directly follows a layer :math:`x = W u + b` whose output
it alone consumes, the two collapse into one layer with

.. math:: W' = s \odot W \ \text{(per output channel)}, \qquad b' = s\,b + t .

:func:`fold` returns an eval-mode copy of the model in which every such pair is folded. Pairs are
found by ``torch.fx`` tracing (any graph, residual connections included); when the model cannot
be traced, by adjacency inside ``nn.Sequential`` containers.

What each batch norm becomes:

- folded, when it follows a convolution or linear layer as above;
- a :class:`ChannelAffine`, the same per-channel map without the statistics machinery, when it
  cannot be folded (it follows something else, such as densenet's batch norm before its
  convolution, or the layer's output is also used elsewhere);
- left as it is, when its eval output is not that affine map or not only it: a subclass fold
  does not know (its forward is its own), a layer without running statistics (it normalizes
  with batch statistics in eval too), a fused layer called with a residual.

A layer that holds an activation (our ``BatchNormAct1d/2d``, ``BatchNormWithAct2d`` and its
frozen form, timm's ``BatchNormAct2d``, ``FrozenBatchNormAct2d`` and ``SyncBatchNormAct``) keeps
it: the affine map is folded or made a :class:`ChannelAffine`, and the activation (after the
layer's drop module, as the layer applies them) takes the batch norm's place. The
:class:`FoldReport` names every batch norm and what became of it, with the reason when it was
not folded.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from batchnorm.core.layout import as_channel
from batchnorm.core.normalize import affine_coefficients, inverse_std, scale_shift
from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.modules.norm_act import BatchNormAct1d, BatchNormAct2d
from batchnorm.modules.with_act import BatchNormWithAct2d
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

_FOLDABLE = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Classes whose eval forward is exactly the running-statistics affine map (no activation).
_PLAIN: set[type[nn.Module]] = {
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    BatchNorm1d, BatchNorm2d, BatchNorm3d,
    BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
    GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d,
    FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
    SyncBatchNorm,
}
# The same, by qualified name: the zoos' classes (never imported here) and our variants that
# this module does not import.
_PLAIN_NAMES = {
    "torchvision.ops.misc.FrozenBatchNorm2d",
    "batchnorm.variants.cross_iteration.CrossIterationBatchNorm1d",
    "batchnorm.variants.cross_iteration.CrossIterationBatchNorm2d",
    "batchnorm.variants.cross_iteration.CrossIterationBatchNorm3d",
}
# Classes that apply ``act(drop(affine))``, with ``act`` and ``drop`` child modules.
_WITH_CHILDREN: set[type[nn.Module]] = {BatchNormWithAct2d, FrozenBatchNormWithAct2d}
_WITH_CHILDREN_NAMES = {
    "timm.layers.norm_act.BatchNormAct2d",
    "timm.layers.norm_act.FrozenBatchNormAct2d",
    "timm.layers.norm_act.SyncBatchNormAct",
}
# Our fused layers, which name their activation.
_NAMED_ACTIVATION = {BatchNormAct1d, BatchNormAct2d}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
    """What :func:`fold` did, by qualified name: pairs folded ("layer <- batch norm"), batch
    norms left as a per-channel affine, and batch norms kept as they were; ``reasons`` says why
    each of the last two was not folded, and ``activations`` which folded or affine batch norms
    kept their activation (and which). ``method`` is "fx" or "sequential"."""

    method: str = "fx"
    folded: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    activations: dict[str, str] = field(default_factory=dict)

    def _leave(self, name: str, reason: str) -> None:
        self.left.append(name)
        self.reasons[name] = reason

    def _keep(self, name: str, reason: str) -> None:
        self.kept.append(name)
        self.reasons[name] = reason

    def __str__(self) -> str:
        def named(name: str) -> str:
            activation = self.activations.get(name)
            return f"{name} (keeps {activation})" if activation else name

        lines = [f"folded {len(self.folded)} batch norm(s) ({self.method}):"]
        for pair in self.folded:
            layer, _, bn = pair.partition(" <- ")
            lines.append(f"  {layer} <- {named(bn)}")
        lines.append(f"left {len(self.left)} as per-channel affine:")
        lines += [f"  {named(name)}: {self.reasons[name]}" for name in self.left]
        lines.append(f"kept {len(self.kept)} as they were:")
        lines += [f"  {name}: {self.reasons[name]}" for name in self.kept]
        return "\n".join(lines)


def _is_batch_norm(module: nn.Module) -> bool:
    """Every batch norm, known to fold or not: fx records each as one call (a leaf)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm)) or (
        _qualified(type(module)) in _PLAIN_NAMES | _WITH_CHILDREN_NAMES
    )


@dataclass(frozen=True)
class _Plan:
    """How one batch norm folds: its activation module (None: none), or why it cannot."""

    activation: nn.Module | None = None
    refusal: str | None = None


def _activation_of(bn: nn.Module) -> nn.Module | None:
    """The activation a fused layer applies after its affine map, as a module (None: none)."""
    cls = type(bn)
    if cls in _NAMED_ACTIVATION:
        name = bn.activation
        if name == "identity":
            return None
        if name == "leaky_relu":
            return nn.LeakyReLU(bn.negative_slope)
        return {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}[name]()
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and type(m) is not nn.Identity]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _describe(activation: nn.Module) -> str:
    return " -> ".join(type(m).__name__ for m in (
        activation if isinstance(activation, nn.Sequential) else [activation]
    ))


def _plan(bn: nn.Module, extra_arguments: bool = False) -> _Plan:
    cls = type(bn)
    name = _qualified(cls)
    known_plain = cls in _PLAIN or name in _PLAIN_NAMES
    with_activation = cls in _WITH_CHILDREN or name in _WITH_CHILDREN_NAMES or (
        cls in _NAMED_ACTIVATION
    )
    if not (known_plain or with_activation):
        return _Plan(refusal=(
            f"{cls.__qualname__} is a subclass fold does not know: its forward is its own, "
            "so it may compute more than the affine map (left in eval mode)"
        ))
    if getattr(bn, "running_mean", None) is None:
        return _Plan(refusal=(
            "no running statistics (track_running_stats=False): it normalizes with batch "
            "statistics in eval too"
        ))
    if extra_arguments:
        return _Plan(refusal="called with more than its input (a residual or a mask)")
    return _Plan(activation=_activation_of(bn))


def _affine_of(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a batch norm in eval mode, in float64 for the folding."""
    as64 = [None if t is None else t.detach().to(torch.float64)
            for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    mean, variance, weight, bias = as64
    return affine_coefficients(mean, inverse_std(variance, bn.eps), weight, bias)


def _output_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval affine map into ``layer``'s weight and bias, in place (the activation
    a fused ``bn`` holds is not part of it: :func:`fold` keeps that)."""
    scale, shift = _affine_of(bn)
    weight = layer.weight.detach().to(torch.float64)
    if not isinstance(layer, _TRANSPOSED):
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


def _affine_then(bn: nn.Module, activation: nn.Module | None) -> nn.Module:
    affine = _channel_affine(bn)
    return affine if activation is None else nn.Sequential(affine, activation)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _trace(model: nn.Module):
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        # Batch norms (ours and the zoos' included) are leaves: their forward is not traced.
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return _is_batch_norm(module) or super().is_leaf_module(module, qualified_name)

    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph)


def _why_not_a_pair(node, source, modules, calls, bn) -> str | None:
    """Why ``node`` (a batch norm's call) cannot fold into the node before it, or None."""
    import torch.fx

    if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
            and isinstance(modules[source.target], _FOLDABLE)):
        if not isinstance(source, torch.fx.Node):
            what = repr(source)
        elif source.op == "placeholder":
            what = "the model's input"
        elif source.op == "call_module":
            what = f"{source.target} ({type(modules[source.target]).__name__})"
        elif source.op == "call_function":
            what = getattr(source.target, "__name__", str(source.target))
        else:
            what = f"{source.op} {source.target}"
        return f"its input comes from {what}, not from a convolution or linear layer"
    layer = modules[source.target]
    if len(source.users) != 1:
        return f"the output of {source.target} is also used elsewhere"
    if calls[source.target] != 1:
        return f"{source.target} is called more than once"
    if calls[node.target] != 1:
        return "it is called more than once"
    if _output_channels(layer) != bn.running_mean.numel():
        return f"{source.target} has {_output_channels(layer)} outputs, the batch norm " \
               f"{bn.running_mean.numel()} channels"
    return None


def _fold_by_fx(model: nn.Module, report: FoldReport) -> nn.Module:
    graph_module = _trace(model)
    modules = dict(graph_module.named_modules())
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    replaced: set[str] = set()
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not _is_batch_norm(modules[node.target]):
            continue
        name, bn = str(node.target), modules[node.target]
        plan = _plan(bn, extra_arguments=len(node.args) != 1 or bool(node.kwargs))
        if plan.refusal is not None:
            if name not in report.reasons:
                report._keep(name, plan.refusal)
            continue
        source = node.args[0]
        why = _why_not_a_pair(node, source, modules, calls, bn)
        if why is None:
            fold_pair(modules[source.target], bn)
            report.folded.append(f"{source.target} <- {name}")
            if plan.activation is None:
                node.replace_all_uses_with(source)
                graph_module.graph.erase_node(node)
            else:  # the node now calls the activation, on the folded layer's output
                _set_submodule(graph_module, name, plan.activation)
                report.activations[name] = _describe(plan.activation)
            replaced.add(name)
        elif name not in replaced:
            _set_submodule(graph_module, name, _affine_then(bn, plan.activation))
            replaced.add(name)
            report._leave(name, why)
            if plan.activation is not None:
                report.activations[name] = _describe(plan.activation)
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
            plan = _plan(child)
            if plan.refusal is None and isinstance(previous, _FOLDABLE) and (
                _output_channels(previous) == child.running_mean.numel()
            ):
                fold_pair(previous, child)
                module._modules[key] = plan.activation or nn.Identity()
                report.folded.append(f"{name + '.' if name else ''}{previous_key} <- {qualified}")
                if plan.activation is not None:
                    report.activations[qualified] = _describe(plan.activation)
    # Anything still a batch norm (outside a foldable pair) becomes a per-channel affine, or
    # stays as it is when it is more than that.
    for name, module in list(model.named_modules()):
        if not name or not _is_batch_norm(module):
            continue
        plan = _plan(module)
        if plan.refusal is not None:
            report._keep(name, plan.refusal)
            continue
        _set_submodule(model, name, _affine_then(module, plan.activation))
        report._leave(name, "the model could not be traced, and it does not follow a "
                            "convolution or linear layer inside an nn.Sequential")
        if plan.activation is not None:
            report.activations[name] = _describe(plan.activation)
    return model


def fold(model: nn.Module, return_report: bool = False):
    """An eval-mode copy of ``model`` with batch norms folded into the layers before them.

    Returns the folded model, or ``(model, FoldReport)`` with ``return_report=True``. The
    original model is not modified. Activations held by fused layers are kept (see the module
    docstring); a batch norm that is more than an affine map in eval is kept as it is.
    """
    model = copy.deepcopy(model).eval()
    report = FoldReport()
    if _is_batch_norm(model):
        plan = _plan(model)
        if plan.refusal is not None:
            report._keep("<root>", plan.refusal)
            folded: nn.Module = model
        else:
            folded = _affine_then(model, plan.activation)
            report._leave("<root>", "the model is a batch norm alone: nothing precedes it")
    else:
        try:
            folded = _fold_by_fx(model, report)
        except Exception:  # noqa: BLE001 - any tracing failure: fall back to adjacency
            report = FoldReport()
            folded = _fold_by_sequential(model, report)
    folded.eval()
    return (folded, report) if return_report else folded
