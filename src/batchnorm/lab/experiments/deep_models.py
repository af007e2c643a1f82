"""Deep networks for the depth experiments (C7, C8): the lab's MLP, or the same layers with
identity skips, chosen by one name.

``ResidualMLP`` is the pre-activation form (He et al. 2016): a linear stem, then ``depth - 1``
blocks ``h <- h + Linear(relu(norm(h)))``, then ``relu(norm(h))`` and the classifier. With its
skips taken out it is exactly the lab's ``MLP`` (linear, norm, relu, ..., classifier), so the
only difference between the nets "batch" and "batch-residual" is the skips.
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


def build_net(net: str, input_size: int, classes: int, depth: int, width: int) -> nn.Module:
    """The net named ``net`` (a key of ``NETS``) with ``depth`` hidden linear layers."""
    if net not in NETS:
        raise ValueError(f"unknown net '{net}': expected one of {', '.join(NETS)}")
    norm, skips = NETS[net]
    if skips:
        return ResidualMLP(input_size, classes, depth, width, norm)
    return MLP(input_size, classes, depth=depth, width=width, norm=norm)


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """The hidden linear layers of an ``MLP`` or ``ResidualMLP``, first to last (not the
    classifier)."""
    return [module for module in model.modules()
            if isinstance(module, nn.Linear) and module is not model.classifier]
