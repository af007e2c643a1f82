"""The CPU backend's compiled call path (``batchnorm.backends.cpu.native``): it gives, bit for
bit, what the Python path gives (outputs, gradients, running statistics, count of batches), on
both layouts, both dtypes, the serial and the parallel kernels; its C++ autograd node passes
gradcheck, and hands double backward and batched gradients to the Python path; every call it
declines changes nothing.

These tests need the extension built (``batchnorm compile``, which ``make setup`` runs); where
it is not, they are skipped with the reason."""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
from batchnorm.backends import cpu
from batchnorm.backends.cpu import native
from batchnorm.functional import NATIVE_ACTIVATIONS
from batchnorm.modules.norm_act import BatchNormAct2d
from tests.conftest import make_input


def _loaded():
    """The loaded extension: the first call of the process loads it (after Numba's pool has
    started), where it is built and its entry points are compiled."""
    if os.environ.get("BATCHNORM_NATIVE", "1") == "0":
        pytest.skip("BATCHNORM_NATIVE=0 turns the compiled call path off")
    if native.built() is None:
        pytest.skip("the compiled call path is not built here (batchnorm compile builds it)")
    batchnorm.BatchNorm1d(3)(torch.randn(4, 3))
    if cpu.compiled is None:
        pytest.skip("the compiled call path's entry points are not compiled (batchnorm compile)")
    return cpu.compiled


@pytest.fixture
def compiled():
    return _loaded()


