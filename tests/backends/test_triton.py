"""The Triton kernels against the NumPy float64 reference and torch, on every layout and dtype
they take: statistics, outputs, running statistics and gradients, plain and fused with ReLU (or
silu/gelu around them) and a residual.

With a CUDA GPU (and ``TRITON_INTERPRET`` unset) the compiled kernels run on it. Elsewhere the
same kernels run in Triton's interpreter on CPU tensors: the module sets ``TRITON_INTERPRET=1``
while it imports Triton (a process holds compiled or interpreted kernels, chosen then), puts the
environment back, and sets the variable again around each of its tests only. Skipped where
Triton is not installed. Inputs stay small, since the interpreter pays per operation; the larger
cases are marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from tests.conftest import TRITON_INTERPRETED  # noqa: E402

_INTERPRET = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"
if (
    _INTERPRET and "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
    and not TRITON_INTERPRETED
):
    pytest.skip("triton was imported before TRITON_INTERPRET could be set; run this module "
                "with TRITON_INTERPRET=1", allow_module_level=True)
_saved = os.environ.get("TRITON_INTERPRET")
if _INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import batchnorm
    from batchnorm.backends import triton as backend

    backend.load_kernels()
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from batchnorm import reference  # noqa: E402
from tests.conftest import (  # noqa: E402
    assert_close,
    assert_close_with,
    input_gradient_rounding,
    make_input,
)

DEVICE = "cpu" if _INTERPRET else "cuda"
HALF = [torch.float16, torch.bfloat16]
# Tiles of 16 float32 values, 4 channels per rows column and up to 16 programs per column:
# small inputs then cross every boundary (tile masks in both axes, several tiles per program,
# several partials per channel, joined over several steps).
TINY = backend.Profile(tile_bytes=64, block_channels=4, programs=16, finalize_block=(4, 4))


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if _INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(backend, "profile_for", lambda device: TINY)


def _numpy(t):
    return None if t is None else t.detach().double().cpu().numpy()


def _tensor(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _on_device(*tensors):
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def _parameters(channels, seed, affine=True):
    if not affine:
        return None, None
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    return _on_device(weight, bias)


def _inputs(shape, dtype, layout, seed, scale=2.0, offset=-1.5):
    x = make_input(shape, dtype, layout, seed=seed, scale=scale, offset=offset)
    g = make_input(shape, dtype, layout, seed=seed + 1)
    return _on_device(x, g)


def check_against_reference(shape, layout, dtype, affine=True, seed=3, offset=-1.5):
    """Training and eval, forward and backward, against the float64 reference of the rounded
    inputs: outputs to the input dtype's tolerance, statistics and parameter gradients (float32
    everywhere) to float32's, scaled with sqrt(values per channel) for sums."""
    x, g = _inputs(shape, dtype, layout, seed, offset=offset)
    weight, bias = _parameters(shape[1], seed, affine)
    count_scale = max(1.0, float(np.sqrt(x.numel() / shape[1])))
    eps = 1e-5

    y, mean, var = backend.train_forward(x, weight, bias, eps)
    ref_y, ref_mean, ref_var = reference.forward_train(_numpy(x), _numpy(weight), _numpy(bias),
                                                       eps)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    if layout == "channels_last":
        assert y.stride() == x.stride()
    assert mean.dtype == var.dtype == torch.float32
    assert_close(y.cpu(), _tensor(ref_y), dtype)
    assert_close(mean.cpu(), _tensor(ref_mean), torch.float32)
    assert_close(var.cpu(), _tensor(ref_var), torch.float32, scale=4)

    dx, dw, db = backend.train_backward(g, x, mean, var, weight, eps, (True, True, True))
    ref_dx, ref_dw, ref_db = reference.backward_train(_numpy(g), _numpy(x), _numpy(weight), eps)
    assert dx.dtype == x.dtype and (layout == "strided" or dx.stride() == x.stride())
    allowance = input_gradient_rounding(x.cpu(), g.cpu(), None if weight is None else
                                        weight.cpu(), eps, dtype)
    assert_close_with(dx.cpu(), _tensor(ref_dx), dtype, allowance, scale=4)
    if affine:
        assert_close(dw.cpu(), _tensor(ref_dw), torch.float32, scale=4 * count_scale)
    else:
        assert dw is None
    assert_close(db.cpu(), _tensor(ref_db), torch.float32, scale=4 * count_scale)

    generator = torch.Generator().manual_seed(seed + 7)
    running_mean, running_var = _on_device(torch.randn(shape[1], generator=generator),
                                           torch.rand(shape[1], generator=generator) + 0.5)
    y_eval = backend.eval_forward(x, running_mean, running_var, weight, bias, eps)
    ref_eval = reference.forward(_numpy(x), _numpy(running_mean), _numpy(running_var),
                                 _numpy(weight), _numpy(bias), eps)
    assert_close(y_eval.cpu(), _tensor(ref_eval), dtype)
    dx, dw, db = backend.eval_backward(g, x, running_mean, running_var, weight, eps,
                                       (True, affine, True))
    ref_dx, ref_dw, ref_db = reference.backward_eval(_numpy(g), _numpy(x), _numpy(running_mean),
                                                     _numpy(running_var), _numpy(weight), eps)
    assert_close(dx.cpu(), _tensor(ref_dx), dtype, scale=4)
    if affine:
        assert_close(dw.cpu(), _tensor(ref_dw), torch.float32, scale=4 * count_scale)
    assert_close(db.cpu(), _tensor(ref_db), torch.float32, scale=4 * count_scale)


