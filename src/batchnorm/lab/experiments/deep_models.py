"""Deep networks for the depth experiments (C7, C8): the lab's MLP, or the same layers with
identity skips, chosen by one name; and a convolutional net of any depth in the same three forms.

``ResidualMLP`` is the pre-activation form (He et al. 2016): a linear stem, then ``depth - 1``
blocks ``h <- h + Linear(relu(norm(h)))``, then ``relu(norm(h))`` and the classifier. With its
skips taken out it is exactly the lab's ``MLP`` (linear, norm, relu, ..., classifier), so the
only difference between the nets "batch" and "batch-residual" is the skips.

``DeepCNN`` is built the same way from 3x3 convolutions (1-D ones for signals of height 1): a
stem of stride 2, then ``depth - 1`` blocks ``conv(relu(norm(h)))`` at that resolution, each
added to its input when the net has skips, then ``relu(norm(h))`` and a linear classifier on the
flattened maps. Without skips the layers read conv, norm, relu, ..., conv, norm, relu: the plain
convolutional chain. (The lab's ``CNN`` halves the resolution at every layer after the first and
pools globally; neither survives tens of layers on an 8x8 image.)
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm.lab.models import ACTIVATIONS, MLP, init_weights, make_norm

# The nets compared: (norm, skips) by name.
NETS: dict[str, tuple[str, bool]] = {
    "plain": ("none", False),
    "batch": ("batch", False),
    "batch-residual": ("batch", True),
}
NET_LABELS = {"plain": "plain (no BN)", "batch": "BN", "batch-residual": "BN + skips"}


class _PreActivationBlock(nn.Module):
    def __init__(self, width: int, norm: str, activation: str) -> None:
        super().__init__()
        self.norm = make_norm(norm, width, "vector")
        self.activation = ACTIVATIONS[activation]()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(self.activation(self.norm(x)))


class ResidualMLP(nn.Module):
    """``depth`` linear layers of ``width`` units, all but the first inside an identity skip."""

    def __init__(self, input_size: int, classes: int, depth: int, width: int,
                 norm: str = "batch", activation: str = "relu") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.stem = nn.Linear(input_size, width)
        self.blocks = nn.Sequential(
            *(_PreActivationBlock(width, norm, activation) for _ in range(depth - 1))
        )
        self.head = nn.Sequential(make_norm(norm, width, "vector"), ACTIVATIONS[activation]())
        self.classifier = nn.Linear(width, classes)
        init_weights(self, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x.flatten(1)))))


class _PreActivationConvolution(nn.Module):
    def __init__(self, channels: int, norm: str, convolution: type[nn.Module], layout: str,
                 activation: str) -> None:
        super().__init__()
        self.norm = make_norm(norm, channels, layout)
        self.activation = ACTIVATIONS[activation]()
        self.conv = convolution(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.activation(self.norm(x)))


class DeepCNN(nn.Module):
    """``depth`` convolutions of ``channels`` channels (see the module docstring), with or
    without an identity skip around each one but the first, for images of shape
    ``image_shape`` (C, H, W); height 1 means a signal, with 1-D convolutions."""

    def __init__(self, image_shape: tuple[int, int, int], classes: int, depth: int,
                 channels: int, norm: str = "batch", skips: bool = False,
                 activation: str = "relu") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        in_channels, height, width = image_shape
        self.one_dimensional = height == 1
        convolution = nn.Conv1d if self.one_dimensional else nn.Conv2d
        layout = "sequence" if self.one_dimensional else "image"
        self.stem = convolution(in_channels, channels, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            _PreActivationConvolution(channels, norm, convolution, layout, activation)
            for _ in range(depth - 1)
        )
        self.head = nn.Sequential(make_norm(norm, channels, layout), ACTIVATIONS[activation]())
        # A stride-2 convolution of kernel 3 and padding 1 maps n positions to ceil(n / 2).
        positions = (width + 1) // 2 * (1 if self.one_dimensional else (height + 1) // 2)
        self.classifier = nn.Linear(channels * positions, classes)
        self.skips = skips
        init_weights(self, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_dimensional:
            x = x.flatten(2)  # (N, C, 1, L) -> (N, C, L)
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h) if self.skips else block(h)
        return self.classifier(self.head(h).flatten(1))


def _norm_and_skips(net: str) -> tuple[str, bool]:
    if net not in NETS:
        raise ValueError(f"unknown net '{net}': expected one of {', '.join(NETS)}")
    return NETS[net]


def build_cnn(net: str, image_shape: tuple[int, int, int], classes: int, depth: int,
              channels: int) -> DeepCNN:
    """The convolutional form of the net named ``net`` (a key of ``NETS``) with ``depth``
    convolutions."""
    norm, skips = _norm_and_skips(net)
    return DeepCNN(image_shape, classes, depth, channels, norm, skips)


def build_net(net: str, input_size: int, classes: int, depth: int, width: int) -> nn.Module:
    """The net named ``net`` (a key of ``NETS``) with ``depth`` hidden linear layers."""
    norm, skips = _norm_and_skips(net)
    if skips:
        return ResidualMLP(input_size, classes, depth, width, norm)
    return MLP(input_size, classes, depth=depth, width=width, norm=norm)


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """The hidden linear layers of an ``MLP`` or ``ResidualMLP``, first to last (not the
    classifier)."""
    return [module for module in model.modules()
            if isinstance(module, nn.Linear) and module is not model.classifier]
