"""The benchmark's fixed shape list: batch-norm inputs of ResNet-50 layers and of MLPs.

ResNet-50 shapes are at batch 8 (a CPU-sized batch); each (C, H, W) is a distinct batch-norm
input of the network at 224x224 resolution. MLP shapes are (batch, features).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    size: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for s in self.size:
            count *= s
        return count


RESNET50 = [
    Shape("resnet50.stem", (8, 64, 112, 112)),
    Shape("resnet50.layer1.bn1", (8, 64, 56, 56)),
    Shape("resnet50.layer1.bn3", (8, 256, 56, 56)),
    Shape("resnet50.layer2.bn1", (8, 128, 28, 28)),
    Shape("resnet50.layer2.bn3", (8, 512, 28, 28)),
    Shape("resnet50.layer3.bn1", (8, 256, 14, 14)),
    Shape("resnet50.layer3.bn3", (8, 1024, 14, 14)),
    Shape("resnet50.layer4.bn1", (8, 512, 7, 7)),
    Shape("resnet50.layer4.bn3", (8, 2048, 7, 7)),
]

MLP = [
    Shape("mlp.256x1024", (256, 1024)),
    Shape("mlp.1024x4096", (1024, 4096)),
    Shape("mlp.4096x256", (4096, 256)),
    Shape("mlp.60x100", (60, 100)),
]

# Small stand-ins with the same structure, for a smoke run (--quick) and the tests.
QUICK = [
    Shape("conv.small", (4, 32, 16, 16)),
    Shape("mlp.small", (64, 128)),
]


def default_shapes() -> list[Shape]:
    return RESNET50 + MLP
