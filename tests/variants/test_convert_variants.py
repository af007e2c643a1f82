import pytest
import torch
from torch import nn

import batchnorm

FORMS = ["batchnorm", "torch", "renorm", "ghost", "frozen"]


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 5), nn.BatchNorm1d(5, eps=1e-3))
    for _ in range(2):
        model(torch.randn(8, 3, 5, 5))
    return model.eval()


@pytest.mark.parametrize("first", FORMS)
@pytest.mark.parametrize("second", FORMS)
def test_round_trips_keep_state_and_eval_outputs(first, second):
    model = _model()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"virtual_batch_size": 4} if first == "ghost" else {}
    batchnorm.convert(model, to=first, **options)
    batchnorm.convert(model, to=second, **({"virtual_batch_size": 2} if second == "ghost" else {}))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model[1].eps == 1e-5 and model[5].eps == 1e-3
    if second == "ghost":
        assert model[1].virtual_batch_size == 2


def test_options_and_errors():
    model = _model()
    with pytest.raises(ValueError, match="needs virtual_batch_size"):
        batchnorm.convert(model, to="ghost")
    expected = r"takes options \['virtual_batch_size'\], got \['r_max'\]"
    with pytest.raises(ValueError, match=expected):
        batchnorm.convert(model, to="ghost", r_max=2.0)
    batchnorm.convert(model, to="renorm", r_max=1.5, d_max=0.5)
    assert model[1].r_max == 1.5 and model[5].d_max == 0.5


def test_fused_norm_act_is_not_silently_converted():
    model = nn.Sequential(batchnorm.BatchNormAct2d(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"0 \(BatchNormAct2d\)"):
        batchnorm.convert(model, to="torch")
    assert type(model[0]) is batchnorm.BatchNormAct2d
