"""The batch-norm tests of upstream's ``test/test_nn.py`` that apply to a CPU module, on ours.

Each test names the upstream test it ports. Upstream runs most of them on ``BatchNorm1d`` only;
where a test is about the layer rather than that shape, it runs here on all three classes.
Upstream compares torch with itself (e.g. channels_last against contiguous); those checks are
kept, and where comparing our module with torch's on the same input is the natural check, that
comparison is added. The functional tests use ``batchnorm.functional.batch_norm`` in place of
``torch.nn.functional.batch_norm``.

CUDA-only upstream tests whose subject is not the device (mixed precision input with a float
module, a large batch) run here on the CPU, said so in their docstrings. Not ported: the
cuDNN/MIOpen and CUDA launch-configuration tests, ``test_batchnorm_nhwc`` (accelerator only:
bitwise equality of layouts in eval).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import batchnorm
import batchnorm.functional as BF
from tests.conftest import assert_close
from tests.torch_suite.torch_testing import gradcheck, gradgradcheck

OURS = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}
THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# an input shape per class: (N, C) plus the spatial dimensions of the class
SPATIAL = {1: (), 2: (2, 2), 3: (2, 2, 2)}
CLASSES = [pytest.param(d, id=f"BatchNorm{d}d") for d in OURS]
# (input dtype, module dtype): upstream's float case, and its CUDA-only mixed cases on the CPU
PRECISIONS = [
    pytest.param(torch.float32, torch.float32, id="float32"),
    pytest.param(torch.bfloat16, torch.float32, id="bfloat16-in-float32-module"),
    pytest.param(torch.float16, torch.float32, id="float16-in-float32-module"),
]


def shape_for(d, n, c):
    return (n, c, *SPATIAL[d])


def pair(d, *args, **kwargs):
    """Ours and torch's, same arguments, same state (affine parameters randomized)."""
    ours, theirs = OURS[d](*args, **kwargs), THEIRS[d](*args, **kwargs)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            shift = 0.5 if name == "weight" else 0.0
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + shift)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


# ---------------------------------------------------------------------------------------------
# running statistics


@pytest.mark.parametrize("d", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_batchnorm_update_stats(d, dtype):
    """upstream test_batchnorm_update_stats: training updates the running statistics and counts
    the batch; eval leaves all three alone."""
    module = OURS[d](3).to(dtype)
    data = torch.rand(shape_for(d, 4, 3), dtype=dtype)

    def buffers():
        names = ("running_mean", "running_var", "num_batches_tracked")
        return [module.get_buffer(name).clone() for name in names]

    before = buffers()
    module(data)
    assert not torch.equal(before[0], module.running_mean)
    assert not torch.equal(before[1], module.running_var)
    assert int(module.num_batches_tracked) == int(before[2]) + 1

    module.eval()
    before = buffers()
    module(data)
    assert torch.equal(before[0], module.running_mean)
    assert torch.equal(before[1], module.running_var)
    assert torch.equal(before[2], module.num_batches_tracked)


@pytest.mark.parametrize(("dtype", "module_dtype"), PRECISIONS)
def test_batchnorm_simple_average(dtype, module_dtype):
    """upstream test_batchnorm_simple_average (and, CUDA-only there, _mixed): with
    momentum=None the running statistics are the plain average of all batches seen since the
    last reset."""
    module = batchnorm.BatchNorm1d(3, momentum=None).to(module_dtype)
    zeros, ones = torch.zeros(3, dtype=module_dtype), torch.ones(3, dtype=module_dtype)
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    first, second = torch.rand(4, 3, dtype=dtype), torch.rand(4, 3, dtype=dtype)

    out_first = module(first)
    mean_first, var_first = module.running_mean.clone(), module.running_var.clone()
    assert not torch.equal(mean_first, zeros) and not torch.equal(var_first, ones)
    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)

    out_second = module(second)
    mean_second, var_second = module.running_mean.clone(), module.running_var.clone()
    assert not torch.equal(mean_second, zeros) and not torch.equal(var_second, ones)
    module.reset_running_stats()

    torch.testing.assert_close(module(first), out_first)
    torch.testing.assert_close(module(second), out_second)
    torch.testing.assert_close(module.running_mean, (mean_first + mean_second) / 2)
    torch.testing.assert_close(module.running_var, (var_first + var_second) / 2)


