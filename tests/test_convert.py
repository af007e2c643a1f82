import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.convert import FAMILIES


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