# (shape, layout): rows ((N, C), S == 1, channels_last) and planes (contiguous with S > 1)
CASES = [
    ((4, 3, 64, 64), "contiguous"),  # small C, large N*H*W: several tiles and programs
    ((4, 3, 64, 64), "channels_last"),
    ((20, 6, 600), "contiguous"),  # the [20, 6, 65536] pattern, scaled down
    ((2, 1000), "contiguous"),  # C = 1000 with no spatial size: four rows columns
    ((2, 1000, 2, 1), "channels_last"),  # C = 1000, N*H*W = 4
    ((3, 7, 5, 3), "contiguous"),  # odd sizes: masks on both tile axes
    ((3, 7, 5, 3), "channels_last"),
    ((5, 6, 7), "contiguous"),  # (N, C, L), non-power-of-two channels
    ((2, 5), "contiguous"),  # N*H*W = 2
    ((1, 5, 2), "contiguous"),  # N*H*W = 2 in planes
    ((2, 3, 4, 3, 2), "contiguous"),  # 3D
    ((2, 3, 4, 3, 2), "channels_last"),  # channels_last_3d
    ((4, 12, 6), "strided"),  # not dense: copied to contiguous first
]


@pytest.mark.parametrize("shape, layout", CASES)
def test_float32_matches_reference(shape, layout):
    check_against_reference(shape, layout, torch.float32)


@pytest.mark.parametrize("shape, layout", [CASES[i] for i in (0, 4, 5, 11)])
@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs_match_reference_with_float32_statistics(shape, layout, dtype):
    check_against_reference(shape, layout, dtype)


