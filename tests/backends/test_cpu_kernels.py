"""The Numba CPU kernels against the NumPy float64 reference and torch.nn, on every layout and
dtype they take, on both the serial (small input) and the parallel path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import batchnorm
from batchnorm import reference
from batchnorm.backends import cpu
from batchnorm.backends.cpu import kernels
from tests.conftest import assert_close, assert_close_with, input_gradient_rounding, make_input

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (shape, layout): every canonical form the kernels see. The large ones exceed SERIAL_BELOW, so
# they run the parallel kernels with several row blocks.
CASES = [
    ((7, 5), "contiguous"),  # rows (N, C)
    ((5, 4, 6), "contiguous"),  # planes (N, C, L)
    ((5, 4, 1), "contiguous"),  # planes with one value per sample: seen as rows
    ((3, 4, 5, 6), "contiguous"),  # NCHW planes
    ((3, 4, 5, 6), "channels_last"),  # rows (N*H*W, C)
    ((2, 3, 4, 3, 2), "channels_last"),  # channels_last_3d rows
    ((3, 4, 5, 6), "strided"),  # copied to contiguous
    ((4, 16, 40, 40), "contiguous"),
    ((4, 16, 40, 40), "channels_last"),
    ((2048, 48), "contiguous"),
    # 35 (sample, channel) segments in two eval blocks: the second starts mid-sample (channel 3)
    ((5, 7, 60, 40), "contiguous"),
    # 3x3 planes: one flat run per sample when serial, segments on the parallel path
    ((4, 24, 3, 3), "contiguous"),
    ((6, 1300, 3, 3), "contiguous"),
    # short planes with more samples than one float32 block of per-position sums takes
    ((kernels.PLANE_BLOCK + 7, 3, 2, 2), "contiguous"),
]


def _numpy(t):
    return None if t is None else t.detach().double().numpy()


def _parameters(channels, dtype, seed, affine=True):
    if not affine:
        return None, None
    generator = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(channels, generator=generator, dtype=param_dtype) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=param_dtype)
    return weight, bias


def _check_all_paths(shape, layout, dtype, affine, seed, offset=0.0):
    x = make_input(shape, dtype, layout, seed=seed, scale=2.0, offset=offset)
    g = make_input(shape, dtype, layout, seed=seed + 1)
    weight, bias = _parameters(shape[1], dtype, seed, affine)
    count_scale = max(1.0, float(np.sqrt(x.numel() / shape[1])))
    eps = 1e-5
    # half inputs are compared with the float64 reference of the rounded values
    y, mean, var = cpu.train_forward(x, weight, bias, eps)
    ref_y, ref_mean, ref_var = reference.forward_train(_numpy(x), _numpy(weight), _numpy(bias),
                                                       eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(y, torch.from_numpy(ref_y), dtype)
    assert_close(mean, torch.from_numpy(ref_mean), dtype)
    assert_close(var, torch.from_numpy(ref_var), dtype, scale=4)

    dx, dw, db = cpu.train_backward(g, x, mean, var, weight, eps, (True, True, True))
    ref_dx, ref_dw, ref_db = reference.backward_train(_numpy(g), _numpy(x), _numpy(weight), eps)
    assert dx.dtype == x.dtype
    assert_close_with(dx, torch.from_numpy(ref_dx), dtype,
                      input_gradient_rounding(x, g, weight, eps, dtype), scale=4)
    if affine:
        assert_close(dw, torch.from_numpy(ref_dw), dtype, scale=4 * count_scale)
    else:
        assert dw is None
    assert_close(db, torch.from_numpy(ref_db), dtype, scale=4 * count_scale)

    running_mean = torch.randn(shape[1], dtype=mean.dtype)
    running_var = torch.rand(shape[1], dtype=mean.dtype) + 0.5
    y_eval = cpu.eval_forward(x, running_mean, running_var, weight, bias, eps)
    ref_eval = reference.forward(_numpy(x), _numpy(running_mean), _numpy(running_var),
                                 _numpy(weight), _numpy(bias), eps)
    assert_close(y_eval, torch.from_numpy(ref_eval), dtype)
    dx, dw, db = cpu.eval_backward(g, x, running_mean, running_var, weight, eps,
                                   (True, affine, True))
    ref_dx, ref_dw, ref_db = reference.backward_eval(_numpy(g), _numpy(x), _numpy(running_mean),
                                                     _numpy(running_var), _numpy(weight), eps)
    assert_close(dx, torch.from_numpy(ref_dx), dtype, scale=4)
    if affine:
        assert_close(dw, torch.from_numpy(ref_dw), dtype, scale=4 * count_scale)
    assert_close(db, torch.from_numpy(ref_db), dtype, scale=4 * count_scale)


@pytest.mark.parametrize("shape, layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_layout_matches_reference(shape, layout, dtype):
    _check_all_paths(shape, layout, dtype, affine=True, seed=3, offset=-1.5)


@given(
    ndim=st.integers(2, 5),
    batch=st.integers(2, 6),
    channels=st.integers(1, 6),
    spatial=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    dtype=st.sampled_from(DTYPES),
    affine=st.booleans(),
    seed=st.integers(0, 10_000),
)
# two nearly equal values in a channel: the input gradient cancels (all implementations lose
# the same digits there, torch included)
@example(ndim=2, batch=2, channels=6, spatial=[1, 1, 1], layout="strided", dtype=torch.float32,
         affine=False, seed=5666)
def test_random_inputs_match_reference(ndim, batch, channels, spatial, layout, dtype, affine,
                                       seed):
    shape = (batch, channels, *spatial[: ndim - 2])
    if layout == "channels_last" and ndim < 4:
        layout = "contiguous"
    _check_all_paths(shape, layout, dtype, affine, seed)


@pytest.mark.parametrize("shape, layout", [((4, 3, 64, 64), "contiguous"),
                                           ((4, 3, 64, 64), "channels_last"),
                                           ((8, 3, 7, 7), "contiguous"),  # short planes
                                           ((60, 3), "contiguous")])
def test_variance_is_stable_for_a_large_mean(shape, layout):
    """Mean 1e4, standard deviation 1 in float32: E[x^2] - E[x]^2 would lose every digit."""
    x = make_input(shape, torch.float32, layout, seed=5, offset=1e4)
    _, mean, var = cpu.train_forward(x, None, None, 1e-5)
    ref_mean, ref_var = reference.moments(x.double().numpy())
    np.testing.assert_allclose(var.double().numpy(), ref_var, rtol=1e-4)
    np.testing.assert_allclose(mean.double().numpy(), ref_mean, rtol=1e-7)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_input_reaches_the_statistics(layout):
    x = make_input((2, 3, 4, 4), torch.float32, layout)
    x[1, 2, 0, 0] = float("nan")
    _, mean, var = cpu.train_forward(x, None, None, 1e-5)
    assert torch.isnan(mean[2]) and torch.isnan(var[2])
    assert torch.isfinite(mean[:2]).all() and torch.isfinite(var[:2]).all()


@pytest.mark.parametrize("shape, layout", [((3, 4, 5, 6), "contiguous"),
                                           ((3, 4, 5, 6), "channels_last"), ((6, 4), "contiguous")])
def test_zero_variance_with_zero_eps_divides_as_ieee(shape, layout):
    """eps=0 and a zero variance: 1/sqrt(0) is inf, as in torch and on the eager path, never a
    ZeroDivisionError from inside a kernel (with zeros in the gradient as well)."""
    x = make_input(shape, torch.float32, layout, seed=2)
    x[:, 1] = 3.0  # a constant channel: zero batch variance
    weight, bias = _parameters(shape[1], torch.float32, seed=2)
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    running_var[2] = 0.0
    g = torch.zeros_like(x)
    with torch.no_grad():
        y = cpu.eval_forward(x, running_mean, running_var, weight, bias, 0.0)
        y_train, mean, var = cpu.train_forward(x, weight, bias, 0.0)
        grads = cpu.train_backward(g, x, mean, var, weight, 0.0, (True, True, True))
        with batchnorm.use_backend("eager"):
            expected = batchnorm.functional.normalize_with(x, running_mean, running_var, weight,
                                                           bias, 0.0)
            expected_train, _, _ = batchnorm.functional.normalize_with_batch_statistics(
                x, weight, bias, 0.0)
    # the same values where finite and non-finite at the same places (inf here, where the
    # eager path's folded shift b - mean * inf makes nan, as torch's does)
    for ours, eager in ((y, expected), (y_train, expected_train)):
        finite = torch.isfinite(eager)
        assert torch.equal(torch.isfinite(ours), finite)
        torch.testing.assert_close(ours[finite], eager[finite])
    assert not torch.isfinite(y[:, 2]).any() and torch.isfinite(y[:, [0, 1, 3]]).all()
    assert not torch.isfinite(y_train[:, 1]).any() and torch.isfinite(y_train[:, [0, 2, 3]]).all()
    assert all(grad is not None for grad in grads)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_on_the_kernels_matches_torch(layout):
    torch.manual_seed(1)
    ours, theirs = batchnorm.BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    x = make_input((4, 6, 9, 9), torch.float32, layout, seed=2, scale=3.0, offset=2.0)
    g = make_input((4, 6, 9, 9), torch.float32, layout, seed=3)
    results = []
    with batchnorm.use_backend("cpu"):
        assert batchnorm.select_backend(x).name == "cpu"
        for module in (ours, theirs):
            xr = x.clone().requires_grad_(True)
            y = module(xr)
            results.append((y, *torch.autograd.grad(y, [xr, module.weight, module.bias], g)))
    for mine, theirs_value in zip(*results, strict=True):
        assert_close(mine, theirs_value, torch.float32, scale=4)
    assert_close(ours.running_mean, theirs.running_mean, torch.float32)
    assert_close(ours.running_var, theirs.running_var, torch.float32)
    ours.eval()
    theirs.eval()
    with torch.no_grad(), batchnorm.use_backend("cpu"):
        assert_close(ours(x), theirs(x), torch.float32)


def test_double_backward_with_kernels_selected():
    """create_graph=True takes the eager path; the first-order backward the kernel one."""
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    module = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    with batchnorm.use_backend("cpu"):
        assert batchnorm.select_backend(x).name == "cpu"
        assert torch.autograd.gradgradcheck(lambda t: module(t), (x,))


@pytest.mark.parametrize(
    ("size", "layout", "expected"),
    [
        ((8, 64, 28, 28), "contiguous", "cpu"),  # planes of 784 values
        ((8, 64, 28, 28), "channels_last", "cpu"),  # rows
        ((8, 512, 7, 7), "contiguous", "cpu"),  # planes of 49 values
        ((8, 512, 7, 7), "channels_last", "cpu"),
        ((1024, 256), "contiguous", "cpu"),
        ((60, 100), "contiguous", "cpu"),
    ],
)
def test_automatic_choice_runs_the_kernels_on_cpu_inputs(size, layout, expected):
    x = torch.empty(size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with batchnorm.use_backend(None):
        assert batchnorm.select_backend(x).name == expected
    with batchnorm.use_backend("cpu"):  # forcing still reaches the kernels
        assert batchnorm.select_backend(x).name == "cpu"


def test_inputs_the_kernels_cannot_take_go_to_the_eager_path():
    with batchnorm.use_backend(None):
        assert batchnorm.select_backend(torch.empty(4, 3, device="meta")).name == "eager"
        assert batchnorm.select_backend(torch.empty(0, 3)).name == "eager"


def test_eager_override_and_fallback_without_numba():
    """With Numba unavailable (import blocked) the eager path is chosen and gives torch's result;
    the environment variable forces eager even where the kernels are available."""
    script = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch, batchnorm\n"
        "assert 'cpu' not in batchnorm.available_backends(), batchnorm.available_backends()\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "assert batchnorm.select_backend(x).name == 'eager'\n"
        "y = batchnorm.BatchNorm2d(3)(x)\n"
        "torch.testing.assert_close(y, torch.nn.BatchNorm2d(3)(x))\n"
    )
    env = {**os.environ, "BATCHNORM_BACKEND": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    env["BATCHNORM_BACKEND"] = "eager"
    forced = "import torch, batchnorm; print(batchnorm.select_backend(torch.randn(4, 3)).name)"
    out = subprocess.run([sys.executable, "-c", forced], check=True, env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "eager"


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """Where Numba finds no writable cache folder it raises at decoration; the kernels are then
    compiled without a cache instead of failing to import."""
    import numba

    from batchnorm.backends.cpu import kernels

    real_njit = numba.njit

    def njit_without_cache(*args, cache=False, **options):
        if cache:
            raise RuntimeError("cannot cache function: no locator available for file")
        return real_njit(*args, **options)

    monkeypatch.setattr(numba, "njit", njit_without_cache)

    @kernels._jit()
    def double(values):
        return values * 2

    np.testing.assert_array_equal(double(np.arange(3.0)), [0.0, 2.0, 4.0])


def test_kernels_follow_and_keep_torchs_thread_count():
    """torch.set_num_threads governs the kernels (the blocks a training call is cut into), and
    the kernels' first parallel launch (which starts Numba's OpenMP layer) leaves torch's count
    as the user set it. They follow torch's changes both ways; a call on one thread leaves
    Numba's count alone. (On the Python path, whose kernel call the spy sees; the compiled
    path's blocks are checked against it in test_cpu_native.)"""
    code = (
        "import torch, numba, batchnorm\n"
        "from batchnorm.backends.cpu import kernels\n"
        "entry, blocks = kernels.train_forward_update_at, []\n"
        "def spy(*args):\n"
        "    blocks.append(args[-1])\n"
        "    return entry(*args)\n"
        "kernels.train_forward_update_at = spy\n"
        "bn, x = batchnorm.BatchNorm2d(8), torch.randn(64, 8, 32, 32)\n"
        "for threads in (1, 2, 1):\n"
        "    torch.set_num_threads(threads)\n"
        "    bn(x)\n"
        "    print(torch.get_num_threads(), blocks[-1], numba.get_num_threads())\n"
        "print(numba.config.NUMBA_NUM_THREADS)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True, env={**os.environ, "BATCHNORM_NATIVE": "0"})
    *counts, pool = result.stdout.split()
    two = str(min(2, int(pool)))
    # per call: torch's count after it, the blocks it ran in, Numba's count after it
    torch_counts, call_blocks, numba_counts = counts[0::3], counts[1::3], counts[2::3]
    assert torch_counts == ["1", "2", "1"]
    assert call_blocks == ["1", two, "1"]
    assert numba_counts[1] == two


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 1.0, "tensor"])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_running_update_kernel_matches_the_core(dtype, momentum, bad):
    """The one-call running update gives the core's results, including the non-finite guard."""
    from batchnorm.core import running

    generator = torch.Generator().manual_seed(3)
    rm, rv = torch.randn(6, generator=generator, dtype=dtype), torch.rand(6, dtype=dtype) + 0.5
    bm, bv = torch.randn(6, generator=generator, dtype=dtype), torch.rand(6, dtype=dtype) + 0.1
    if bad is not None:
        bv[4] = bad
    m = torch.tensor(0.25, dtype=dtype) if momentum == "tensor" else momentum
    before = rm.clone(), rv.clone()
    ours = cpu.updated_running_stats(rm, rv, bm, bv, m, count=9)
    core = running.updated_running_stats(rm, rv, bm, bv, m, count=9)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # nothing in place
    assert ours[0].dtype == rm.dtype and ours[1].dtype == rv.dtype
    torch.testing.assert_close(ours[0], core[0])
    torch.testing.assert_close(ours[1], core[1])
    assert bool(ours[2]) == bool(core[2]) == (bad is None)
    # in place: the running tensors themselves receive the update, versions move
    versions = rm._version, rv._version
    inplace = cpu.updated_running_stats(rm, rv, bm, bv, m, count=9, in_place=True)
    assert inplace[0] is rm and inplace[1] is rv
    assert rm._version > versions[0] and rv._version > versions[1]
    assert torch.equal(rm, ours[0]) and torch.equal(rv, ours[1])
    assert inplace[2] == (bad is None)