def _pair(module: torch.nn.Module, seed: int = 0):
    """``module`` with random affine parameters and running statistics, and a copy."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor, low in ((module.weight, 0.5), (module.running_var, 0.5)):
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + low)
        for tensor in (module.bias, module.running_mean):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return module, copy.deepcopy(module)


def _state(module):
    return [module.running_mean, module.running_var, module.num_batches_tracked]


def _step(module, x, grad, python: bool):
    """One training step of ``module`` on ``x`` (output, gradients of x and the parameters),
    on the Python path where ``python``."""
    x = x.detach().clone().requires_grad_(True)
    module.weight.grad = module.bias.grad = None
    if python:
        with native.disabled():
            y = module(x)
            y.backward(grad)
    else:
        y = module(x)
        y.backward(grad)
    return [y, x.grad, module.weight.grad, module.bias.grad]


def _same_step(ours, python, x, grad):
    """A training step of ``ours`` on the compiled path and of ``python`` (a copy) on the
    Python path give equal outputs, gradients and state, bit for bit; returns both."""
    taken = _step(ours, x, grad, python=False)
    reference = _step(python, x, grad, python=True)
    for a, b in zip(taken + _state(ours), reference + _state(python), strict=True):
        assert torch.equal(a, b)
    return taken, reference


SHAPES = [
    (6, 5),  # rows
    (4, 3, 7),  # planes
    (5, 4, 1, 1),  # one value per plane: rows
    (3, 4, 5, 6),
    (2, 5, 3, 4, 2),
    (8, 16, 40, 40),  # above SERIAL_BELOW: blocks on threads
    (8, 1024, 3, 3),  # short planes above SERIAL_BELOW: ranges of channels seen as rows
    (2048, 48),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [(shape, layout) for shape in SHAPES for layout in ("contiguous", "channels_last")
     if layout == "contiguous" or len(shape) >= 4],  # (channels_last: 4 or 5 dimensions)
    ids=str,
)
def test_training_step_and_inference_equal_the_python_path(compiled, shape, layout, dtype):
    kind = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
            5: batchnorm.BatchNorm3d}[len(shape)]
    ours, python = _pair(kind(shape[1], momentum=0.3).to(dtype))
    x = make_input(shape, dtype, layout, seed=3)
    grad = make_input(shape, dtype, layout, seed=4)
    for _ in range(2):  # (the second step starts from updated statistics)
        taken, reference = _same_step(ours, python, x, grad)
        assert taken[0].stride() == reference[0].stride()
        assert taken[1].stride() == reference[1].stride()
    assert type(taken[0].grad_fn).__name__ == "CppFunction"  # (the compiled node was taken)
    ours.eval()
    python.eval()
    with torch.no_grad():
        y = ours(x)
        with native.disabled():
            expected = python(x)
    assert torch.equal(y, expected) and y.stride() == expected.stride()


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(2, 9), channels=st.integers(1, 12), height=st.integers(1, 9),
    width=st.integers(1, 9), channels_last=st.booleans(), momentum=st.floats(0.0, 1.0),
    eps=st.floats(1e-8, 1.0), threads=st.sampled_from([1, 2]),
)
def test_any_common_call_equals_the_python_path(batch, channels, height, width, channels_last,
                                                 momentum, eps, threads):
    _loaded()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, python = _pair(batchnorm.BatchNorm2d(channels, eps=eps, momentum=momentum),
                             seed=batch)
        shape = (batch, channels, height, width)
        layout = "channels_last" if channels_last else "contiguous"
        x = make_input(shape, torch.float32, layout, seed=channels)
        grad = make_input(shape, torch.float32, layout, seed=height)
        _same_step(ours, python, x, grad)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((16, 32, 24, 24), "channels_last"),
        # between BACKWARD_PLANES_SERIAL_BELOW and SERIAL_BELOW, planes over SHORT_PLANE_PARALLEL
        # values: only the backward goes parallel
        ((8, 200, 4, 4), "contiguous"),
    ],
    ids=str,
)
def test_blocks_follow_torchs_thread_count(compiled, shape, layout):
    """The compiled path cuts a call into as many blocks as the Python path at every thread
    count, both ways, in float64, where the blocks show in the last bits: channels_last rows
    (each block sums its rows, so another count changes the order of the sums) and 4x4 planes
    (one block sees them as rows, several take them by segments); float32's sums join exactly
    enough that the count does not show. That the blocks show is checked too: the Python path's
    step on one thread and on two differ."""
    assert cpu.BACKWARD_PLANES_SERIAL_BELOW <= 8 * 200 * 16 < cpu.SERIAL_BELOW
    assert 16 > cpu.kernels.SHORT_PLANE_PARALLEL
    before = torch.get_num_threads()
    x = make_input(shape, torch.float64, layout, seed=1, offset=3.0)
    grad = make_input(shape, torch.float64, layout, seed=2)
    steps = {}
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            ours, python = _pair(batchnorm.BatchNorm2d(shape[1]).double())
            steps[threads] = _same_step(ours, python, x, grad)[1]
    finally:
        torch.set_num_threads(before)
    assert not all(torch.equal(a, b) for a, b in zip(steps[1], steps[2], strict=True))


def test_the_backward_cut_moves_for_side_by_side_timing(compiled):
    """``set_backward_planes_serial_below`` (for scripts/backward_threshold.py) answers the cut
    it replaces, and the next call follows the new one: with both paths' cuts above the input,
    float64 4x4 planes on two threads run on one block on both, bit for bit alike; with the
    compiled path's cut alone moved, the two paths cut the call differently and the last bits
    show it."""
    shape = (8, 200, 4, 4)
    x = make_input(shape, torch.float64, "contiguous", seed=1, offset=3.0)
    grad = make_input(shape, torch.float64, "contiguous", seed=2)
    loaded = cpu.BACKWARD_PLANES_SERIAL_BELOW
    above = 2 * x.numel()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert compiled.set_backward_planes_serial_below(above) == loaded
        cpu.BACKWARD_PLANES_SERIAL_BELOW = above
        _same_step(*_pair(batchnorm.BatchNorm2d(shape[1]).double()), x, grad)
        cpu.BACKWARD_PLANES_SERIAL_BELOW = loaded
        ours, python = _pair(batchnorm.BatchNorm2d(shape[1]).double())
        taken = _step(ours, x, grad, python=False)
        reference = _step(python, x, grad, python=True)
        assert not all(torch.equal(a, b) for a, b in zip(taken, reference, strict=True))
    finally:
        assert compiled.set_backward_planes_serial_below(loaded) == above
        cpu.BACKWARD_PLANES_SERIAL_BELOW = loaded
        torch.set_num_threads(before)


def test_parallel_calls_run_on_torchs_threads(compiled):
    """A call on several blocks runs on as many of torch's threads as ``torch.set_num_threads``
    gives: the extension is built with OpenMP and uses torch's runtime (a build without OpenMP
    runs it on one thread; another runtime would ignore torch's thread count)."""
    before = torch.get_num_threads()
    try:
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            assert compiled.threads_of_a_call(2) == threads
    finally:
        torch.set_num_threads(before)


def test_the_step_matches_torch_and_records_its_writes(compiled):
    """Against torch.nn, and the running statistics' and the count's versions move as an
    in-place update moves them (autograd's check of saved tensors relies on it)."""
    ours = batchnorm.BatchNorm2d(6)
    theirs = torch.nn.BatchNorm2d(6)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    versions = [t._version for t in _state(ours)]
    y = ours(x)
    expected = theirs(x)
    torch.testing.assert_close(y, expected)
    for a, b in zip(_state(ours), _state(theirs), strict=True):
        torch.testing.assert_close(a, b)
    assert [t._version for t in _state(ours)] == [v + 1 for v in versions]
    assert type(y.grad_fn).__name__ == "CppFunction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (8, 16, 40, 40)], ids=str)
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_fused_step_equals_the_python_path(compiled, shape, layout, dtype, activation):
    """The fused layer (timm's BatchNormAct2d, converted) takes the same compiled path: ReLU
    fused into the same kernels, silu and gelu applied by torch's operators around them."""
    ours, python = _pair(BatchNormAct2d(shape[1], activation=activation).to(dtype))
    x = make_input(shape, dtype, layout, seed=5)
    grad = make_input(shape, dtype, layout, seed=6)
    taken, _ = _same_step(ours, python, x, grad)
    assert type(taken[0].grad_fn).__name__ == "CppFunction"
    ours.eval()
    python.eval()
    with torch.no_grad():
        y = ours(x)
        with native.disabled():
            assert torch.equal(y, python(x))