@pytest.mark.parametrize("shape, layout", [((5, 3, 9, 7), "contiguous"),
                                           ((5, 3, 9, 7), "channels_last"),
                                           ((40, 6), "contiguous"),
                                           ((8, 9, 5), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_tiles_cross_every_boundary(tiny_tiles, shape, layout, dtype):
    x = torch.empty(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    prepared = backend._prepare(x)[2]
    assert prepared.tiles_per_program > 1 or prepared.programs > TINY.finalize_block[0]
    check_against_reference(shape, layout, dtype, affine=shape[1] % 2 == 1)


def test_tiny_tiles_split_channels_into_many_programs(tiny_tiles):
    """The profile above really makes several partials (more than one join step) and several
    tiles per program, in both layouts."""
    planes = backend._prepare(torch.empty(5, 3, 9, 7))[2]
    rows = backend._prepare(torch.empty(5, 3, 9, 7).contiguous(
        memory_format=torch.channels_last))[2]
    assert not planes.rows and rows.rows
    for geometry in (planes, rows):
        assert geometry.programs > TINY.finalize_block[0] and geometry.tiles_per_program > 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_absent_and_no_gradient_wanted(layout):
    """No weight, no bias; only some gradients asked for; the others come back None."""
    shape = (3, 4, 5, 6)
    x, g = _inputs(shape, torch.float32, layout, seed=4)
    _, mean, var = backend.train_forward(x, None, None, 1e-5)
    dx, dw, db = backend.train_backward(g, x, mean, var, None, 1e-5, (True, True, False))
    ref_dx, _, _ = reference.backward_train(_numpy(g), _numpy(x), None, 1e-5)
    assert dw is None and db is None
    assert_close(dx.cpu(), _tensor(ref_dx), torch.float32, scale=4)
    weight, _ = _parameters(4, seed=4)
    dx, dw, db = backend.train_backward(g, x, mean, var, weight, 1e-5, (False, True, True))
    _, ref_dw, ref_db = reference.backward_train(_numpy(g), _numpy(x), _numpy(weight), 1e-5)
    assert dx is None
    assert_close(dw.cpu(), _tensor(ref_dw), torch.float32, scale=40)
    assert_close(db.cpu(), _tensor(ref_db), torch.float32, scale=40)


@pytest.mark.parametrize("shape, layout", [((4, 3, 64, 64), "contiguous"),
                                           ((4, 3, 64, 64), "channels_last"),
                                           ((60, 3), "contiguous")])
def test_variance_is_stable_for_a_large_mean(shape, layout):
    """Mean 1e4 and standard deviation 1 in float32: E[x^2] - E[x]^2 would lose every digit,
    within a program or in the join of the programs' partials."""
    x = make_input(shape, torch.float32, layout, seed=5, offset=1e4).to(DEVICE)
    _, mean, var = backend.train_forward(x, None, None, 1e-5)
    ref_mean, ref_var = reference.moments(_numpy(x))
    np.testing.assert_allclose(var.double().cpu().numpy(), ref_var, rtol=1e-4)
    np.testing.assert_allclose(mean.double().cpu().numpy(), ref_mean, rtol=1e-7)


def test_variance_is_stable_across_many_partials(tiny_tiles):
    """The same with dozens of programs per channel, each shifted by its own first tile, and a
    channel whose values drift from one end to the other (a program's first tile is far from the
    channel's mean)."""
    x = make_input((8, 2, 12, 10), torch.float32, "contiguous", seed=6, offset=1e4)
    x[:, 1] += torch.linspace(0, 50, 8 * 120).reshape(8, 12, 10)
    x = x.to(DEVICE)
    assert backend._prepare(x)[2].programs > 4
    _, mean, var = backend.train_forward(x, None, None, 1e-5)
    ref_mean, ref_var = reference.moments(_numpy(x))
    np.testing.assert_allclose(var.double().cpu().numpy(), ref_var, rtol=1e-4)
    np.testing.assert_allclose(mean.double().cpu().numpy(), ref_mean, rtol=1e-7)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_input_reaches_its_channel_only(layout):
    x = make_input((2, 3, 4, 4), torch.float32, layout)
    x[1, 2, 0, 0] = float("nan")
    _, mean, var = backend.train_forward(x.to(DEVICE), None, None, 1e-5)
    assert torch.isnan(mean[2]) and torch.isnan(var[2])
    assert torch.isfinite(mean[:2]).all() and torch.isfinite(var[:2]).all()


def test_int64_tile_offsets_give_the_same_results():
    """Inputs whose tile offsets pass 2**31 index with int64 inside the tile too: forced here on
    a small input, the results do not change."""
    shape, layout = (3, 7, 5, 3), "contiguous"
    x, g = _inputs(shape, torch.float32, layout, seed=8)
    weight, bias = _parameters(7, seed=8)
    narrow = backend.train_forward(x, weight, bias, 1e-5)
    backend.geometry.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backend, "INT32_OFFSETS_BELOW", 0)
            assert backend._prepare(x)[2].wide
            wide = backend.train_forward(x, weight, bias, 1e-5)
            grads = backend.train_backward(g, x, wide[1], wide[2], weight, 1e-5,
                                           (True, True, True))
    finally:
        backend.geometry.cache_clear()
    for a, b in zip(narrow, wide, strict=True):
        torch.testing.assert_close(a, b)
    expected = backend.train_backward(g, x, narrow[1], narrow[2], weight, 1e-5,
                                      (True, True, True))
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b)


# -- fused activation and residual ------------------------------------------------------------


def _composed(x, residual, weight, bias, mean, variance, eps, activation):
    """torch's batch norm, the residual, the activation: the unfused form to differentiate."""
    y = F.batch_norm(x, mean, variance, weight, bias, training=mean is None, eps=eps)
    if residual is not None:
        y = y + residual
    return {"identity": lambda t: t, "relu": torch.relu, "silu": F.silu,
            "gelu": F.gelu}[activation](y)


@pytest.mark.parametrize("activation", ["identity", "relu", "silu", "gelu"])
@pytest.mark.parametrize("layout, with_residual", [("contiguous", True),
                                                   ("channels_last", True),
                                                   ("contiguous", False)])
@pytest.mark.parametrize("train", [True, False])
def test_fused_entry_points_match_torch_composed(activation, layout, with_residual, train):
    """forward/backward with an activation and a residual: output, batch statistics, and the
    gradients of x, weight, bias and residual against torch's composed form in float64."""
    shape, eps = (3, 5, 6, 4), 1e-5
    x, g = _inputs(shape, torch.float32, layout, seed=9, scale=1.0, offset=0.2)
    residual = make_input(shape, torch.float32, layout, seed=11).to(DEVICE) if with_residual \
        else None
    weight, bias = _parameters(5, seed=9)
    stats = (None, None) if train else _on_device(torch.randn(5) * 0.1, torch.rand(5) + 0.5)
    y, mean, var = backend.forward(x, weight, bias, eps, mean=stats[0], variance=stats[1],
                                   activation=activation, residual=residual)
    if not train:
        assert mean is None and var is None
        mean, var = stats
    grads = backend.backward(g, x, mean, var, weight, bias, eps, (True, True, True),
                             train=train, activation=activation, residual=residual,
                             need_residual=with_residual)

    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, weight, bias)]
    r64 = residual.double().cpu().requires_grad_(True) if with_residual else None
    stats64 = tuple(None if s is None else s.double().cpu() for s in stats)
    expected = _composed(leaves[0], r64, leaves[1], leaves[2], *stats64, eps, activation)
    wanted = leaves + ([r64] if with_residual else [])
    expected_grads = torch.autograd.grad(expected, wanted, g.double().cpu())
    assert_close(y.cpu(), expected.detach(), torch.float32)
    if train:
        ref_mean, ref_var = reference.moments(_numpy(x))
        assert_close(mean.cpu(), _tensor(ref_mean), torch.float32)
        assert_close(var.cpu(), _tensor(ref_var), torch.float32)
    dx, dw, db, dres = grads
    for ours, theirs in zip((dx, dw, db), expected_grads[:3], strict=True):
        assert_close(ours.cpu(), theirs, torch.float32, scale=10)
    if with_residual:
        assert_close(dres.cpu(), expected_grads[3], torch.float32)
        assert dres.stride() == x.stride()
    else:
        assert dres is None