@pytest.mark.parametrize("shape, layout", [((6, 5), "contiguous"), ((3, 4, 5, 6), "contiguous"),
                                           ((3, 4, 5, 6), "channels_last"),
                                           ((4, 16, 40, 40), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, float("nan")])
def test_one_call_training_step_matches_forward_then_update(shape, layout, dtype, bad):
    """``train_forward_update`` (the forward and the in-place running update in one kernel call
    where the running statistics are dense vectors of the compute dtype) gives the output and
    statistics of ``train_forward`` and the core's running update, non-finite guard included."""
    from batchnorm.core import running

    x = make_input(shape, dtype, layout, seed=21, scale=2.0, offset=1.0)
    if bad is not None:
        x[(1, 2) + (0,) * (x.dim() - 2)] = bad
    channels = shape[1]
    weight, bias = _parameters(channels, dtype, seed=22)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.randn(channels, dtype=stats_dtype)
    rv = torch.rand(channels, dtype=stats_dtype) + 0.5
    count = x.numel() // channels
    y0, mean0, var0 = cpu.train_forward(x, weight, bias, 1e-5)
    core = running.updated_running_stats(rm, rv, mean0, var0, 0.2, count)
    separate = cpu.updated_running_stats(rm, rv, mean0, var0, 0.2, count)  # its own kernel
    versions = rm._version, rv._version
    y, mean, var, finite = cpu.train_forward_update(x, weight, bias, 1e-5, rm, rv, 0.2, count)
    for ours, alone in ((y, y0), (mean, mean0), (var, var0), (rm, separate[0]),
                        (rv, separate[1])):
        torch.testing.assert_close(ours, alone, rtol=0, atol=0, equal_nan=True)
    assert bool(finite) == (bad is None)
    torch.testing.assert_close(rm, core[0])
    torch.testing.assert_close(rv, core[1])
    assert rm._version > versions[0] and rv._version > versions[1]


def test_one_call_training_step_takes_the_fused_kernel(monkeypatch):
    """A model's step (dense float32 running statistics, a float momentum) makes one kernel
    call: the separate update kernel is not reached. Running statistics of another dtype or a
    tensor momentum take forward-then-update, with the same result."""
    from batchnorm.core import running

    x = torch.randn(8, 3, 5, 5)
    rm, rv = torch.zeros(3), torch.ones(3)

    def refuse(*args):
        raise AssertionError("the separate update kernel ran")

    monkeypatch.setattr(kernels, "running_update_at", refuse)
    cpu.train_forward_update(x, None, None, 1e-5, rm, rv, 0.1, 200)
    assert not torch.equal(rm, torch.zeros(3))
    monkeypatch.undo()
    _, mean, var = cpu.train_forward(x, None, None, 1e-5)
    for rm64, momentum in ((torch.zeros(3, dtype=torch.float64), 0.1),
                           (torch.zeros(3), torch.tensor(0.1))):
        rv64 = torch.ones(3, dtype=rm64.dtype)
        expected = running.updated_running_stats(rm64, rv64, mean, var, momentum, 200)
        cpu.train_forward_update(x, None, None, 1e-5, rm64, rv64, momentum, 200)
        torch.testing.assert_close(rm64, expected[0])
        torch.testing.assert_close(rv64, expected[1])


def test_inputs_outside_cpu_memory_are_refused_by_every_entry():
    """Called directly, the backend refuses an input without CPU memory (a ``meta`` tensor's
    address is 0) with a clear error instead of handing its address to a kernel. In a
    subprocess: a read from there would end the process."""
    script = (
        "import torch\n"
        "from batchnorm.backends import cpu\n"
        "x = torch.empty(4, 3, 2, device='meta')\n"
        "one, zero = torch.ones(3), torch.zeros(3)\n"
        "calls = [lambda: cpu.train_forward(x, None, None, 1e-5),\n"
        "         lambda: cpu.eval_forward(x, zero, one, None, None, 1e-5),\n"
        "         lambda: cpu.train_forward_update(x, None, None, 1e-5, zero.clone(),\n"
        "                                          one.clone(), 0.1, 8),\n"
        "         lambda: cpu.train_backward(x, x, zero, one, None, 1e-5, (True, True, True))]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as error:\n"
        "        assert 'CPU memory' in str(error), error\n"
        "    else:\n"
        "        raise AssertionError('accepted')\n"
        "print('refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "refused"


def test_one_call_training_step_refuses_short_running_statistics():
    """Running statistics shorter than the channel count are never read past their end: the
    update refuses them and changes nothing."""
    rm, rv = torch.zeros(2), torch.ones(2)
    with pytest.raises(RuntimeError):
        cpu.train_forward_update(torch.randn(8, 3), None, None, 1e-5, rm, rv, 0.1, 8)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))