@pytest.mark.parametrize("d", CLASSES)
def test_batchnorm_buffer_update_when_stats_are_not_tracked(d):
    """upstream test_batchnorm_buffer_update_when_stats_are_not_tracked: a module built with
    buffers and then told ``track_running_stats = False`` leaves them alone in training (and,
    like torch's, normalizes with the batch's statistics)."""
    ours, theirs = pair(d, 4, track_running_stats=True)
    ours.track_running_stats = theirs.track_running_stats = False
    before = {name: b.clone() for name, b in ours.named_buffers()}
    x = torch.rand(shape_for(d, 32, 4))
    out = ours(x)
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert_close(out, theirs(x), torch.float32)
    ours.eval(), theirs.eval()  # eval with the flag off and buffers present: torch uses them
    assert_close(ours(x), theirs(x), torch.float32)


@pytest.mark.parametrize("d", CLASSES)
def test_batchnorm_empty(d):
    """upstream test_BatchNorm_empty: an empty training batch (N=0) gives an empty output, zero
    gradients, unchanged running statistics; and num_batches_tracked counts it, as torch's."""
    ours, theirs = pair(d, 3)
    x = torch.randn(shape_for(d, 0, 3), requires_grad=True)
    out = ours(x)
    assert out.shape == x.shape
    out.backward(torch.rand_like(out))
    for parameter in ours.parameters():
        torch.testing.assert_close(parameter.grad, torch.zeros_like(parameter))
    torch.testing.assert_close(x.grad, torch.zeros_like(x))
    torch.testing.assert_close(ours.running_mean, torch.zeros(3))
    torch.testing.assert_close(ours.running_var, torch.ones(3))
    theirs(torch.randn(shape_for(d, 0, 3)))
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


# ---------------------------------------------------------------------------------------------
# modes, affine, bias


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("dtype", "module_dtype"), PRECISIONS)
def test_batchnorm_eval(ndim, dtype, module_dtype):
    """upstream test_batchnorm_eval (and, CUDA-only there, _mixed): eval is repeatable; with
    ``track_running_stats=False`` eval gives what training gives."""
    module = batchnorm.BatchNorm1d(3).to(module_dtype).eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    results = []
    for _ in range(2):
        data.grad = None
        out = module(data)
        out.backward(grad)
        results.append((out, data.grad.clone()))
    torch.testing.assert_close(results[0], results[1])

    module = batchnorm.BatchNorm1d(3, track_running_stats=False).to(module_dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    results = []
    for _ in range(2):  # training, then eval
        data.grad = None
        out = module(data)
        out.backward(grad)
        results.append((out, data.grad.clone()))
        module.eval()
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("dtype", "module_dtype"), PRECISIONS)
def test_batchnorm_affine(ndim, dtype, module_dtype):
    """upstream test_batchnorm_affine (and, CUDA-only there, _mixed): affine with weight 1 and
    bias 0 is the same as no affine, output and input gradient."""
    plain = batchnorm.BatchNorm1d(3, affine=False).to(module_dtype)
    affine = batchnorm.BatchNorm1d(3, affine=True).to(module_dtype)
    with torch.no_grad():
        affine.weight.fill_(1.0)
        affine.bias.zero_()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.ones_like(data)
    results = []
    for module in (affine, plain):
        data.grad = None
        out = module(data)
        out.backward(grad)
        results.append((out, data.grad.clone()))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("d", CLASSES)
def test_bias_keyword(d):
    """torch 2.13's keyword-only ``bias=False``: a weight without a bias, torch's state-dict
    keys and repr, torch's output; and ``bias`` cannot be passed by position."""
    ours, theirs = pair(d, 3, bias=False)
    assert isinstance(ours.weight, nn.Parameter) and ours.bias is None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(shape_for(d, 4, 3), requires_grad=True)
    assert_close(ours(x), theirs(x), torch.float32)
    with pytest.raises(TypeError):
        THEIRS[d](3, 1e-5, 0.1, True, True, None, None, False)
    with pytest.raises(TypeError):
        OURS[d](3, 1e-5, 0.1, True, True, None, None, False)


@pytest.mark.parametrize("d", CLASSES)
def test_is_a_torch_batch_norm(d):
    """Drop-in: code written for torch's class (``isinstance(m, nn.BatchNorm2d)``, as torch's
    own fusion and quantization utilities check) recognises ours."""
    module = OURS[d](3)
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    assert isinstance(module, THEIRS[d])


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("d", CLASSES)
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(d):
    """upstream test_batchnorm_raises_error_if_less_than_one_value_per_channel: one value per
    channel in training is a ValueError (in eval, as torch, it is fine)."""
    module = OURS[d](10)
    x = torch.rand(1, 10, *[1] * d)  # (1, 10, 1), (1, 10, 1, 1), (1, 10, 1, 1, 1)
    with pytest.raises(ValueError):
        module(x)
    theirs = THEIRS[d](10).eval()
    assert_close(module.eval()(x), theirs(x), torch.float32)


