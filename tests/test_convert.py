import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.convert import FAMILIES
from batchnorm.modules.with_act import BatchNormWithAct2d
from batchnorm.variants.frozen import FrozenBatchNormWithAct2d


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
        nn.Sequential(nn.Identity()),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, eps=1e-3, affine=False),
    )


def test_convert_both_ways_keeps_state_and_outputs():
    torch.manual_seed(0)
    model = _model()
    model(torch.randn(8, 3, 8, 8))  # move the running statistics
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ours = batchnorm.convert(model)
    assert type(ours[1]) is batchnorm.BatchNorm2d and type(ours[6]) is batchnorm.BatchNorm1d
    assert ours[1].momentum is None and ours[6].eps == 1e-3 and not ours[6].affine
    assert not ours[1].training
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(ours(x), before)
    back = batchnorm.convert(ours, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back[6]) is nn.BatchNorm1d
    with torch.no_grad():
        torch.testing.assert_close(back(x), before)
    back.train()
    ours2 = batchnorm.convert(_model())
    ours2.load_state_dict(back.state_dict())
    ours2.train()
    xt = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(ours2(xt), back(xt))


def test_convert_a_bare_batch_norm_and_float64():
    bn = nn.BatchNorm3d(2, dtype=torch.float64)
    ours = batchnorm.convert(bn)
    assert type(ours) is batchnorm.BatchNorm3d and ours.weight.dtype == torch.float64


def test_subclasses_are_left_alone_with_a_warning():
    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Custom(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"0 \(.*Custom\)"):
        batchnorm.convert(model)
    assert type(model[0]) is Custom and type(model[1]) is batchnorm.BatchNorm2d


def test_unknown_target():
    with pytest.raises(ValueError, match=r"expected to= one of .*'torch'.* got to='keras'"):
        batchnorm.convert(nn.Sequential(), to="keras")


@pytest.mark.parametrize("to", ["batchnorm", "renorm", "ghost", "frozen", "sync", "torch_sync"])
def test_bias_false_converts_there_and_back(to):
    def torch_model():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, bias=False), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5))

    torch.manual_seed(0)
    model = torch_model()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    model(torch.randn(8, 3, 4, 4))
    model.eval()
    model[1].weight.requires_grad_(False)
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"virtual_batch_size": 4} if to == "ghost" else {}
    batchnorm.convert(model, to=to, **options)
    converted = model[1]
    assert type(converted) is FAMILIES[to][1]
    assert converted.bias is None and converted.weight is not None
    assert model[5].bias is not None  # the other layer keeps its shift
    if isinstance(converted.weight, nn.Parameter):
        assert not converted.weight.requires_grad and model[5].weight.requires_grad
    assert "1.bias" not in model.state_dict() and "5.bias" in model.state_dict()
    torch_model().load_state_dict(model.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    # synchronized forms do not record 1d/2d/3d: they go back to the other synchronized form
    back_to = {"sync": "torch_sync", "torch_sync": "sync"}.get(to, "torch")
    batchnorm.convert(model, to=back_to)
    assert type(model[1]) is FAMILIES[back_to][1]
    assert model[1].bias is None
    if back_to == "torch":
        model.load_state_dict(torch_model().state_dict(), strict=True)  # the same keys
        model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bias_false_reaches_a_form_without_the_keyword(monkeypatch):
    """A registered form whose constructor has no ``bias`` (as torch's before 2.13): convert
    drops the shift it built, parameter or buffer alike."""
    import importlib

    # batchnorm.convert is the function; the module is reached by its name
    convert_module = importlib.import_module("batchnorm.convert")
    for table in ("FAMILIES", "_KNOWN", "_OPTIONS"):
        monkeypatch.setattr(convert_module, table, dict(getattr(convert_module, table)))

    def without_keyword(base):
        class Form(base):
            def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                         track_running_stats=True, device=None, dtype=None):
                super().__init__(num_features, eps, momentum, affine, track_running_stats,
                                 device, dtype)

        return Form

    trainable = without_keyword(batchnorm.BatchNorm2d)
    frozen = without_keyword(batchnorm.FrozenBatchNorm2d)
    convert_module.register_family("old", (trainable,) * 3)
    convert_module.register_family("old_frozen", (frozen,) * 3)
    source = nn.BatchNorm2d(3, bias=False)
    with torch.no_grad():
        source.weight.uniform_(0.5, 1.5)
    for to, cls in (("old", trainable), ("old_frozen", frozen)):
        converted = batchnorm.convert(source, to=to)
        assert type(converted) is cls and converted.bias is None
        assert converted.state_dict().keys() == source.state_dict().keys()
        assert torch.equal(converted.weight, source.weight)


# Model zoos' classes: timm's norm + activation layers and the frozen layers of timm and
# torchvision, in small models (tests/zoo_models converts whole architectures).