@pytest.mark.parametrize("shape, layout", [((4, 2, 512, 513), "contiguous"),
                                           ((4, 2, 512, 513), "channels_last")])
def test_blocked_float32_sums_stay_accurate_on_many_values(shape, layout):
    """A million values per channel, summed in float32 blocks joined in float64: the statistics
    keep float32's precision instead of drifting with n."""
    x = make_input(shape, torch.float32, layout, seed=11, scale=3.0, offset=5.0)
    g = make_input(shape, torch.float32, layout, seed=12)
    _, mean, var = cpu.train_forward(x, None, None, 1e-5)
    ref_mean, ref_var = reference.moments(x.double().numpy())
    np.testing.assert_allclose(mean.double().numpy(), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var.double().numpy(), ref_var, rtol=1e-5)
    _, _, db = cpu.train_backward(g, x, mean, var, None, 1e-5, (False, False, True))
    ref_db = g.double().sum(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(db.double().numpy(), ref_db, atol=1e-6 * g.abs().sum().item())


@pytest.mark.parametrize("running_dtype, batch_dtype",
                         [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_running_update_kernel_takes_statistics_of_another_dtype(running_dtype, batch_dtype):
    """Each statistic reaches the kernel in its own dtype (running float32 buffers fed float64
    batch statistics, and the reverse)."""
    from batchnorm.core import running

    generator = torch.Generator().manual_seed(5)
    rm = torch.randn(5, generator=generator, dtype=running_dtype)
    rv = torch.rand(5, generator=generator, dtype=running_dtype) + 0.5
    bm = torch.randn(5, generator=generator, dtype=batch_dtype)
    bv = torch.rand(5, generator=generator, dtype=batch_dtype) + 0.1
    ours = cpu.updated_running_stats(rm, rv, bm, bv, 0.3, count=7)
    core = running.updated_running_stats(rm, rv, bm, bv, 0.3, count=7)
    assert ours[0].dtype == ours[1].dtype == running_dtype
    torch.testing.assert_close(ours[0], core[0])
    torch.testing.assert_close(ours[1], core[1])


def test_running_update_of_mismatched_lengths_is_refused():
    """The kernel reads every vector over the running statistics' length: shorter batch
    statistics go to the core's version, which refuses them, instead of being read past their
    end."""
    rm, rv = torch.zeros(6), torch.ones(6)
    with pytest.raises(RuntimeError):
        cpu.updated_running_stats(rm, rv, torch.zeros(3), torch.ones(3), 0.1, count=4)
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lazily_negated_tensors_are_read_as_their_values(layout):
    """A tensor with torch's negative bit (the imaginary part of a conjugate) holds its values'
    negatives in memory; the kernels receive the values themselves, for the input, the gradient
    and the parameters."""
    shape = (4, 3, 5, 6)
    x = make_input(shape, torch.float32, layout, seed=21)
    g = make_input(shape, torch.float32, layout, seed=22)
    weight, bias = _parameters(3, torch.float32, seed=23)
    negated = [torch._neg_view(-t) for t in (x, g, weight, bias)]
    assert all(t.is_neg() for t in negated)
    nx, ng, nweight, nbias = negated
    y, mean, var = cpu.train_forward(x, weight, bias, 1e-5)
    ny, nmean, nvar = cpu.train_forward(nx, nweight, nbias, 1e-5)
    assert torch.equal(y, ny) and torch.equal(mean, nmean) and torch.equal(var, nvar)
    grads = cpu.train_backward(g, x, mean, var, weight, 1e-5, (True, True, True))
    ngrads = cpu.train_backward(ng, nx, nmean, nvar, nweight, 1e-5, (True, True, True))
    for ours, expected in zip(ngrads, grads, strict=True):
        assert torch.equal(ours, expected)
    ey = cpu.eval_forward(nx, torch._neg_view(-mean), var, nweight, nbias, 1e-5)
    assert torch.equal(ey, cpu.eval_forward(x, mean, var, weight, bias, 1e-5))
    rm, rv = torch.zeros(3), torch.ones(3)
    new_mean, _, _ = cpu.updated_running_stats(rm, rv, torch._neg_view(-mean), var, 0.5)
    torch.testing.assert_close(new_mean, 0.5 * mean)


@pytest.mark.parametrize("act", [kernels.IDENTITY, kernels.RELU])
@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefetching_rows_changes_no_value(act, has_res, dtype):
    """The gradient passes over rows with the prefetch hints on and off give the same bits,
    including the last rows, whose hints would point past the array."""
    rng = np.random.default_rng(4)
    rows, channels = 203, 37
    x, grad, residual = (rng.standard_normal((rows, channels)).astype(dtype) for _ in range(3))
    m, s, b = (rng.standard_normal(channels).astype(dtype) for _ in range(3))
    gain, k_centred, k_offset = (rng.standard_normal(channels).astype(dtype) for _ in range(3))
    results = []
    for prefetch in (False, True):
        s1, s2 = np.zeros(channels), np.zeros(channels)
        kernels._row_grad_sums(grad, x, residual, has_res, m, m, s, b, act, 3, rows, s1, s2,
                               prefetch, 5, 0, channels)
        grad_input, grad_residual = np.empty_like(x), np.empty_like(x)
        kernels._row_grad_input_block(grad, x, residual, has_res, m, s, b, act, gain, k_centred,
                                      k_offset, True, grad_input, True, grad_residual, 0, rows,
                                      prefetch, 5, 0, channels)
        results.append((s1, s2, grad_input, grad_residual))
    for without, with_hints in zip(*results, strict=True):
        np.testing.assert_array_equal(without, with_hints)


@pytest.mark.parametrize("act", [kernels.IDENTITY, kernels.RELU])
def test_rows_passes_over_a_column_range_touch_only_those_columns(act):
    """Each rows pass given columns [lo, hi) (one thread's channels of short planes) reads and
    writes those columns alone, with the values the pass over every column gives them."""
    rng = np.random.default_rng(5)
    rows, columns, lo, hi = 45, 29, 6, 21
    x, grad, residual = (rng.standard_normal((rows, columns)).astype(np.float32)
                         for _ in range(3))
    m, s, b, gain, k_centred, k_offset = (rng.standard_normal(columns).astype(np.float32)
                                          for _ in range(6))
    shift = rng.standard_normal(columns)

    def passes(first, last):
        found = [np.full(columns, -7.0) for _ in range(4)]
        kernels._row_sums(x, shift, 0, rows, found[0], found[1], first, last)
        kernels._row_grad_sums(grad, x, residual, True, m, m, s, b, act, 0, rows, found[2],
                               found[3], False, 1, first, last)
        out, grad_input, grad_residual = (np.full_like(x, -7.0) for _ in range(3))
        kernels._normalize_row_block(x, m, s, b, act, residual, True, out, 0, rows, first, last)
        kernels._row_grad_input_block(grad, x, residual, True, m, s, b, act, gain, k_centred,
                                      k_offset, True, grad_input, True, grad_residual, 0, rows,
                                      False, 1, first, last)
        return found, [out, grad_input, grad_residual]

    every, every_2d = passes(0, columns)
    ranged, ranged_2d = passes(lo, hi)
    for whole, part in zip(every, ranged, strict=True):
        np.testing.assert_array_equal(part[lo:hi], whole[lo:hi])
        assert (part[:lo] == -7.0).all() and (part[hi:] == -7.0).all()
    for whole, part in zip(every_2d, ranged_2d, strict=True):
        np.testing.assert_array_equal(part[:, lo:hi], whole[:, lo:hi])
        assert (part[:, :lo] == -7.0).all() and (part[:, hi:] == -7.0).all()


def test_prefetch_is_chosen_for_relu_gradients_past_the_cache():
    """The hints go to the ReLU backward on arrays over ``PREFETCH_ABOVE_BYTES`` only, at least
    one row and about ``PREFETCH_AHEAD_BYTES`` ahead."""
    large_rows = kernels.PREFETCH_ABOVE_BYTES // (64 * 4) + 1
    large = np.empty((large_rows, 64), dtype=np.float32)
    assert kernels._prefetches(large, kernels.RELU) == (True, kernels.PREFETCH_AHEAD_BYTES // 256)
    assert kernels._prefetches(large, kernels.IDENTITY)[0] is False
    assert kernels._prefetches(large[: large_rows // 2], kernels.RELU)[0] is False
    wide = np.empty((large_rows // 64 + 1, 4096), dtype=np.float64)
    assert kernels._prefetches(wide, kernels.RELU) == (True, 1)


def test_compiled_code_lives_in_one_file():
    """Numba's disk cache checks only the source file of the function it caches, so a cached
    function calling compiled code from another file keeps running that code's old version
    after it changes (seen: an entry point in its own module kept the kernels it was first
    compiled with). Every Numba-compiled function of the package is therefore in kernels.py."""
    import re
    from pathlib import Path

    package = Path(kernels.__file__).resolve().parents[2]
    compiled = re.compile(r"@(_jit|n?jit|intrinsic|vectorize|guvectorize|cfunc)\b"
                          r"|\bnumba\.(n?jit|vectorize|guvectorize|cfunc)\b")
    outside = [str(path.relative_to(package)) for path in package.rglob("*.py")
               if path.name != "kernels.py" and compiled.search(path.read_text())]
    assert outside == []


@pytest.mark.parametrize("flags, names, count", [([], "float32", 1),
                                                  (["--all"], "float32 and float64", 2)])
def test_compile_command_builds_the_specialisations_in_a_new_process(flags, names, count):
    """``batchnorm compile`` (run by ``make setup``) leaves the four entry points compiled for
    float32 (with ``--all``, float64 too), so a later process loads them from the disk cache
    instead of waiting."""
    script = (
        "from batchnorm.cli import main\n"
        "from batchnorm.backends.cpu import kernels\n"
        f"assert main(['compile', *{flags!r}]) == 0\n"
        "print(sorted(len(k.signatures) for k in (kernels.train_forward_at, "
        "kernels.train_forward_update_at, kernels.eval_forward_at, kernels.backward_at)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, check=True)
    assert f"CPU kernels ready ({names}, both layouts)" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == str([count] * 4)
