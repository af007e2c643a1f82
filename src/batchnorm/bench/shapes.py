"""The benchmark's shape lists: batch-norm inputs of ResNet-50 layers and of MLPs (the default
run), every distinct batch-norm input of the whole-model suite's models (``--shape-set models``)
and the tiny layers where the per-call cost decides (``--shape-set small``).

ResNet-50 shapes are at batch 8 (a CPU-sized batch); each (C, H, W) is a distinct batch-norm
input of the network at 224x224 resolution. MLP shapes are (batch, features).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    size: tuple[int, ...]
    calls: int = 1  # MODEL_SHAPES: how many calls of the models' training forwards have it

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

# Every distinct batch-norm input of one training forward of the models that
# ``batchnorm bench --suite models`` times (batchnorm.bench.models.MODELS, at the batch and image
# size it times them on), named after the first layer that has it, with the number of calls of
# that size across the eight models (timm's resnet18, efficientnet_b0 and mobilenetv3 repeat
# torchvision's sizes). Recorded by ``python -m batchnorm.bench.models --record-shapes``.
MODEL_SHAPES = [
    Shape("torchvision.resnet18.bn1", (8, 64, 64, 64), 2),
    Shape("torchvision.resnet18.layer1.0.bn1", (8, 64, 32, 32), 9),
    Shape("torchvision.resnet18.layer2.0.bn1", (8, 128, 16, 16), 11),
    Shape("torchvision.resnet18.layer3.0.bn1", (8, 256, 8, 8), 11),
    Shape("torchvision.resnet18.layer4.0.bn1", (8, 512, 4, 4), 11),
    Shape("torchvision.resnet50.layer1.0.bn1", (8, 64, 16, 16), 6),
    Shape("torchvision.resnet50.layer1.0.bn3", (8, 256, 16, 16), 4),
    Shape("torchvision.resnet50.layer2.0.bn2", (8, 128, 8, 8), 7),
    Shape("torchvision.resnet50.layer2.0.bn3", (8, 512, 8, 8), 5),
    Shape("torchvision.resnet50.layer3.0.bn2", (8, 256, 4, 4), 11),
    Shape("torchvision.resnet50.layer3.0.bn3", (8, 1024, 4, 4), 7),
    Shape("torchvision.resnet50.layer4.0.bn2", (8, 512, 2, 2), 5),
    Shape("torchvision.resnet50.layer4.0.bn3", (8, 2048, 2, 2), 4),
    Shape("torchvision.mobilenet_v3_small.features.0.1", (16, 16, 80, 80), 2),
    Shape("torchvision.mobilenet_v3_small.features.1.block.0.1", (16, 16, 40, 40), 4),
    Shape("torchvision.mobilenet_v3_small.features.2.block.0.1", (16, 72, 40, 40), 2),
    Shape("torchvision.mobilenet_v3_small.features.2.block.1.1", (16, 72, 20, 20), 2),
    Shape("torchvision.mobilenet_v3_small.features.2.block.2.1", (16, 24, 20, 20), 4),
    Shape("torchvision.mobilenet_v3_small.features.3.block.0.1", (16, 88, 20, 20), 4),
    Shape("torchvision.mobilenet_v3_small.features.4.block.0.1", (16, 96, 20, 20), 2),
    Shape("torchvision.mobilenet_v3_small.features.4.block.1.1", (16, 96, 10, 10), 2),
    Shape("torchvision.mobilenet_v3_small.features.4.block.3.1", (16, 40, 10, 10), 6),
    Shape("torchvision.mobilenet_v3_small.features.5.block.0.1", (16, 240, 10, 10), 8),
    Shape("torchvision.mobilenet_v3_small.features.7.block.0.1", (16, 120, 10, 10), 4),
    Shape("torchvision.mobilenet_v3_small.features.7.block.3.1", (16, 48, 10, 10), 4),
    Shape("torchvision.mobilenet_v3_small.features.8.block.0.1", (16, 144, 10, 10), 4),
    Shape("torchvision.mobilenet_v3_small.features.9.block.0.1", (16, 288, 10, 10), 2),
    Shape("torchvision.mobilenet_v3_small.features.9.block.1.1", (16, 288, 5, 5), 2),
    Shape("torchvision.mobilenet_v3_small.features.9.block.3.1", (16, 96, 5, 5), 6),
    Shape("torchvision.mobilenet_v3_small.features.10.block.0.1", (16, 576, 5, 5), 10),
    Shape("torchvision.efficientnet_b0.features.0.1", (8, 32, 48, 48), 4),
    Shape("torchvision.efficientnet_b0.features.1.0.block.2.1", (8, 16, 48, 48), 2),
    Shape("torchvision.efficientnet_b0.features.2.0.block.0.1", (8, 96, 48, 48), 2),
    Shape("torchvision.efficientnet_b0.features.2.0.block.1.1", (8, 96, 24, 24), 2),
    Shape("torchvision.efficientnet_b0.features.2.0.block.3.1", (8, 24, 24, 24), 4),
    Shape("torchvision.efficientnet_b0.features.2.1.block.0.1", (8, 144, 24, 24), 6),
    Shape("torchvision.efficientnet_b0.features.3.0.block.1.1", (8, 144, 12, 12), 2),
    Shape("torchvision.efficientnet_b0.features.3.0.block.3.1", (8, 40, 12, 12), 4),
    Shape("torchvision.efficientnet_b0.features.3.1.block.0.1", (8, 240, 12, 12), 6),
    Shape("torchvision.efficientnet_b0.features.4.0.block.1.1", (8, 240, 6, 6), 2),
    Shape("torchvision.efficientnet_b0.features.4.0.block.3.1", (8, 80, 6, 6), 6),
    Shape("torchvision.efficientnet_b0.features.4.1.block.0.1", (8, 480, 6, 6), 12),
    Shape("torchvision.efficientnet_b0.features.5.0.block.3.1", (8, 112, 6, 6), 6),
    Shape("torchvision.efficientnet_b0.features.5.1.block.0.1", (8, 672, 6, 6), 10),
    Shape("torchvision.efficientnet_b0.features.6.0.block.1.1", (8, 672, 3, 3), 2),
    Shape("torchvision.efficientnet_b0.features.6.0.block.3.1", (8, 192, 3, 3), 8),
    Shape("torchvision.efficientnet_b0.features.6.1.block.0.1", (8, 1152, 3, 3), 16),
    Shape("torchvision.efficientnet_b0.features.7.0.block.3.1", (8, 320, 3, 3), 2),
    Shape("torchvision.efficientnet_b0.features.8.1", (8, 1280, 3, 3), 2),
    Shape("torchvision.densenet121.features.norm0", (4, 64, 48, 48), 1),
    Shape("torchvision.densenet121.features.denseblock1.denselayer1.norm1", (4, 64, 24, 24), 1),
    Shape("torchvision.densenet121.features.denseblock1.denselayer1.norm2", (4, 128, 24, 24), 7),
    Shape("torchvision.densenet121.features.denseblock1.denselayer2.norm1", (4, 96, 24, 24), 1),
    Shape("torchvision.densenet121.features.denseblock1.denselayer4.norm1", (4, 160, 24, 24), 1),
    Shape("torchvision.densenet121.features.denseblock1.denselayer5.norm1", (4, 192, 24, 24), 1),
    Shape("torchvision.densenet121.features.denseblock1.denselayer6.norm1", (4, 224, 24, 24), 1),
    Shape("torchvision.densenet121.features.transition1.norm", (4, 256, 24, 24), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer1.norm1", (4, 128, 12, 12), 13),
    Shape("torchvision.densenet121.features.denseblock2.denselayer2.norm1", (4, 160, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer3.norm1", (4, 192, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer4.norm1", (4, 224, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer5.norm1", (4, 256, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer6.norm1", (4, 288, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer7.norm1", (4, 320, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer8.norm1", (4, 352, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer9.norm1", (4, 384, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer10.norm1", (4, 416, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer11.norm1", (4, 448, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock2.denselayer12.norm1", (4, 480, 12, 12), 1),
    Shape("torchvision.densenet121.features.transition2.norm", (4, 512, 12, 12), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer1.norm1", (4, 256, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer1.norm2", (4, 128, 6, 6), 24),
    Shape("torchvision.densenet121.features.denseblock3.denselayer2.norm1", (4, 288, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer3.norm1", (4, 320, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer4.norm1", (4, 352, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer5.norm1", (4, 384, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer6.norm1", (4, 416, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer7.norm1", (4, 448, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer8.norm1", (4, 480, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer9.norm1", (4, 512, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer10.norm1", (4, 544, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer11.norm1", (4, 576, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer12.norm1", (4, 608, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer13.norm1", (4, 640, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer14.norm1", (4, 672, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer15.norm1", (4, 704, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer16.norm1", (4, 736, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer17.norm1", (4, 768, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer18.norm1", (4, 800, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer19.norm1", (4, 832, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer20.norm1", (4, 864, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer21.norm1", (4, 896, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer22.norm1", (4, 928, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer23.norm1", (4, 960, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock3.denselayer24.norm1", (4, 992, 6, 6), 1),
    Shape("torchvision.densenet121.features.transition3.norm", (4, 1024, 6, 6), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer1.norm1", (4, 512, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer1.norm2", (4, 128, 3, 3), 16),
    Shape("torchvision.densenet121.features.denseblock4.denselayer2.norm1", (4, 544, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer3.norm1", (4, 576, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer4.norm1", (4, 608, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer5.norm1", (4, 640, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer6.norm1", (4, 672, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer7.norm1", (4, 704, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer8.norm1", (4, 736, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer9.norm1", (4, 768, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer10.norm1", (4, 800, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer11.norm1", (4, 832, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer12.norm1", (4, 864, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer13.norm1", (4, 896, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer14.norm1", (4, 928, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer15.norm1", (4, 960, 3, 3), 1),
    Shape("torchvision.densenet121.features.denseblock4.denselayer16.norm1", (4, 992, 3, 3), 1),
    Shape("torchvision.densenet121.features.norm5", (4, 1024, 3, 3), 1),
]

# The tiny layers on which the per-call cost (module, checks, dispatch, autograd Function) is
# compared with torch's module call: an MLP's layer and a small convolutional one.
SMALL = [
    Shape("small.mlp", (64, 256)),
    Shape("small.conv", (32, 64, 8, 8)),
]

# Small stand-ins with the same structure, for a smoke run (--quick) and the tests.
QUICK = [
    Shape("conv.small", (4, 32, 16, 16)),
    Shape("mlp.small", (64, 128)),
]


SHAPE_SETS = {
    "default": RESNET50 + MLP,
    "models": MODEL_SHAPES,
    "small": SMALL,
    "all": RESNET50 + MLP + MODEL_SHAPES + SMALL,
}


def default_shapes() -> list[Shape]:
    return SHAPE_SETS["default"]