@pytest.mark.parametrize("x_layout, other_layout", [("channels_last", "contiguous"),
                                                     ("contiguous", "channels_last")])
def test_gradient_and_residual_in_another_layout(x_layout, other_layout):
    """A gradient or residual laid out unlike the input is read by index, not by address."""
    shape = (3, 4, 5, 6)
    x = make_input(shape, torch.float32, x_layout, seed=14).to(DEVICE)
    g, residual = (make_input(shape, torch.float32, other_layout, seed=seed).to(DEVICE)
                   for seed in (15, 16))
    weight, bias = _parameters(4, seed=14)
    like_x = torch.channels_last if x_layout == "channels_last" else torch.contiguous_format
    results = []
    for grad, shortcut in ((g, residual), (g.contiguous(memory_format=like_x),
                                           residual.contiguous(memory_format=like_x))):
        y, mean, var = backend.forward(x, weight, bias, 1e-5, activation="relu",
                                       residual=shortcut)
        results.append((y, *backend.backward(grad, x, mean, var, weight, bias, 1e-5,
                                             (True, True, True), train=True, activation="relu",
                                             residual=shortcut, need_residual=True)))
    for ours, expected in zip(*results, strict=True):
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("dtype", HALF)
def test_fused_half_inputs(activation, dtype):
    shape, eps = (4, 6, 5, 3), 1e-5
    x, g = _inputs(shape, dtype, "channels_last", seed=12, scale=1.0, offset=0.1)
    residual = make_input(shape, dtype, "channels_last", seed=13).to(DEVICE)
    weight, bias = _parameters(6, seed=12)
    y, mean, var = backend.forward(x, weight, bias, eps, activation=activation,
                                   residual=residual)
    grads = backend.backward(g, x, mean, var, weight, bias, eps, (True, True, True), train=True,
                             activation=activation, residual=residual, need_residual=True)
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, weight, bias, residual)]
    expected = _composed(leaves[0], leaves[3], leaves[1], leaves[2], None, None, eps, activation)
    expected_grads = torch.autograd.grad(expected, leaves, g.double().cpu())
    assert y.dtype == dtype and grads[0].dtype == dtype and grads[3].dtype == dtype
    assert_close(y.cpu(), expected.detach(), dtype)
    for ours, theirs, tolerance in zip(grads, expected_grads[:3] + expected_grads[3:],
                                       (dtype, torch.float32, torch.float32, dtype), strict=True):
        assert_close(ours.cpu(), theirs, tolerance, scale=10)