@pytest.mark.parametrize("d", CLASSES)
@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_must_be_positive_in_training(d, eps):
    """torch 2.13 (ModuleInfo error inputs and ``F.batch_norm``): eps <= 0 raises a ValueError
    at the training forward; in eval eps = 0 is accepted and eps < 0 is a ValueError. Like
    torch, construction accepts any eps."""
    x = torch.randn(shape_for(d, 4, 3))
    ours, theirs = OURS[d](3, eps=eps), THEIRS[d](3, eps=eps)
    with pytest.raises(ValueError):
        theirs(x)
    with pytest.raises(ValueError):
        ours(x)
    ours.eval(), theirs.eval()
    if eps == 0.0:
        assert_close(ours(x), theirs(x), torch.float32)
    else:
        with pytest.raises(ValueError):
            theirs(x)
        with pytest.raises(ValueError):
            ours(x)


@pytest.mark.parametrize("buffer", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_batchnorm_raises_error_if_buffer_is_not_same_size_as_input(buffer, size):
    """upstream test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_
    same_size_as_input: the functional form raises something catchable as RuntimeError."""
    arguments = {
        "input": torch.rand(2, 10),
        "running_mean": torch.rand(10),
        "running_var": torch.rand(10),
    }
    arguments[buffer] = torch.rand(size)
    if buffer in ("weight", "bias"):
        arguments[buffer] = nn.Parameter(arguments[buffer])
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(**arguments)
    with pytest.raises(RuntimeError):
        BF.batch_norm(**arguments)


FORWARD_GRAD_CASES = [(0,), (1,), (1, 2), (0, 1), (0, 1, 2)]
NOT_DIFFERENTIABLE = "batch_norm is not differentiable wrt running_mean and running_var"


def _batch_norm_with_duals(fn, dual_indices):
    """The output tangent of ``fn`` in eval, tangents on the arguments in ``dual_indices``
    (input, running_mean, running_var); the same primals and tangents on every call."""
    generator = torch.Generator().manual_seed(6)
    primals = (
        torch.randn(3, 2, 5, generator=generator),
        torch.randn(2, generator=generator),
        torch.rand(2, generator=generator) + 0.5,
    )
    tangents = [torch.rand(p.shape, generator=generator) for p in primals]
    with fwAD.dual_level():
        arguments = [
            fwAD.make_dual(p, t) if i in dual_indices else p
            for i, (p, t) in enumerate(zip(primals, tangents, strict=True))
        ]
        return fwAD.unpack_dual(fn(*arguments, training=False, momentum=0.1)).tangent


def _raises_for_duals(dual_indices):
    # only when the input carries a tangent does batch norm's jvp run at all
    return 0 in dual_indices and bool({1, 2} & set(dual_indices))


# torch's forward-AD decompositions script functions when first used (a torch deprecation)
JIT_DEPRECATION = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize(
    "dual_indices", FORWARD_GRAD_CASES, ids=["-".join(map(str, c)) for c in FORWARD_GRAD_CASES]
)
def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(dual_indices):
    """upstream test of the same name, on ``batchnorm.functional.batch_norm`` in eval: forward
    AD runs through the input (with torch's tangent), and a tangent on the running statistics
    together with one on the input is a RuntimeError. Upstream passes momentum=-1.2, unused in
    eval; ours rejects momentum outside [0, 1] (``test_momentum_outside_unit_interval``; our
    error is also a RuntimeError, which would pass this test for the wrong reason), so 0.1."""
    if _raises_for_duals(dual_indices):
        with pytest.raises(RuntimeError):
            _batch_norm_with_duals(torch.nn.functional.batch_norm, dual_indices)
        with pytest.raises(RuntimeError):
            _batch_norm_with_duals(BF.batch_norm, dual_indices)
        return
    expected = _batch_norm_with_duals(torch.nn.functional.batch_norm, dual_indices)
    tangent = _batch_norm_with_duals(BF.batch_norm, dual_indices)
    # no tangent and a zero tangent say the same
    zeros = torch.zeros(3, 2, 5)
    tangent = zeros if tangent is None else tangent
    expected = zeros if expected is None else expected
    assert_close(tangent, expected, torch.float32)


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize(
    "dual_indices",
    [c for c in FORWARD_GRAD_CASES if _raises_for_duals(c)],
    ids=lambda c: "-".join(map(str, c)),
)
def test_batchnorm_forward_grad_error_message(dual_indices):
    """upstream's message for a tangent on the running statistics."""
    with pytest.raises(RuntimeError, match=NOT_DIFFERENTIABLE):
        _batch_norm_with_duals(BF.batch_norm, dual_indices)


def test_momentum_outside_unit_interval():
    """upstream's forward-grad test calls ``F.batch_norm(..., training=False, momentum=-1.2)``:
    torch accepts any momentum (unused in eval)."""
    x, mean, var = torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 0.5
    expected = torch.nn.functional.batch_norm(x, mean, var, training=False, momentum=-1.2)
    ours = BF.batch_norm(x, mean, var, training=False, momentum=-1.2)
    assert_close(ours, expected, torch.float32)


# ---------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_grad(training):
    """upstream test_batchnorm_grad: gradcheck and gradgradcheck of the functional form on an
    arange input, with running statistics, weight and bias, momentum 0.1, eps 1e-4."""
    batch, channels, length = 4, 5, 6
    kind = {"dtype": torch.double}
    x = torch.arange(batch * channels * length, **kind).view(batch, channels, length)
    weight = torch.arange(1, channels + 1, **kind).requires_grad_()
    bias = torch.arange(channels, **kind).requires_grad_()
    running_mean = 1 - torch.arange(channels, **kind)
    running_var = 2 * torch.arange(channels, **kind)
    arguments = (x.requires_grad_(), running_mean, running_var, weight, bias, training, 0.1, 1e-4)
    assert gradcheck(BF.batch_norm, arguments)
    assert gradgradcheck(BF.batch_norm, arguments)


# ---------------------------------------------------------------------------------------------
# layouts, reduced precision (CPU)


NHWC_SHAPES = [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)]
NHWC_PRECISIONS = [
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.bfloat16, False, id="bfloat16"),
    pytest.param(torch.bfloat16, True, id="bfloat16-in-float32-module"),
    pytest.param(torch.float16, False, id="float16"),
    pytest.param(torch.float16, True, id="float16-in-float32-module"),
]


