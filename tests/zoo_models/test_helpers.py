"""The helpers people run on models, on models holding ours: fvcore's ``get_bn_modules`` and
``update_bn_stats``, timm's ``freeze_batch_norm_2d`` / ``unfreeze_batch_norm_2d``, torchvision's
``FrozenBatchNorm2d``, ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

Our ``BatchNorm1d/2d/3d`` subclass torch's, so the helpers that look for torch's classes find
them. Our layers that hold an activation are not torch's ``BatchNorm2d`` (torch has no class with
an activation; a helper that rebuilds every ``BatchNorm2d`` as a plain one would drop it): those
helpers skip them, and each test shows the package's own way for them (README, Deployment).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.modules.with_act import BatchNormWithAct2d
from batchnorm.variants.frozen import FrozenBatchNormWithAct2d


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), batchnorm.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), BatchNormWithAct2d(4, act=nn.SiLU()),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), batchnorm.BatchNorm1d(5),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return model


def _batches(count=5):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(8, 3, 6, 6, generator=generator) * 2 + 1 for _ in range(count)]


def test_fvcore_finds_our_batch_norms_and_precise_bn_finds_every_one():
    precise = pytest.importorskip("fvcore.nn.precise_bn")
    model = _model().train()
    found = precise.get_bn_modules(model)
    assert found == [model[1], model[7]]  # torch's classes: ours are among them
    assert model[4] not in found  # a layer with an activation is no torch BatchNorm2d
    # fvcore's update_bn_stats recomputes the ones it finds exactly as for torch's model
    reference = batchnorm.convert(copy.deepcopy(model), to="torch")
    assert type(reference[1]) is nn.BatchNorm2d
    precise.update_bn_stats(model, _batches(), num_iters=5)
    precise.update_bn_stats(reference, _batches(), num_iters=5)
    for index in (1, 7):
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(model[index], name),
                                       getattr(reference[index], name))
    # ours: batchnorm.precise_bn recomputes every batch norm, the fused one included
    before = model[4].running_mean.clone()
    batchnorm.precise_bn(model, _batches(), progress=False)
    assert not torch.equal(model[4].running_mean, before)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)


def test_timm_freeze_freezes_ours_into_torchvisions_class_and_skips_fused_layers():
    from tests.zoo import import_timm

    import_timm()
    from timm.layers import freeze_batch_norm_2d, unfreeze_batch_norm_2d
    from torchvision.ops.misc import FrozenBatchNorm2d as VisionFrozen

    model = _model()
    model.train()(_batches(1)[0])
    model.eval()
    x = _batches(1)[0]
    with torch.no_grad():
        expected = model(x)
    frozen = freeze_batch_norm_2d(copy.deepcopy(model))
    assert type(frozen[1]) is VisionFrozen  # our BatchNorm2d is a BatchNorm2d: frozen
    assert type(frozen[4]) is BatchNormWithAct2d  # skipped: it would have lost its SiLU
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected)
    # ours freezes every batch norm, the fused one with its activation
    ours = batchnorm.freeze(copy.deepcopy(model))
    assert type(ours[1]) is batchnorm.FrozenBatchNorm2d
    assert type(ours[4]) is FrozenBatchNormWithAct2d and type(ours[4].act) is nn.SiLU
    with torch.no_grad():
        torch.testing.assert_close(ours.train()(x), expected)
    # timm's unfreeze knows torchvision's class; ours knows both
    assert type(unfreeze_batch_norm_2d(frozen)[1]) is nn.BatchNorm2d
    assert type(unfreeze_batch_norm_2d(copy.deepcopy(ours))[1]) is batchnorm.FrozenBatchNorm2d
    batchnorm.unfreeze(ours)
    assert type(ours[1]) is batchnorm.BatchNorm2d and type(ours[4]) is BatchNormWithAct2d


def test_torchvision_models_built_frozen_convert_both_ways():
    from tests.zoo import import_torchvision

    torchvision = import_torchvision()
    from torchvision.ops.misc import FrozenBatchNorm2d as VisionFrozen

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=VisionFrozen).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, VisionFrozen):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    ours = batchnorm.convert(copy.deepcopy(model))
    norms = [m for m in ours.modules() if isinstance(m, batchnorm.FrozenBatchNorm2d)]
    assert len(norms) == 20 and list(ours.state_dict()) == keys
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "bn" in n)
    with torch.no_grad():
        torch.testing.assert_close(ours.train()(x), expected)
    back = batchnorm.convert(ours, to="torch")
    assert sum(type(m) is VisionFrozen for m in back.modules()) == 20
    with torch.no_grad():
        assert torch.equal(back(x), expected)


def test_convert_sync_batchnorm_takes_ours_and_ours_names_what_it_leaves():
    model = _model()
    model.train()(_batches(1)[0])
    model.eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[7]) is nn.SyncBatchNorm
    for index in (1, 7):
        for key, value in model[index].state_dict().items():
            assert torch.equal(synced[index].state_dict()[key], value)
    # torch's helper turns any batch norm into a plain SyncBatchNorm: a layer's activation is
    # lost (it does the same to timm's BatchNormAct2d, for which timm has its own helper)
    assert type(synced[4]) is nn.SyncBatchNorm
    features = nn.Sequential(*model[:4])(_batches(1)[0])
    with torch.no_grad():  # SiLU never goes below -0.28; the plain batch norm does
        assert model[4](features).min() > -0.28 and synced[4](features).min() < -0.5
    # ours converts the plain ones and leaves the fused one, named in a warning
    with pytest.warns(UserWarning, match=r"to='sync' has no form .*: 4 \(BatchNormWithAct2d\)"):
        ours = batchnorm.convert(copy.deepcopy(model), sync=True)
    assert type(ours[1]) is batchnorm.SyncBatchNorm and type(ours[4]) is BatchNormWithAct2d
