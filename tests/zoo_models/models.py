"""The real architectures the zoo tests convert: torchvision's and timm's, random weights (no
download), built through tests/zoo.py (see there why torchvision needs help to import here).

Each model is built small (10 classes), seeded, with every batch norm's affine drawn away from
1 and 0 and its running statistics moved by two training batches, so that converting, folding
or exporting with a slip in any of them shows in the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tests.zoo import import_timm, import_torchvision, load_timm, load_torchvision


@dataclass(frozen=True)
class ZooModel:
    zoo: str
    build: Callable[[object], nn.Module]
    batch_norms: int  # every batch norm in the model
    foldable: int  # those that follow a convolution (or linear layer) alone
    activations: int  # of those, the ones that hold an activation fold keeps (timm's)
    slow: bool


MODELS = {
    "torchvision.resnet18": ZooModel(
        "torchvision", lambda tv: tv.models.resnet18(num_classes=10), 20, 20, 0, False),
    "torchvision.mobilenet_v3_small": ZooModel(
        "torchvision", lambda tv: tv.models.mobilenet_v3_small(num_classes=10), 34, 34, 0, True),
    "torchvision.efficientnet_b0": ZooModel(
        "torchvision", lambda tv: tv.models.efficientnet_b0(num_classes=10), 49, 49, 0, True),
    "torchvision.densenet121": ZooModel(
        "torchvision", lambda tv: tv.models.densenet121(num_classes=10), 121, 59, 0, True),
    "timm.resnet18": ZooModel(
        "timm", lambda timm: timm.create_model("resnet18", num_classes=10), 20, 20, 0, True),
    "timm.efficientnet_b0": ZooModel(
        "timm", lambda timm: timm.create_model("efficientnet_b0", num_classes=10), 49, 49, 33,
        True),
    "timm.mobilenetv3_small_100": ZooModel(
        "timm", lambda timm: timm.create_model("mobilenetv3_small_100", num_classes=10), 34, 34,
        23, False),
}

INPUT = (4, 3, 32, 32)


def names(slow_marker, default: tuple[str, ...] | None = None) -> list:
    """pytest parameters for every model, the slow ones marked (all but ``default`` when
    given)."""
    import pytest

    def slow(name: str) -> bool:
        return MODELS[name].slow if default is None else name not in default

    return [pytest.param(name, marks=[slow_marker] if slow(name) else []) for name in MODELS]


def is_batch_norm(module: nn.Module) -> bool:
    """torch's and ours (subclasses of torch's base), and the zoos' frozen classes."""
    from batchnorm.variants.frozen import _FrozenBatchNorm

    kind = type(module)
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm)) or (
        f"{kind.__module__}.{kind.__qualname__}" in (
            "torchvision.ops.misc.FrozenBatchNorm2d", "timm.layers.norm_act.FrozenBatchNormAct2d")
    )


def build(name: str, dtype: torch.dtype = torch.float32, in_test: bool = True) -> nn.Module:
    """The model in eval mode, its batch norms moved away from their initial state. In a test
    (``in_test``) a zoo that does not import skips the test; elsewhere it raises ImportError."""
    spec = MODELS[name]
    if in_test:
        zoo = import_torchvision() if spec.zoo == "torchvision" else import_timm()
    else:
        zoo = load_torchvision() if spec.zoo == "torchvision" else load_timm()
    torch.manual_seed(0)
    model = spec.build(zoo).to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if is_batch_norm(module) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
        model.train()
        for _ in range(2):
            model(torch.randn(*INPUT, generator=generator, dtype=dtype))
    return model.eval()
