"""Eval latency of a ResNet-style CNN with its batch norms folded, against the same model
unfolded: what folding buys at inference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.bench.timing import Comparison, compare
from batchnorm.modules.batchnorm import BatchNorm2d
from batchnorm.variants.fold import fold


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


def resnet_like(width: int = 32, blocks: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), BatchNorm2d(width), nn.ReLU(),
        *[_Block(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


@dataclass(frozen=True)
class FoldRow:
    input_size: tuple[int, ...]
    folded: int
    comparison: Comparison  # folded / unfolded


def run_fold(batch: int = 16, resolution: int = 32, rounds: int = 15) -> FoldRow:
    torch.manual_seed(0)
    model = resnet_like()
    x = torch.randn(batch, 3, resolution, resolution)
    with torch.no_grad():
        model(x)  # running statistics away from their initial values
    model.eval()
    folded, report = fold(model, return_report=True)

    def unfolded_step() -> None:
        with torch.no_grad():
            model(x)

    def folded_step() -> None:
        with torch.no_grad():
            folded(x)

    comparison = compare(folded_step, unfolded_step, rounds=rounds)
    return FoldRow(tuple(x.shape), len(report.folded), comparison)


def format_fold(row: FoldRow) -> str:
    c = row.comparison
    return (
        "| model | input | folded BNs | unfolded (ms) | folded (ms) | folded/unfolded (median) |\n"
        "|---|---|---:|---:|---:|---:|\n"
        f"| ResNet-style CNN (width 32, 4 blocks) | {'x'.join(map(str, row.input_size))} | "
        f"{row.folded} | {c.baseline_median_s * 1e3:.3f} | {c.candidate_median_s * 1e3:.3f} | "
        f"{c.median_ratio:.2f} |"
    )
