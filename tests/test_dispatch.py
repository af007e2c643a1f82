"""Every backend the dispatcher can choose gives torch.nn's results: the differential tests of
the core, run on each path."""

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import dispatch
from tests.conftest import assert_close, make_input

CASES = [
    ((6, 5), "contiguous"),
    ((4, 3, 7), "contiguous"),
    ((4, 3, 7), "strided"),
    ((3, 4, 5, 6), "contiguous"),
    ((3, 4, 5, 6), "channels_last"),
    ((2, 3, 3, 4, 2), "channels_last"),
]
MODULES = {2: (batchnorm.BatchNorm1d, nn.BatchNorm1d), 3: (batchnorm.BatchNorm1d, nn.BatchNorm1d),
           4: (batchnorm.BatchNorm2d, nn.BatchNorm2d), 5: (batchnorm.BatchNorm3d, nn.BatchNorm3d)}


@pytest.mark.parametrize("backend_name", dispatch.available_backends())
@pytest.mark.parametrize("shape, layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backend_matches_torch(backend_name, shape, layout, dtype):
    x = make_input(shape, dtype, layout, seed=1, scale=2.0, offset=3.0)
    backend = dispatch._BACKENDS[backend_name]
    if not backend.supports(x):
        pytest.skip(f"{backend_name} does not take {dtype} {layout}")
    grad = make_input(shape, dtype, layout, seed=2)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours_cls, theirs_cls = MODULES[len(shape)]
    ours, theirs = ours_cls(shape[1], dtype=param_dtype), theirs_cls(shape[1], dtype=param_dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    with batchnorm.use_backend(backend_name):
        assert batchnorm.select_backend(x).name == backend_name
        for module in (ours, theirs):
            for _step in range(2):
                xr = x.detach().clone().requires_grad_(True)
                y = module(xr)
                grads = torch.autograd.grad(y, (xr, module.weight, module.bias), grad)
                module._last = (y.detach(), *grads)
            module.eval()
            with torch.no_grad():
                module._eval = module(x)
    for o, t in zip(ours._last, theirs._last, strict=True):
        assert_close(o, t, dtype, scale=20)
    assert_close(ours._eval, theirs._eval, dtype)
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, param_dtype)


def test_use_backend_restores_and_rejects_unknown():
    before = batchnorm.select_backend(torch.randn(2, 2)).name
    with batchnorm.use_backend("reference"):
        assert batchnorm.select_backend(torch.randn(2, 2)).name == "reference"
    assert batchnorm.select_backend(torch.randn(2, 2)).name == before
    with pytest.raises(ValueError, match="unknown batch norm backend 'nope'"):
        with batchnorm.use_backend("nope"):
            pass


def test_no_torch_batch_norm_in_the_path(monkeypatch):
    """Our path never calls torch's batch norm: poison every entry point and run ours."""

    def poisoned(*args, **kwargs):
        raise AssertionError("torch's batch norm was called")

    for name in ("batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                 "_native_batch_norm_legit_no_training", "cudnn_batch_norm"):
        if hasattr(torch, name):
            monkeypatch.setattr(torch, name, poisoned)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", poisoned)
    module = batchnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    module(x).sum().backward()
    module.eval()
    module(x)