def test_a_changed_input_is_refused_at_backward(compiled):
    """The node saved the input: changed in place before the backward, autograd refuses, as it
    does for torch's batch norm."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    inner = x * 1.0
    y = batchnorm.BatchNorm1d(3)(inner)
    assert type(y.grad_fn).__name__ == "CppFunction"
    inner.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["plain", "relu", "silu", "gelu"])
def test_gradcheck_and_the_handed_back_backwards(compiled, monkeypatch, layout, kind):
    """The C++ node's gradients pass gradcheck (float64); double backward and batched
    gradients reach the registered Python backward, whose answers pass gradgradcheck and the
    batched check; first-order ones never do."""
    if kind == "plain":
        module, act = batchnorm.BatchNorm2d(3).double(), 0
    else:
        module = BatchNormAct2d(3, activation=kind).double()
        act = NATIVE_ACTIVATIONS[kind]
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    x = make_input((4, 3, 2, 3), torch.float64, layout, seed=8).requires_grad_(True)
    handed = []
    fallback = native._backward_fallbacks[act]

    def spy(grad, *rest):
        handed.append((torch.is_grad_enabled(), torch._C._functorch.is_batchedtensor(grad)
                       or torch._C._functorch.is_legacy_batchedtensor(grad)))
        return fallback(grad, *rest)

    monkeypatch.setitem(native._backward_fallbacks, act, spy)
    assert type(module(x).grad_fn).__name__ == "CppFunction"
    assert gradcheck(module, (x,), check_batched_grad=False)
    assert handed == []
    assert gradcheck(module, (x,), check_batched_grad=True)
    assert handed and all(batched for _, batched in handed)
    handed.clear()
    assert gradgradcheck(module, (x,))
    assert handed and all(double for double, _ in handed)


@pytest.mark.parametrize("kind", ["plain", "relu", "silu", "gelu"])
def test_double_backward_equals_the_python_path(compiled, kind):
    """Every gradient of a double backward (the first-order ones with their graph, then the
    gradients of a penalty on them), parameters included, equals the Python path's."""
    make = (lambda: batchnorm.BatchNorm2d(5)) if kind == "plain" else (
        lambda: BatchNormAct2d(5, activation=kind))
    ours, python = _pair(make().double())
    x = make_input((4, 5, 3, 3), torch.float64, "channels_last", seed=9)
    grad = make_input((4, 5, 3, 3), torch.float64, "channels_last", seed=10)
    results = []
    for module, off in ((ours, False), (python, True)):
        xi = x.clone().requires_grad_(True)
        inputs = (xi, module.weight, module.bias)
        with native.disabled() if off else contextlib.nullcontext():
            y = module(xi)
            first = torch.autograd.grad(y, inputs, grad, create_graph=True)
            penalty = sum(g.square().sum() for g in first)
            second = torch.autograd.grad(penalty, inputs, allow_unused=True)
        results.append([*first, *second])
        assert (type(y.grad_fn).__name__ == "CppFunction") is not off
    for a, b in zip(*results, strict=True):
        assert (a is None) == (b is None)  # (plain batch norm's bias has no second derivative)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_expanded_gradient_is_conformed(compiled):
    """``y.sum().backward()`` hands the node an expanded gradient (zero strides): conformed to
    the input's layout, the result equals the Python path's."""
    ours, python = _pair(batchnorm.BatchNorm2d(4))
    x = torch.randn(3, 4, 5, 5).to(memory_format=torch.channels_last)
    results = []
    for module, off in ((ours, False), (python, True)):
        xi = x.clone().requires_grad_(True)
        if off:
            with native.disabled():
                (module(xi) * 1.0).sum().backward()
        else:
            (module(xi) * 1.0).sum().backward()
        results.append([xi.grad, module.weight.grad, module.bias.grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_declined_calls_change_nothing(compiled):
    """What the compiled path does not take, it returns None for, before writing anything."""
    channels = 3
    x = torch.randn(4, channels, 5)
    weight, bias = torch.ones(channels), torch.zeros(channels)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    tracked = torch.zeros((), dtype=torch.long)

    def train(**changes):
        arguments = dict(x=x, weight=weight, bias=bias, running_mean=running_mean,
                         running_var=running_var, tracked=tracked)
        arguments.update(changes)
        return compiled.train(*arguments.values(), 1e-5, 0.1, 0)

    declined = [
        dict(x=x.half()),
        dict(x=x[:, :, ::2]),  # not dense
        dict(x=x.transpose(0, 2).contiguous().transpose(0, 2)),  # dense, not a layout read
        dict(x=torch.randn(1, channels)),  # one value per channel
        dict(x=torch.empty(0, channels, 5)),
        dict(x=x.double()),  # dtype differs from the vectors'
        dict(weight=None),
        dict(bias=torch.zeros(channels + 1)),
        dict(running_mean=torch.zeros(channels, requires_grad=True)),
        dict(running_var=torch.ones(2 * channels)[::2]),
        dict(tracked=torch.zeros(2, dtype=torch.long)),
        dict(tracked=torch.zeros((), dtype=torch.int32)),
        dict(x=torch.randn(4, channels, 5, device="meta")),
        dict(x=torch.randn(4, channels, 5)._neg_view()),
    ]
    for changes in declined:
        assert train(**changes) is None, changes
    assert torch.equal(running_mean, torch.zeros(channels))
    assert torch.equal(running_var, torch.ones(channels))
    assert tracked.item() == 0
    output, finite = train()
    assert finite is True and tracked.item() == 1
    assert compiled.eval(x, running_mean, running_var, None, bias, 1e-5, 0) is None
    with torch.enable_grad():
        needs = weight.clone().requires_grad_(True)
        assert compiled.eval(x, running_mean, running_var, needs, bias, 1e-5, 0) is None
        assert compiled.eval(x, running_mean, running_var, weight, bias, 1e-5, 0) is not None


def test_non_finite_batches_are_reported_and_not_counted(compiled):
    """A batch with a NaN: the running statistics keep their values, the count stays, the
    module warns once, as on the Python path."""
    ours, python = _pair(batchnorm.BatchNorm1d(3))
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning):
        ours(x)
    with native.disabled(), pytest.warns(RuntimeWarning):
        python(x)
    for a, b in zip(_state(ours), _state(python), strict=True):
        assert torch.equal(a, b)
    assert ours.num_batches_tracked.item() == 0


def test_functorch_transforms_take_the_python_path(compiled):
    """Under torch.func the call never reaches the compiled path (batched inputs have no memory
    to read); the results equal torch's."""
    ours = batchnorm.BatchNorm1d(3, track_running_stats=False)
    theirs = torch.nn.BatchNorm1d(3, track_running_stats=False)
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))
    grad = torch.func.grad(lambda t: ours(t).square().sum())(x[0])
    expected = torch.func.grad(lambda t: theirs(t).square().sum())(x[0])
    torch.testing.assert_close(grad, expected)