def _nhwc_run(cls, shape, dtype, mixed, channels_last):
    """One training step; the seeded generator gives every call the same input and state."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=generator).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    module = cls(shape[1]).to(dtype)
    with torch.no_grad():
        module.weight.uniform_(generator=generator)
        module.bias.uniform_(generator=generator)
    if mixed:
        module.float()
    out = module(x)
    out.backward(grad)
    return module, out, x.grad, module.weight.grad, module.bias.grad


@pytest.mark.parametrize("shape", NHWC_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("dtype", "mixed"), NHWC_PRECISIONS)
def test_batchnorm_nhwc_cpu(shape, dtype, mixed):
    """upstream test_batchnorm_nhwc_cpu (float, bfloat16, bfloat16 in a float module; float16
    added): a channels_last input gives a channels_last output equal to the contiguous one,
    gradients too."""
    _, *results = _nhwc_run(batchnorm.BatchNorm2d, shape, dtype, mixed, channels_last=True)
    _, *expected = _nhwc_run(batchnorm.BatchNorm2d, shape, dtype, mixed, channels_last=False)
    assert results[0].is_contiguous(memory_format=torch.channels_last)
    assert expected[0].is_contiguous()
    torch.testing.assert_close(results, expected)


@pytest.mark.parametrize("shape", NHWC_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("dtype", "mixed"), NHWC_PRECISIONS)
def test_batchnorm_nhwc_cpu_matches_torch(shape, dtype, mixed):
    """The same runs through torch's module: same output and gradients (our tolerances)."""
    _, *ours = _nhwc_run(batchnorm.BatchNorm2d, shape, dtype, mixed, channels_last=True)
    _, *theirs = _nhwc_run(nn.BatchNorm2d, shape, dtype, mixed, channels_last=True)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        assert_close(a, b, a.dtype if a.dtype in (torch.float16, torch.bfloat16) else dtype)


