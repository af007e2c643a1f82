import pytest
import torch
from torch import nn

import batchnorm


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
