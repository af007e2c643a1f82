"""The lab's models: an MLP and a small CNN, each built with a normalization chosen by name.

``NORMS`` maps a name to a factory ``(num_features, layout) -> nn.Module``; ``layout`` is one of
``LAYOUTS``: "vector" for (N, C) activations, "sequence" for (N, C, L) and "image" for
(N, C, H, W). Variants join with :func:`register_norm` (e.g. "renorm", "ghost").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchRenorm1d,
    BatchRenorm2d,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
)

NormFactory = Callable[[int, str], nn.Module]
LAYOUTS = ("vector", "sequence", "image")

CHANNELS_PER_GROUP = 4  # GroupNorm's group size (Wu & He use 32 groups of wide layers)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
PLACEMENTS = ("before", "after")  # the norm before or after the activation


def _batch(num_features: int, layout: str) -> nn.Module:
    return BatchNorm2d(num_features) if layout == "image" else BatchNorm1d(num_features)


def _group(num_features: int, layout: str) -> nn.Module:
    groups = max(1, num_features // CHANNELS_PER_GROUP)
    return nn.GroupNorm(groups, num_features)


def _layer(num_features: int, layout: str) -> nn.Module:
    # Over (C, H, W) or (C, L), as in the GroupNorm paper's LayerNorm; over C for vectors.
    return nn.LayerNorm(num_features) if layout == "vector" else nn.GroupNorm(1, num_features)


def _none(num_features: int, layout: str) -> nn.Module:
    return nn.Identity()


# Batch renormalization as Wu & He ran it at 4 images per GPU (r_max 1.5, d_max 0.5, constant:
# the lab's runs are far shorter than the published 5,000-step warm-up), with batch norm's
# momentum so that the running statistics it corrects toward keep up in short runs.
RENORM_LIMITS = {"r_max": 1.5, "d_max": 0.5}
GHOST_BATCH = 16  # ghost batch norm's virtual batch size
# Cross-iteration batch norm pools the statistics of this many iterations (Yao et al. ran 4 at
# small batches); each block links it to the layer before it, whose weight changes it corrects
# the earlier iterations' statistics for.
CROSS_ITERATION_WINDOW = 4


def _renorm(num_features: int, layout: str) -> nn.Module:
    cls = BatchRenorm2d if layout == "image" else BatchRenorm1d
    return cls(num_features, momentum=0.1, **RENORM_LIMITS)


def _ghost(num_features: int, layout: str) -> nn.Module:
    cls = GhostBatchNorm2d if layout == "image" else GhostBatchNorm1d
    return cls(num_features, virtual_batch_size=GHOST_BATCH)


CROSS_ITERATION = (CrossIterationBatchNorm1d, CrossIterationBatchNorm2d)


def _cross_iteration(num_features: int, layout: str) -> nn.Module:
    cls = CrossIterationBatchNorm2d if layout == "image" else CrossIterationBatchNorm1d
    return cls(num_features, window=CROSS_ITERATION_WINDOW)


NORMS: dict[str, NormFactory] = {
    "none": _none,
    "batch": _batch,
    "renorm": _renorm,
    "ghost": _ghost,
    "cross-iteration": _cross_iteration,
    "group": _group,
    "layer": _layer,
}


def register_norm(name: str, factory: NormFactory) -> None:
    """Make ``name`` available to every lab model (and to ``--list``)."""
    NORMS[name] = factory


def make_norm(name: str, num_features: int, layout: str) -> nn.Module:
    if name not in NORMS:
        raise ValueError(f"unknown norm '{name}': expected one of {', '.join(NORMS)}")
    _check_choice("layout", layout, LAYOUTS)
    return NORMS[name](num_features, layout)


def _check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} '{value}': expected one of {', '.join(choices)}")


class _NormActBlock(nn.Sequential):
    """Weights -> norm -> activation ("before"), or weights -> activation -> norm ("after")."""

    def __init__(self, weights: nn.Module, norm: nn.Module, activation: nn.Module, placement):
        _check_choice("placement", placement, PLACEMENTS)
        before = placement == "before"
        if isinstance(norm, CROSS_ITERATION):
            norm.link(weights)  # with "after", through the activation (a channel-wise map)
        super().__init__(*([weights, norm, activation] if before else [weights, activation, norm]))
        self._activation_index = 2 if before else 1

    @property
    def activation(self) -> nn.Module:
        # A property, not an attribute: assigning a module would register it a second time and
        # Sequential would apply it twice.
        return self[self._activation_index]


class MLP(nn.Module):
    """``depth`` hidden norm-activation blocks of ``width`` units, then a linear classifier."""

    def __init__(
        self,
        input_size: int,
        classes: int,
        depth: int = 3,
        width: int = 100,
        activation: str = "relu",
        norm: str = "none",
        placement: str = "before",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        blocks: list[nn.Module] = []
        size = input_size
        for _ in range(depth):
            linear = nn.Linear(size, width)
            block = _NormActBlock(
                linear, make_norm(norm, width, "vector"), ACTIVATIONS[activation](), placement
            )
            blocks.append(block)
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            size = width
        self.hidden = nn.Sequential(*blocks)
        self.classifier = nn.Linear(size, classes)
        self.activation_name = activation
        init_weights(self, activation)

    @property
    def activations(self) -> list[nn.Module]:
        """The activation module of each hidden layer, first to last (for hooks)."""
        return [block.activation for block in self.hidden if isinstance(block, _NormActBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(x.flatten(1)))


class CNN(nn.Module):
    """Convolution blocks of kernel 3 (strides 1, 2, 2, ...), global average pooling, a classifier.

    Images of height 1 (signals such as MNIST-1D's, shape (N, C, 1, L)) get 1-D convolutions and
    the norms' sequence form; other images get 3x3 convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        classes: int,
        widths: tuple[int, ...] = (16, 32, 32),
        activation: str = "relu",
        norm: str = "none",
        placement: str = "before",
        one_dimensional: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        convolution = nn.Conv1d if one_dimensional else nn.Conv2d
        layout = "sequence" if one_dimensional else "image"
        blocks: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            conv = convolution(channels, width, 3, stride=1 if index == 0 else 2, padding=1)
            norm_module = make_norm(norm, width, layout)
            blocks.append(_NormActBlock(conv, norm_module, ACTIVATIONS[activation](), placement))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, classes)
        self.one_dimensional = one_dimensional
        init_weights(self, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_dimensional:
            x = x.flatten(2)  # (N, C, 1, L) -> (N, C, L)
        features = self.features(x)
        return self.classifier(features.mean(dim=tuple(range(2, features.dim()))))


def init_weights(model: nn.Module, activation: str, scale: float = 1.0) -> None:
    """Standard scale (He for ReLU, Glorot for tanh/sigmoid) times ``scale``; zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if activation == "relu":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                nn.init.xavier_normal_(module.weight, gain=nn.init.calculate_gain(activation))
            with torch.no_grad():
                module.weight.mul_(scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