def test_batchnorm_non_contig_cpu():
    """upstream test_batchnorm_non_contig_cpu: a permuted (channels_last-strided) input in eval
    gives a channels_last output equal to the contiguous input's (and to torch's)."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    ours, theirs = pair(2, 2)
    ours.eval(), theirs.eval()
    out = ours(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ours(x.contiguous()))
    assert_close(out, theirs(x.contiguous()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_batchnorm_nonaffine_reduced_precision_input(dtype):
    """upstream test_batchnorm_nonaffine_cuda_half_input on the CPU (bfloat16 added): a float
    module without affine keeps a half input's dtype, training and eval; values as torch's."""
    x = torch.randn(16, 3, 24, 24).to(dtype)
    ours, theirs = pair(2, 3, affine=False)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        out = ours(x)
        assert out.dtype == dtype
        assert_close(out, theirs(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_batchnorm_large_batch(dtype):
    """upstream test_batchnorm_large_batch (CUDA-only there) on the CPU: 880801 values in one
    channel, forward and ``sum().backward()``. Added: the same with a random output gradient,
    compared with torch (with ``sum()`` the weight gradient is a sum of normalized values, 0
    up to rounding noise of either implementation, so that one is not compared)."""
    x = torch.rand(880801, 1, 1, 1).to(dtype)
    module = batchnorm.BatchNorm2d(1).to(dtype)
    module(x.clone().requires_grad_()).sum().backward()

    grad_output = torch.randn(x.shape).to(dtype)
    results = []
    for cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d):
        module = cls(1).to(dtype)
        x_ = x.clone().requires_grad_()
        out = module(x_)
        out.backward(grad_output)
        results.append((out, x_.grad, module.weight.grad, module.bias.grad))
    for a, b in zip(*results, strict=True):
        assert_close(a, b, dtype, scale=10.0)


# ---------------------------------------------------------------------------------------------
# state dicts


@pytest.mark.parametrize("d", CLASSES)
def test_batchnorm_load_state_dict(d):
    """upstream test_batchnorm_load_state_dict: num_batches_tracked is in the state dict; a
    non-strict load of an empty dict keeps it; a meta module loaded with ``assign=True`` gets a
    real 0 for it."""
    module = OURS[d](3)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(0))
    module.num_batches_tracked = torch.tensor(10)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(10))
    module.load_state_dict(OrderedDict(), strict=False)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(10))

    with torch.device("meta"):
        meta_module = OURS[d](3)
    assert meta_module.num_batches_tracked.device == torch.device("meta")
    meta_module.load_state_dict(OrderedDict(), assign=True, strict=False)
    assert torch.equal(meta_module.state_dict()["num_batches_tracked"], torch.tensor(0))


@pytest.mark.parametrize("d", CLASSES)
def test_load_version_1_checkpoint_without_num_batches_tracked(d):
    """``_NormBase._load_from_state_dict``: a checkpoint saved before num_batches_tracked
    existed (metadata version 1, no such key) loads strictly and keeps the module's count; a
    current checkpoint missing the key is a strict-load error. Both as torch."""
    x = torch.randn(shape_for(d, 4, 3))
    results = []
    for cls in (OURS[d], THEIRS[d]):
        source = cls(3)
        source(x)
        old = source.state_dict()
        del old["num_batches_tracked"]
        old._metadata[""]["version"] = 1
        target = cls(3)
        target.num_batches_tracked.fill_(7)
        target.load_state_dict(old)
        current = source.state_dict()
        del current["num_batches_tracked"]
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(3).load_state_dict(current)
        results.append(target.state_dict())
    torch.testing.assert_close(results[0], results[1])
    assert int(results[0]["num_batches_tracked"]) == 7


STATE_ARGUMENTS = [
    pytest.param({}, id="default"),
    pytest.param({"affine": False}, id="not_affine"),
    pytest.param({"bias": False}, id="not_bias"),
    pytest.param({"track_running_stats": False}, id="not_tracking_stats"),
    pytest.param({"momentum": None}, id="cumulative"),
]


@pytest.mark.parametrize("d", CLASSES)
@pytest.mark.parametrize("arguments", STATE_ARGUMENTS)
def test_state_dict_loads_both_ways(d, arguments):
    """Checkpoints move between ours and torch's with ``strict=True``, and the loaded module
    then computes what the saved one does."""
    x = torch.randn(shape_for(d, 6, 3))
    for source_cls, target_cls in ((OURS[d], THEIRS[d]), (THEIRS[d], OURS[d])):
        source = source_cls(3, **arguments)
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for parameter in source.parameters():
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
        source(torch.randn(shape_for(d, 6, 3)))
        target = target_cls(3, **arguments)
        target.load_state_dict(source.state_dict(), strict=True)
        for training in (True, False):
            source.train(training), target.train(training)
            assert_close(target(x), source(x), torch.float32)


# ---------------------------------------------------------------------------------------------
# beyond torch, on purpose


@pytest.mark.parametrize("d", CLASSES)
def test_nonfinite_batch_updates_running_stats_like_torch(d):
    """Not an upstream test: pins a documented difference. torch folds a batch with a NaN into
    its running statistics (they become NaN) and counts it; ours leaves all three unchanged."""
    ours, theirs = pair(d, 3)
    x = torch.randn(shape_for(d, 4, 3))
    x[0, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