def test_the_activation_codes_are_the_kernels():
    """The functional forms name the fused activations by the kernels' own codes, and the
    smooth ones, which torch's operators apply around the kernels, by codes after those."""
    from batchnorm.backends import smooth
    from batchnorm.backends.cpu import kernels
    from batchnorm.functional import NATIVE_ACTIVATIONS

    fused = {name: code for name, code in NATIVE_ACTIVATIONS.items() if name in kernels.ACTIVATIONS}
    assert fused == kernels.ACTIVATIONS
    assert set(NATIVE_ACTIVATIONS) == set(kernels.ACTIVATIONS) | set(smooth.ACTIVATIONS)
    assert min(NATIVE_ACTIVATIONS[name] for name in smooth.ACTIVATIONS) > max(fused.values())


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("grad", [True, False])
def test_inference_buffers_are_refused_before_any_write(compiled, path, grad):
    """A module built under ``torch.inference_mode()`` (its buffers inference tensors), trained
    outside it: refused as torch refuses it (a RuntimeError), with the running statistics and
    the count unchanged, on either path (torch's module counts the batch before its refusal);
    inside inference mode the step runs, as torch's."""
    ours_or_torch = []
    x = torch.randn(4, 3)
    for make in (lambda: batchnorm.BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3)):
        kept = 3 if not ours_or_torch else 2  # (ours: the count too)
        with torch.inference_mode():
            module = make()
        before = [t.clone() for t in _state(module)]
        with native.disabled() if path == "python" else contextlib.nullcontext():
            with contextlib.nullcontext() if grad else torch.no_grad():
                with pytest.raises(RuntimeError, match="inference"):
                    module(x)
            for a, b in zip(_state(module)[:kept], before[:kept], strict=True):
                assert torch.equal(a, b)
            with torch.inference_mode():
                y = module(x)
        ours_or_torch.append((y, [t.clone() for t in _state(module)]))
    (ours, ours_state), (theirs, theirs_state) = ours_or_torch
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(ours_state[:2], theirs_state[:2], strict=True):
        torch.testing.assert_close(a, b)