# -- through the modules and the dispatcher -----------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_on_triton_matches_torch(layout, dtype):
    """Two training steps and eval through BatchNorm2d with the backend forced: outputs,
    gradients and running statistics against torch.nn.BatchNorm2d."""
    torch.manual_seed(1)
    ours = batchnorm.BatchNorm2d(6).to(DEVICE)
    theirs = torch.nn.BatchNorm2d(6).to(DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    x, g = _inputs((4, 6, 5, 7), dtype, layout, seed=2, scale=3.0, offset=2.0)
    with batchnorm.use_backend("triton"):
        assert batchnorm.select_backend(x).name == "triton"
        for _ in range(2):
            results = []
            for module in (ours, theirs):
                xr = x.clone().requires_grad_(True)
                y = module(xr)
                results.append((y, *torch.autograd.grad(y, [xr, module.weight, module.bias], g)))
            for mine, expected in zip(*results, strict=True):
                assert_close(mine.cpu(), expected.cpu(), dtype, scale=8)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            assert_close(ours(x).cpu(), theirs(x).cpu(), dtype)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fused_module_on_triton_matches_torch(activation):
    torch.manual_seed(2)
    ours = batchnorm.BatchNormAct2d(5, activation=activation).to(DEVICE)
    theirs = torch.nn.BatchNorm2d(5).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    x, g = _inputs((3, 5, 4, 6), torch.float32, "channels_last", seed=3, scale=1.0, offset=0.3)
    residual = make_input((3, 5, 4, 6), torch.float32, "channels_last", seed=5).to(DEVICE)
    torch_activation = {"relu": torch.relu, "gelu": F.gelu}[activation]
    with batchnorm.use_backend("triton"):
        results = []
        for module in (ours, theirs):
            xr, rr = x.clone().requires_grad_(True), residual.clone().requires_grad_(True)
            y = module(xr, rr) if module is ours else torch_activation(module(xr) + rr)
            results.append((y, *torch.autograd.grad(y, [xr, rr, module.weight, module.bias], g)))
    for mine, expected in zip(*results, strict=True):
        assert_close(mine.cpu(), expected.cpu(), torch.float32, scale=8)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_dispatch_takes_what_the_backend_supports():
    """float64 goes to another backend; CPU tensors reach Triton only while the interpreter is
    on, and the automatic choice keeps the CPU kernels (or eager) for them."""
    x = torch.randn(4, 3, 5, device=DEVICE)
    assert backend.supports(x)
    assert not backend.supports(x.double())
    assert not backend.supports(x[:0])
    assert not backend.supports(x[:, 0, 0])
    with batchnorm.use_backend(None):
        assert batchnorm.select_backend(x.double()).name != "triton"
        if DEVICE == "cuda":
            assert batchnorm.select_backend(x).name == "triton"
        else:
            assert batchnorm.select_backend(x).name in ("cpu", "eager")
    if DEVICE == "cpu":
        with pytest.MonkeyPatch.context() as env:
            env.delenv("TRITON_INTERPRET")
            assert not backend.supports(x)


def test_too_old_a_triton_leaves_the_eager_path_serving():
    import triton

    backend.load_kernels.cache_clear()
    backend._loaded.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            patch.setattr(triton, "__version__", "3.3.1")
            warnings.simplefilter("always")
            assert not backend.supports(torch.randn(4, 3, device=DEVICE))
        assert any("triton >= 3.4" in str(w.message) for w in caught)
    finally:
        backend.load_kernels.cache_clear()
        backend._loaded.cache_clear()
    assert backend.supports(torch.randn(4, 3, device=DEVICE))


def test_without_triton_the_backend_is_not_registered():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, batchnorm\n"
        "assert 'triton' not in batchnorm.available_backends(), batchnorm.available_backends()\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "torch.testing.assert_close(batchnorm.BatchNorm2d(3)(x), torch.nn.BatchNorm2d(3)(x))\n"
    )
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "BATCHNORM_BACKEND")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