def _moved(model: nn.Module, shape=(8, 3, 6, 6)) -> nn.Module:
    """Statistics and affine away from their initial values (frozen layers' buffers too)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for name in ("weight", "running_var"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.uniform_(0.5, 1.5)
            for name in ("bias", "running_mean"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.normal_(0, 0.5)
        model.train()
        model(torch.randn(*shape))
    return model


def _timm_model(timm, act_layer, frozen=False):
    from timm.layers import BatchNormAct2d, freeze_batch_norm_2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          BatchNormAct2d(4, act_layer=act_layer, momentum=0.3))
    model = _moved(model)
    return freeze_batch_norm_2d(model) if frozen else model


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


ACTIVATIONS = {  # timm act_layer -> whether our kernel computes it
    "silu": (nn.SiLU, True),
    "relu": (nn.ReLU, True),
    "identity": (nn.Identity, True),
    "hardswish": (nn.Hardswish, False),
    "prelu": (nn.PReLU, False),  # an activation with a parameter: key act.weight
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_timm_batch_norm_act_converts_both_ways(activation):
    from tests.zoo import import_timm

    timm = import_timm()
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d

    act_layer, fused = ACTIVATIONS[activation]
    original = _timm_model(timm, act_layer)
    act, drop = original[1].act, original[1].drop
    reference = copy.deepcopy(original)
    keys = list(original.state_dict())
    state = {k: v.clone() for k, v in original.state_dict().items()}

    ours = batchnorm.convert(original)
    layer = ours[1]
    assert type(layer) is BatchNormWithAct2d and layer.fused is fused
    assert layer.act is act and layer.drop is drop and layer.momentum == 0.3
    assert list(ours.state_dict()) == keys
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key

    back = batchnorm.convert(copy.deepcopy(ours), to="torch")
    assert type(back[1]) is TimmBatchNormAct2d and back[1].training
    assert type(back[1].act) is type(act) and type(back[1].drop) is type(drop)
    assert list(back.state_dict()) == keys
    x = torch.randn(8, 3, 6, 6)
    for model in (back, reference):
        model.eval()
    with torch.no_grad():  # timm's own layer again: its own outputs, to the bit
        assert torch.equal(back(x), reference(x))

    for mode in ("train", "eval"):  # outputs, gradients and running statistics
        ours.train(mode == "train")
        reference.train(mode == "train")
        got, expected = _train_step(ours, x), _train_step(reference, x)
        for a, b in zip(got[:2], expected[:2], strict=True):
            torch.testing.assert_close(a, b)
        for name, grad in expected[2].items():
            if name == "0.bias" and mode == "train":
                # zero through batch statistics, up to the rounding of sums over a channel's
                # n = 288 values with |dL/dy| <= 1 (about n * eps each)
                bound = 4 * 288 * torch.finfo(torch.float32).eps
                assert grad.abs().max() < bound and got[2][name].abs().max() < bound
                continue
            torch.testing.assert_close(got[2][name], grad, msg=name)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_fused_layer_follows_children_replaced_later():
    layer = BatchNormWithAct2d(3, act=nn.ReLU()).eval()
    x = torch.randn(4, 3, 2, 2)
    assert layer.activation == "relu" and bool((layer(x) >= 0).all())
    layer.act = nn.Tanh()
    torch.testing.assert_close(layer(x), torch.tanh(nn.functional.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias)))
    assert not layer.fused and layer.activation == "identity"
    layer.act, layer.drop = nn.SiLU(), nn.Dropout(0.0)
    assert layer(x).min() < 0 and not layer.fused  # dropout between: not our fused SiLU


@pytest.mark.parametrize("activation", ["silu", "hardswish"])
def test_timm_frozen_layers_convert_both_ways_with_their_keys(activation):
    from tests.zoo import import_timm

    timm = import_timm()
    from timm.layers import FrozenBatchNormAct2d

    act_layer, _ = ACTIVATIONS[activation]
    original = _timm_model(timm, act_layer, frozen=True).eval()
    assert type(original[1]) is FrozenBatchNormAct2d
    reference = copy.deepcopy(original)
    keys = list(original.state_dict())
    assert "1.num_batches_tracked" not in keys
    ours = batchnorm.convert(original)
    assert type(ours[1]) is FrozenBatchNormWithAct2d and type(ours[1].act) is act_layer
    assert list(ours.state_dict()) == keys
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours.train()(x), reference(x))  # frozen in training too
    back = batchnorm.convert(ours, to="torch")
    assert type(back[1]) is FrozenBatchNormAct2d
    assert back[1].num_features == 4 and back[1].affine  # set by timm's freeze, kept
    with torch.no_grad():
        assert torch.equal(back(x), reference(x))


def test_torchvision_frozen_layer_converts_both_ways_with_its_keys():
    from tests.zoo import import_torchvision

    import_torchvision()
    from torchvision.ops.misc import FrozenBatchNorm2d as VisionFrozen

    original = _moved(nn.Sequential(nn.Conv2d(3, 4, 3), VisionFrozen(4, eps=1e-3))).eval()
    reference = copy.deepcopy(original)
    keys = list(original.state_dict())
    ours = batchnorm.convert(original)
    assert type(ours[1]) is batchnorm.FrozenBatchNorm2d and ours[1].eps == 1e-3
    assert list(ours.state_dict()) == keys  # no num_batches_tracked, as torchvision's
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours.train()(x), reference(x))
    back = batchnorm.convert(ours, to="torch")
    assert type(back[1]) is VisionFrozen and back[1].eps == 1e-3
    with torch.no_grad():
        assert torch.equal(back(x), reference(x))
    # unfrozen it is torch's trainable class (torchvision has none), frozen again torchvision's
    batchnorm.unfreeze(back)
    assert type(back[1]) is batchnorm.BatchNorm2d and back[1].weight.requires_grad
    assert type(batchnorm.convert(copy.deepcopy(back), to="torch")[1]) is nn.BatchNorm2d
    batchnorm.freeze(back)
    assert type(batchnorm.convert(back, to="torch")[1]) is VisionFrozen


def test_freezing_and_unfreezing_timm_layers_moves_between_timm_classes():
    from tests.zoo import import_timm

    timm = import_timm()
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
    from timm.layers import FrozenBatchNormAct2d

    model = _timm_model(timm, nn.SiLU).eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    batchnorm.freeze(model)
    assert type(model[1]) is FrozenBatchNormWithAct2d and type(model[1].act) is nn.SiLU
    assert type(copy.deepcopy(batchnorm.convert(copy.deepcopy(model), to="torch"))[1]) is (
        FrozenBatchNormAct2d
    )
    batchnorm.unfreeze(model)
    assert type(model[1]) is BatchNormWithAct2d and model[1].fused
    assert type(batchnorm.convert(model, to="torch")[1]) is TimmBatchNormAct2d
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_to_batchnorm_keeps_frozen_layers_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.FrozenBatchNorm2d(4), nn.BatchNorm2d(4))
    batchnorm.convert(model)
    assert type(model[1]) is batchnorm.FrozenBatchNorm2d
    assert type(model[2]) is batchnorm.BatchNorm2d
    batchnorm.unfreeze(model)
    assert type(model[1]) is batchnorm.BatchNorm2d


@pytest.mark.parametrize("to", ["renorm", "ghost", "sync", "torch_sync", "torch"])
def test_a_layer_with_an_activation_is_left_where_the_form_has_none(to):
    model = nn.Sequential(BatchNormWithAct2d(3, act=nn.ReLU()), nn.BatchNorm2d(3))
    options = {"virtual_batch_size": 2} if to == "ghost" else {}
    reason = "torch has no batch norm" if to == "torch" else f"to='{to}' has no form"
    with pytest.warns(UserWarning, match=rf"{reason}.*: 0 \(BatchNormWithAct2d\)"):
        batchnorm.convert(model, to=to, **options)
    assert type(model[0]) is BatchNormWithAct2d and type(model[1]) is FAMILIES[to][1]


def test_frozen_layers_load_zoo_checkpoints_without_a_count():
    zoo_state = {k: v for k, v in batchnorm.FrozenBatchNorm2d(3).state_dict().items()
                 if k != "num_batches_tracked"}
    frozen = batchnorm.FrozenBatchNorm2d(3)
    frozen.num_batches_tracked.fill_(7)
    frozen.load_state_dict(zoo_state, strict=True)
    assert frozen.num_batches_tracked == 0
    without = batchnorm.FrozenBatchNorm2d(3)
    without.register_buffer("num_batches_tracked", None)  # as converted from a zoo's layer
    without.load_state_dict(batchnorm.FrozenBatchNorm2d(3).state_dict(), strict=True)
    assert "num_batches_tracked" not in without.state_dict()


@pytest.mark.parametrize("to", ["batchnorm", "frozen", "torch"])
def test_a_form_with_state_of_its_own_converts_without_it(to):
    """Cross-iteration batch norm keeps a history in its state dict; another form has no place
    for it: the batch norm's own state converts, the history stays behind."""
    from batchnorm.variants.cross_iteration import CrossIterationBatchNorm2d, link_preceding

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), CrossIterationBatchNorm2d(4, window=2))
    link_preceding(model, torch.randn(2, 3, 6, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        optimizer.step()
    assert int(model[1].history_recorded) == 3
    kept = {k: v.clone() for k, v in model.state_dict().items() if "history" not in k}
    batchnorm.convert(model, to=to)
    assert type(model[1]) is FAMILIES[to][1]
    assert {k: v for k, v in model.state_dict().items()}.keys() == kept.keys()
    for key, value in kept.items():
        assert torch.equal(model.state_dict()[key], value), key