# -- random shapes -----------------------------------------------------------------------------


@settings(max_examples=int(os.environ.get("BATCHNORM_HYPOTHESIS_EXAMPLES", "40")) // 4,
          deadline=None)
@given(
    ndim=st.integers(2, 5),
    batch=st.integers(1, 4),
    channels=st.integers(1, 6),
    spatial=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    affine=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_random_shapes_match_reference(ndim, batch, channels, spatial, layout, dtype, affine,
                                       seed):
    shape = (batch, channels, *spatial[: ndim - 2])
    if batch * int(np.prod(shape[2:])) < 2:  # training needs two values per channel
        shape = (2, *shape[1:])
    if layout == "channels_last" and ndim < 4:
        layout = "contiguous"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "profile_for", lambda device: TINY)
        check_against_reference(shape, layout, dtype, affine, seed, offset=0.0)


# -- larger cases and the compiler ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape, layout", [((2, 1000, 2), "contiguous"),  # 1000 plane columns
                                           ((8, 16, 64, 64), "contiguous"),
                                           ((8, 16, 64, 64), "channels_last"),
                                           ((3, 5, 4096), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_larger_inputs_match_reference(shape, layout, dtype):
    check_against_reference(shape, layout, dtype)


def _compile(*arguments):
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.backends.triton_compile", *arguments],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 bytes spill stores" in result.stdout
    return result.stdout


def test_kernels_compile_for_the_gpu():
    """Each kernel, in its fullest form, through Triton's compiler and ptxas for sm_90 (the
    interpreter accepts code the compiler refuses)."""
    _compile("--quick", "--fullest")


@pytest.mark.slow
def test_every_launch_compiles_for_the_gpu():
    """Every specialization the backend launches (layouts, dtypes, flags) compiles for sm_90,
    without spilling registers."""
    output = _compile()
    assert "spill stores" in output and all(
        "0 bytes spill stores" in line for line in output.splitlines() if "spill" in line
    )
