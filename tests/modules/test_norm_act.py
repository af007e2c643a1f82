"""BatchNormAct1d/2d against torch.nn's batch norm followed by the activation, on the fused
kernel path and on the composed (eager) path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import batchnorm
from tests.conftest import assert_close, check_common_backward_composes, make_input, record_answers

TORCH_ACTIVATIONS = {"identity": lambda t: t, "relu": torch.relu, "silu": F.silu, "gelu": F.gelu}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
OURS = {2: batchnorm.BatchNormAct1d, 3: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d}


def _pair(ndim, channels, activation, dtype, seed):
    ours = OURS[ndim](channels, activation=activation, dtype=dtype)
    theirs = TORCH_BN[ndim](channels, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(channels, generator=generator, dtype=dtype) + 0.5)
        ours.bias.copy_(torch.randn(channels, generator=generator, dtype=dtype))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(module, x, residual, grad, activation=None):
    """Output and gradients of input, residual, weight, bias; ``activation`` set for torch."""
    inputs = [x.detach().clone().requires_grad_(True)]
    if residual is not None:
        inputs.append(residual.detach().clone().requires_grad_(True))
    if activation is None:
        y = module(*inputs)
    else:
        y = module(inputs[0])
        if residual is not None:
            y = y + inputs[1]
        y = TORCH_ACTIVATIONS[activation](y)
    grads = torch.autograd.grad(y, [*inputs, module.weight, module.bias], grad)
    return (y.detach(), *grads)


def _check(shape, layout, dtype, activation, with_residual, seed, backend=None):
    ours, theirs = _pair(len(shape), shape[1], activation, dtype, seed)
    x = make_input(shape, dtype, layout, seed=seed, scale=2.0, offset=0.5)
    residual = make_input(shape, dtype, layout, seed=seed + 1) if with_residual else None
    grad = make_input(shape, dtype, layout, seed=seed + 2)
    with batchnorm.use_backend(backend):
        for _ in range(2):  # two training steps: the running statistics are used and updated
            mine = _step(ours, x, residual, grad)
            expected = _step(theirs, x, residual, grad, activation)
            for a, b in zip(mine, expected, strict=True):
                assert_close(a, b, dtype, scale=8)
        if layout == "channels_last":
            assert mine[0].is_contiguous(memory_format=torch.channels_last)
        for key, value in theirs.state_dict().items():
            assert_close(ours.state_dict()[key], value, dtype)
        ours.eval()
        theirs.eval()
        for a, b in zip(_step(ours, x, residual, grad),
                        _step(theirs, x, residual, grad, activation), strict=True):
            assert_close(a, b, dtype, scale=8)
        expected = _step(theirs, x, residual, grad, activation)[0]
        with torch.no_grad():
            y = ours(x, residual) if with_residual else ours(x)
        assert_close(y, expected, dtype)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_matches_torch_batch_norm_then_activation(activation, with_residual, backend):
    _check((4, 6, 5, 7), "channels_last", torch.float32, activation, with_residual, 0, backend)
    _check((4, 6, 35), "contiguous", torch.float64, activation, with_residual, 1, backend)


@given(
    ndim=st.integers(2, 4),
    batch=st.integers(2, 5),
    channels=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 5), min_size=2, max_size=2),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    activation=st.sampled_from(["relu", "silu", "gelu"]),
    with_residual=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_inputs_match_torch(ndim, batch, channels, spatial, layout, dtype, activation,
                                   with_residual, seed):
    if layout == "channels_last" and ndim != 4:
        layout = "contiguous"
    shape = (batch, channels, *spatial[: ndim - 2])
    _check(shape, layout, dtype, activation, with_residual, seed)


def test_large_input_on_the_parallel_kernels():
    _check((4, 16, 40, 40), "contiguous", torch.float32, "relu", True, 3)
    _check((4, 16, 40, 40), "channels_last", torch.float32, "silu", True, 4)
    _check((2, 8, 30, 30), "contiguous", torch.float32, "gelu", False, 5)  # planes over 512


@pytest.mark.parametrize(
    "shape", [(4, 64, 3, 3), (3, 50, 2, 2), (8, 1200, 3, 3), (4100, 5, 2, 2), (8, 600, 4, 4)]
)
def test_short_planes(shape):
    """Planes of at most ``SHORT_PLANE`` values: training and eval run each sample as one flat
    run on the calling thread (the first two shapes); on the parallel path (the others, over
    ``SERIAL_BELOW`` values) the training forward and backward give each thread a range of
    channels, uneven ones included (five channels on two threads), up to
    ``SHORT_PLANE_PARALLEL`` values a plane, and run 4x4 planes by segments; ReLU and the
    residual included."""
    from batchnorm.backends.cpu import kernels

    assert shape[2] * shape[3] <= kernels.SHORT_PLANE
    _check(shape, "contiguous", torch.float32, "relu", True, 6)
    _check(shape, "contiguous", torch.float64, "identity", False, 7)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_double_backward(activation):
    module = batchnorm.BatchNormAct1d(3, activation=activation, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: module(a, b), (x, residual))


def test_state_dict_is_plain_batch_norms():
    fused = batchnorm.BatchNormAct2d(5, activation="gelu")
    plain = nn.BatchNorm2d(5)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    assert "activation=gelu" in repr(fused)


def test_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        batchnorm.BatchNormAct2d(3, activation="tanh")


@pytest.mark.parametrize("shape, layout", [((8, 64, 64, 68), "channels_last"),
                                           ((8400, 257), "contiguous")])
def test_relu_on_gradients_the_kernels_prefetch(shape, layout):
    """Rows inputs over ``PREFETCH_ABOVE_BYTES``: the ReLU backward prefetches the gradient
    rows, which must leave every value as it is."""
    from batchnorm.backends.cpu import kernels

    assert torch.Size(shape).numel() * 4 > kernels.PREFETCH_ABOVE_BYTES
    _check(shape, layout, torch.float32, "relu", False, 6, "cpu")
    _check(shape, layout, torch.float32, "relu", True, 7, "cpu")


RESIDUAL_CASES = {
    # a (C - 1,) vector broadcasts against the last axis when W == C - 1: it must not
    "broadcasting vector": (lambda x: torch.randn(x.shape[1] - 1), ValueError,
                            r"residual of the input's shape \(4, 6, 5, 5\), got shape \(5,\)"),
    "other shape": (lambda x: torch.randn(4, 6, 5, 4), ValueError, r"got shape \(4, 6, 5, 4\)"),
    "integer tensor": (lambda x: torch.ones(x.shape, dtype=torch.int64), TypeError,
                       "floating tensor of the input's shape .*, got a torch.int64 tensor"),
    "number": (lambda x: 1.0, TypeError, "floating tensor of the input's shape .*, got float"),
    "meta device": (lambda x: torch.empty(x.shape, device="meta"), ValueError,
                    "residual on the input's device cpu, got residual on meta"),
}


@pytest.mark.parametrize("case", sorted(RESIDUAL_CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_bad_residual_is_refused_before_anything_changes(case, training, backend):
    make, error, message = RESIDUAL_CASES[case]
    layer = batchnorm.BatchNormAct2d(6).train(training)
    x = torch.randn(4, 6, 5, 5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with batchnorm.use_backend(backend), pytest.raises(error, match=message) as caught:
        layer(x, make(x))
    assert isinstance(caught.value, RuntimeError)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_mask_passed_as_the_residual_is_named():
    layer = batchnorm.BatchNormAct1d(3)
    x, mask = torch.randn(4, 3, 7), torch.ones(4, 7, dtype=torch.bool)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=r"got a torch.bool tensor \(a mask\? this module takes "
                                        "none: its second argument is the residual"):
        layer(x, mask)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_residual_of_another_floating_dtype_promotes_as_torch(backend):
    ours, theirs = _pair(4, 6, "relu", torch.float32, 0)
    x = make_input((4, 6, 3, 3), torch.float32, "contiguous", seed=1)
    residual = make_input((4, 6, 3, 3), torch.float64, "contiguous", seed=2)
    with batchnorm.use_backend(backend):
        y = ours(x, residual)
    expected = torch.relu(theirs(x) + residual)
    assert y.dtype == torch.float64
    assert_close(y, expected, torch.float32)  # the batch norm itself ran in float32
    assert_close(ours.running_var, theirs.running_var, torch.float32)


# -- in-place activated batch norm (inplace=True) --------------------------------------------

INVERTIBLE = [("identity", None), ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 3.0)]


def _torch_activation(activation, slope):
    if activation == "identity":
        return lambda t: t
    return lambda t: F.leaky_relu(t, 0.01 if slope is None else slope)


def _in_place_pair(ndim, channels, activation, slope, dtype, weight, bias=None, **flags):
    """An in-place layer and torch's batch norm with the same state; ``weight`` as given."""
    kwargs = {} if slope is None else {"negative_slope": slope}
    ours = OURS[ndim](channels, activation=activation, inplace=True, dtype=dtype, **kwargs,
                      **flags)
    theirs = TORCH_BN[ndim](channels, dtype=dtype, **flags)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(weight)
        if ours.bias is not None:
            ours.bias.copy_(torch.randn(channels, dtype=dtype) if bias is None else bias)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _in_place_step(module, x, grad, after=None):
    """Output and gradients of input, weight and bias; the input goes through ``x * 1`` so the
    in-place layer receives a non-leaf it may overwrite."""
    leaf = x.detach().clone().requires_grad_(True)
    y = module(leaf * 1)
    if after is not None:
        y = after(y)
    params = [p for p in (module.weight, module.bias) if p is not None]
    return (y.detach().clone(), *torch.autograd.grad(y, [leaf, *params], grad))


@pytest.mark.parametrize("activation, slope", INVERTIBLE)
@pytest.mark.parametrize("shape, layout", [((4, 6, 5, 7), "channels_last"),
                                           ((4, 6, 5, 7), "contiguous"),
                                           ((5, 6, 9), "strided"), ((9, 6), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_in_place_matches_torch_batch_norm_then_activation(activation, slope, shape, layout,
                                                           dtype, backend):
    """Outputs, gradients and running statistics over two training steps and in eval, against
    torch's batch norm followed by torch's activation; the weights include a negative one and
    an exact zero (the channel kept exactly)."""
    channels = shape[1]
    weight = torch.tensor([1.5, -0.7, 0.0, 0.3, 2.0, 1.0], dtype=dtype)
    ours, theirs = _in_place_pair(len(shape), channels, activation, slope, dtype, weight)
    after = _torch_activation(activation, slope)
    x = make_input(shape, dtype, layout, seed=3, scale=2.0, offset=0.5)
    grad = make_input(shape, dtype, "contiguous", seed=4)
    with batchnorm.use_backend(backend):
        for training in (True, True, False):
            ours.train(training)
            theirs.train(training)
            mine, expected = _in_place_step(ours, x, grad), _in_place_step(theirs, x, grad, after)
            for a, b in zip(mine, expected, strict=True):
                assert_close(a, b, dtype, scale=8)
            for key, value in theirs.state_dict().items():
                assert_close(ours.state_dict()[key], value, dtype)


@pytest.mark.parametrize("training", [True, False])
def test_in_place_writes_the_output_over_the_input(training):
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu", inplace=True).train(training)
    x = torch.randn(4, 3, 5, 5)
    expected = F.leaky_relu(nn.BatchNorm2d(3).train(training)(x.clone()))
    with torch.no_grad():
        y = layer(x)
    assert y is x
    assert_close(x, expected.detach(), torch.float32)
    source = torch.randn(4, 3, 5, 5, requires_grad=True)
    inner = source * 2
    y = layer(inner)
    assert y.data_ptr() == inner.data_ptr() and inner._version > 0


@pytest.mark.parametrize("activation, slope", INVERTIBLE)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("flags", [{}, {"bias": False}, {"affine": False},
                                   {"track_running_stats": False}])
def test_in_place_gradcheck(activation, slope, training, flags):
    """float64 gradcheck of input, weight and bias, with gains of every kind: negative, zero,
    tiny (kept exactly), ordinary."""
    kwargs = {} if slope is None else {"negative_slope": slope}
    layer = batchnorm.BatchNormAct1d(5, activation=activation, inplace=True,
                                     dtype=torch.float64, **kwargs, **flags).train(training)
    if layer.running_mean is not None:
        layer.running_mean.copy_(torch.randn(5, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(5, dtype=torch.float64) + 0.5)
    layer.momentum = 0.0  # gradcheck calls the layer many times
    x = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    params = {}
    if layer.weight is not None:
        gains = [1.3, -0.8, 0.0, 1e-12, 0.4]
        if layer.bias is None and activation == "leaky_relu":
            # without a shift, a zero gain puts every value on leaky ReLU's kink, where no
            # gradient exists to check: those gains are checked with identity
            gains = [1.3, -0.8, 0.7, 0.2, 0.4]
        params["weight"] = torch.tensor(gains, dtype=torch.float64, requires_grad=True)
    if layer.bias is not None:
        params["bias"] = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        state = dict(zip(params, values, strict=True))
        return torch.func.functional_call(layer, state, (x * 1,))

    assert torch.autograd.gradcheck(run, (x, *params.values()))


def test_in_place_keeps_only_the_output_for_the_backward():
    """The tensors saved for the backward (all of them, through saved_tensors_hooks) are at most
    0.6x those of torch's BatchNorm2d followed by LeakyReLU: the output and a few per-channel
    vectors, against the batch norm's input and the activation's."""
    x = torch.randn(8, 16, 32, 32)
    torch_pair = nn.Sequential(nn.BatchNorm2d(16), nn.LeakyReLU())
    ours = batchnorm.BatchNormAct2d(16, activation="leaky_relu", inplace=True)
    composed = batchnorm.BatchNormAct2d(16, activation="leaky_relu")
    theirs = _saved_bytes(torch_pair, x)
    mine = _saved_bytes(ours, x)
    assert mine <= 0.6 * theirs
    assert mine <= x.numel() * 4 + 4 * 16 * 8  # the output and at most four vectors
    assert _saved_bytes(composed, x) > 0.9 * theirs  # the layer that keeps its input does not


def test_channels_below_the_tolerance_keep_their_input_and_only_they():
    """A weight of zero (or below the tolerance) cannot be inverted: those channels keep their
    centred input, costing memory for those channels only, and the gradients stay exact."""
    channels = 16
    weight = torch.ones(channels)
    weight[:4] = torch.tensor([0.0, 1e-7, -5e-4, 1.4e-3])  # under t * (1 + |beta|)
    ours, theirs = _in_place_pair(4, channels, "leaky_relu", None, torch.float32, weight,
                                  bias=torch.full((channels,), 0.5))
    x = torch.randn(8, channels, 6, 6) * 3 + 1
    grad = torch.randn(8, channels, 6, 6)
    extra = _saved_bytes(ours, x) - _saved_bytes(_in_place_pair(
        4, channels, "leaky_relu", None, torch.float32, torch.ones(channels))[0], x)
    assert extra == 4 * x[:, :4].numel() + 8 * 4  # four channels' input, and their indices
    mine = _in_place_step(ours, x, grad)
    expected = _in_place_step(theirs, x, grad, lambda t: F.leaky_relu(t))
    for a, b in zip(mine, expected, strict=True):
        assert_close(a, b, torch.float32, scale=8)


def _saved_bytes(module, x):
    """Bytes of the distinct storages saved for the backward by one training forward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    leaf = x.detach().clone().requires_grad_(True)
    inner = leaf * 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        inner = leaf * 1  # the multiplication saves nothing (a constant factor)
        module(inner)
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_in_place_refuses_activations_it_cannot_invert(activation):
    with pytest.raises(ValueError, match=f"needs an invertible activation.*got '{activation}'"):
        batchnorm.BatchNormAct2d(3, activation=activation, inplace=True)
    if activation == "relu":
        with pytest.raises(ValueError, match="ReLU maps every negative value to 0"):
            batchnorm.BatchNormAct2d(3, activation="relu", inplace=True)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"activation": "leaky_relu", "negative_slope": 0.0, "inplace": True}, ValueError,
     "negative_slope > 0"),
    ({"activation": "leaky_relu", "negative_slope": -0.1, "inplace": True}, ValueError,
     "negative_slope > 0"),
    ({"activation": "leaky_relu", "negative_slope": float("nan")}, ValueError, "finite"),
    ({"activation": "leaky_relu", "negative_slope": "0.1"}, TypeError, "as a number"),
    ({"activation": "relu", "negative_slope": 0.1}, ValueError, "leaky_relu' only"),
    ({"activation": "identity", "inplace": 1}, TypeError, "inplace as a bool"),
])
def test_bad_slopes_and_flags_are_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message) as caught:
        batchnorm.BatchNormAct2d(3, **kwargs)
    assert isinstance(caught.value, RuntimeError)


def test_leaky_relu_without_inplace_matches_torch_and_any_slope_is_allowed():
    for slope in (None, 0.0, -0.5, 2.0):
        kwargs = {} if slope is None else {"negative_slope": slope}
        ours = batchnorm.BatchNormAct2d(3, activation="leaky_relu", dtype=torch.float64,
                                        **kwargs)
        with torch.no_grad():
            ours.weight.normal_()
            ours.bias.normal_()
        theirs = nn.BatchNorm2d(3, dtype=torch.float64)
        theirs.load_state_dict(ours.state_dict())
        x, grad = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, 3, 3, 3,
                                                                            dtype=torch.float64)
        mine = _step(ours, x, None, grad)
        expected = _in_place_step(theirs, x, grad, _torch_activation("leaky_relu", slope))
        for a, b in zip(mine, expected, strict=True):
            assert_close(a, b, torch.float64)
    assert "negative_slope=0.01" in repr(batchnorm.BatchNormAct2d(3, activation="leaky_relu"))


@pytest.mark.parametrize("make, message", [
    (lambda: torch.randn(4, 3, 5, 5, requires_grad=True), "leaf tensor that requires grad"),
    (lambda: torch.randn(8, 3, 5, 5, requires_grad=True)[:4], "leaf tensor that requires grad"),
])
def test_in_place_refuses_a_leaf_before_anything_changes(make, message):
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu", inplace=True)
    x = make()
    before_x = x.detach().clone()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        layer(x)
    assert torch.equal(x.detach(), before_x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_in_place_refuses_a_residual_before_anything_changes():
    layer = batchnorm.BatchNormAct2d(3, activation="identity", inplace=True)
    x, residual = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    before_x = x.clone()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="inplace=True takes no residual"):
        layer(x, residual)
    assert torch.equal(x, before_x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_in_place_is_first_order_only():
    layer = batchnorm.BatchNormAct1d(3, activation="leaky_relu", inplace=True,
                                     dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x * 1).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_overwriting_an_input_another_backward_needs_is_reported_by_autograd():
    layer = batchnorm.BatchNormAct1d(3, activation="leaky_relu", inplace=True)
    x = torch.randn(5, 3, requires_grad=True)
    hidden = torch.sigmoid(x)  # sigmoid's backward reads its output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        layer(hidden).sum().backward()


def test_in_place_empty_batch_and_state_dict():
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu", inplace=True)
    y = layer(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4) and int(layer.num_batches_tracked) == 1
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    assert "negative_slope=0.01, inplace=True" in repr(layer)


def test_the_memory_benchmark_confirms_the_largest_batch_by_measuring(monkeypatch):
    """The linear fit of two probes only proposes a batch (here 12 for a budget of 1200 bytes):
    the measured bytes decide, downward and upward."""
    from batchnorm.bench import memory

    for beyond_probes, expected in ((1000, 4), (50, 11), (-300, 15)):
        def measured(model, batch, extra=beyond_probes):
            return 100 * batch + (extra if batch > 4 or (extra < 0 and batch > 2) else 0)

        monkeypatch.setattr(memory, "saved_bytes", measured)
        assert memory.largest_batch(None, 1200, probes=(1, 2))[2] == expected


def test_the_memory_benchmark_compares_the_same_network():
    """``batchnorm.bench.memory``: the three forms of its ResNet compute the same outputs and
    gradients; ours keeps at most 0.55x the bytes of torch's batch norm + LeakyReLU per image;
    the largest batch it reports fits the budget and one more does not."""
    from batchnorm.bench import memory

    x = torch.randn(2, *memory.IMAGE)
    results = []
    for form in memory.FORMS:
        model = memory.resnet(form)
        leaf = x.clone().requires_grad_(True)
        y = model(leaf)
        (grad,) = torch.autograd.grad(y.square().sum(), leaf)
        results.append((y.detach(), grad))
    for y, grad in results[1:]:
        assert_close(y, results[0][0], torch.float32, scale=10)
        assert_close(grad, results[0][1], torch.float32, scale=10)
    theirs, ours = memory.resnet("torch"), memory.resnet("ours, in-place")
    per_image = [memory.saved_bytes(m, 2) - memory.saved_bytes(m, 1) for m in (theirs, ours)]
    assert per_image[1] <= 0.55 * per_image[0]
    budget = 16 * 2**20
    _, _, batch = memory.largest_batch(ours, budget, probes=(1, 2))
    assert memory.saved_bytes(ours, batch) <= budget < memory.saved_bytes(ours, batch + 1)
    table = memory.format_memory(memory.run_memory(budget_mib=16))
    assert "| ours, in-place |" in table and "0.50 |" in table


@pytest.mark.usefixtures("python_path")  # (the spies see the Python path's calls)
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "identity", "leaky_relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inference_call_is_one_backend_call_for_the_activations_it_takes(monkeypatch,
                                                                         activation, layout):
    """An eval forward under no_grad is answered by the backend's common call (the kernels'
    activations fused, silu and gelu applied in place after them); leaky ReLU is declined there
    and answered by the general path. Either way the result is torch's."""
    from batchnorm.backends import cpu

    ours = batchnorm.BatchNormAct2d(6, activation=activation).eval()
    theirs = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    theirs.load_state_dict(ours.state_dict())
    answered = record_answers(monkeypatch, cpu, "eval_common", lambda y: y is not None)
    x = make_input((4, 6, 5, 7), torch.float32, layout, seed=2, scale=2.0)
    with torch.no_grad():
        y = ours(x)
        after = (lambda t: F.leaky_relu(t, 0.01)) if activation == "leaky_relu" else (
            TORCH_ACTIVATIONS[activation])
        expected = after(theirs(x))
    # leaky ReLU: declined with the activation, then the plain batch norm the general path
    # runs (before the activation) is a common call of its own
    assert answered == ([False, True] if activation == "leaky_relu" else [True])
    assert_close(y, expected, torch.float32)


FUSED_UNCOMMON_FORMS = {
    "float64 running_var": ("running_var", lambda t: t.double()),
    "strided weight": ("weight", lambda t: nn.Parameter(t.detach().repeat(2)[::2])),
}


@pytest.mark.usefixtures("python_path")  # (the spies see the Python path's calls)
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("form", [None, *FUSED_UNCOMMON_FORMS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "identity", "leaky_relu"])
def test_training_step_is_one_backend_call_for_the_activations_it_takes(
    monkeypatch, activation, layout, form, grad
):
    """A training step of a fused layer, as timm's models run it, is accepted whole by the
    backend and computed in one call: output, batch statistics, running statistics and the
    count, with no update call of its own and, in the backward, nothing asked again. Per-channel
    tensors in another form are declined there (and still computed, one backend call for the
    output and both statistics); leaky ReLU is declined and runs as plain batch norm's common
    step followed by the activation. Each way gives torch's output, gradients and state."""
    from batchnorm.backends import cpu

    ours = batchnorm.BatchNormAct2d(6, activation=activation)
    theirs = nn.BatchNorm2d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    if form is not None:
        name, change = FUSED_UNCOMMON_FORMS[form]
        setattr(ours, name, change(getattr(ours, name)))
    theirs.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    after = (lambda t: F.leaky_relu(t, 0.01)) if activation == "leaky_relu" else (
        TORCH_ACTIVATIONS[activation])
    answered = record_answers(monkeypatch, cpu, "train_common")
    updates = record_answers(monkeypatch, cpu, "updated_running_stats", lambda _: True)
    common_backward = record_answers(monkeypatch, cpu, "backward_common", lambda g: g is not None)
    backward_checked = []
    backward = cpu.backward

    def backward_spy(*args, checked=False, **kwargs):
        backward_checked.append(checked)
        return backward(*args, checked=checked, **kwargs)

    monkeypatch.setattr(cpu, "backward", backward_spy)
    shape = (4, 6, 5, 7)
    x = make_input(shape, torch.float32, layout, seed=6, scale=2.0, offset=0.5)
    g = make_input(shape, torch.float32, layout, seed=7)
    for _ in range(2):
        versions = [t._version for t in (ours.running_mean, ours.running_var,
                                         ours.num_batches_tracked)]
        if grad:
            mine = _step(ours, x, None, g)
            x_theirs = x.detach().clone().requires_grad_(True)
            y = after(theirs(x_theirs))
            expected = (y.detach(), *torch.autograd.grad(
                y, [x_theirs, theirs.weight, theirs.bias], g))
        else:
            with torch.no_grad():
                mine, expected = (ours(x),), (after(theirs(x)),)
        for a, b in zip(mine, expected, strict=True):
            assert_close(a, b, torch.float32)
        assert all(t._version > v for t, v in zip(
            (ours.running_mean, ours.running_var, ours.num_batches_tracked), versions,
            strict=True))
    common = form is None and activation != "leaky_relu"
    values = shape[0] * shape[2] * shape[3]
    if activation == "leaky_relu":  # the plain batch norm's common step, twice
        assert answered == [0 if form is not None else values] * 2
    else:
        assert answered == [values if common else 0] * 2
    # one call a step, with no update call of its own after the forward, wherever the running
    # statistics are dense vectors of the compute dtype (float64 ones are updated apart)
    assert updates == ([True] * 2 if form == "float64 running_var" else [])
    # after a common step the backward takes the backend's shortest path for the activations
    # its kernels fuse (and plain batch norm's after leaky ReLU); silu and gelu are declined
    # there and take the general backward without asking again, which calls itself once more
    # for the plain batch norm after their own gradient
    smooth = activation in ("silu", "gelu")
    if grad and form is None:
        assert common_backward == [not smooth] * 2
        assert backward_checked == ([True] * 4 if smooth else [])
    else:
        assert common_backward == []
        calls = 4 if smooth else 2
        assert backward_checked == ([False] * calls if grad else [])
    assert int(ours.num_batches_tracked) == 2
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key].to(value.dtype), value, torch.float32)


@pytest.mark.usefixtures("python_path")  # (the spies see the Python path's calls)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_fused_common_step_backward_is_exact_and_composes(monkeypatch, activation, layout):
    """The fused layer's common step's backward (the backend's shortest path for the
    activations its kernels fuse) passes gradcheck and gradgradcheck in float64, batched
    gradients included: double backward and a batched incoming gradient leave it for the
    general path, and the first-order backward stays on it."""
    module = batchnorm.BatchNormAct2d(3, activation=activation, dtype=torch.float64)
    check_common_backward_composes(monkeypatch, module, layout)


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_fused_backward_with_a_residual_takes_batched_gradients(activation):
    """The general fused backward (a residual: not the common step) with a batched incoming
    gradient, which no kernel can read: the composed form's gradients, checked by gradcheck's
    batched check."""
    from torch.autograd import gradcheck

    module = batchnorm.BatchNormAct2d(3, activation=activation, dtype=torch.float64)
    x = make_input((4, 3, 2, 3), torch.float64, seed=9).requires_grad_(True)
    residual = make_input((4, 3, 2, 3), torch.float64, seed=10).requires_grad_(True)
    assert gradcheck(lambda a, r: module(a, r), (x, residual), check_batched_grad=True)


@pytest.mark.parametrize("residual", [False, True])
def test_fused_batched_gradients_carry_no_graph_unless_asked(residual):
    """A batched incoming gradient (``is_grads_batched``) goes through the composed form, whose
    graph is built only to differentiate it: without ``create_graph`` the gradients carry no
    graph, as torch's batch norm and ReLU's do, and their values are those of one backward per
    gradient."""
    module = batchnorm.BatchNormAct2d(3, activation="relu", dtype=torch.float64)
    x = make_input((4, 3, 2, 3), torch.float64, seed=11).requires_grad_(True)
    extra = (make_input((4, 3, 2, 3), torch.float64, seed=12),) if residual else ()
    y = module(x, *extra)
    grads = make_input((2, *y.shape), torch.float64, seed=13)
    (found,) = torch.autograd.grad(y, x, grads, retain_graph=True, is_grads_batched=True)
    assert not found.requires_grad and found.grad_fn is None
    (graphed,) = torch.autograd.grad(y, x, grads, retain_graph=True, create_graph=True,
                                     is_grads_batched=True)
    assert graphed.requires_grad
    torch.testing.assert_close(graphed.detach(), found)
    for g, expected in zip(grads, found, strict=True):
        (one,) = torch.autograd.grad(y, x, g, retain_graph=True)
        torch.testing.assert_close(expected, one)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_fused_backward_under_torch_func_vmap_is_one_backward_per_gradient(activation,
                                                                          residual):
    """``torch.func.vmap`` over ``torch.autograd.grad`` (a backward vmapped by torch.func, not
    by the older vmap of ``is_grads_batched``): every input's gradient, the residual's and the
    parameters' included, equals one backward per incoming gradient."""
    module = batchnorm.BatchNormAct2d(3, activation=activation, dtype=torch.float64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    x = make_input((4, 3, 2, 3), torch.float64, seed=14).requires_grad_(True)
    inputs = [x, module.weight, module.bias]
    if residual:
        inputs.append(make_input((4, 3, 2, 3), torch.float64, seed=15).requires_grad_(True))
    y = module(x, *inputs[3:])
    grads = make_input((2, *y.shape), torch.float64, seed=16)
    found = torch.func.vmap(
        lambda g: torch.autograd.grad(y, inputs, g, retain_graph=True))(grads)
    for k, g in enumerate(grads):
        expected = torch.autograd.grad(y, inputs, g, retain_graph=True)
        for value, one in zip(found, expected, strict=True):
            torch.testing.assert_close(value[k], one)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_non_finite_batch_on_the_common_step_protects_running_statistics(activation, grad):
    """The common training step's one call keeps the running statistics and the count when the
    batch statistics are not finite, and the layer warns, as plain batch norm does."""
    import warnings

    module = batchnorm.BatchNormAct2d(3, activation=activation)
    module(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(4, 3, 2, 2).requires_grad_(grad)
    with torch.no_grad():
        x[1, 2, 0, 1] = float("inf")
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning, match="BatchNormAct2d"):
        module(x)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x)  # warns once per module
    module(torch.randn(4, 3, 2, 2))
    assert int(module.num_batches_tracked) == 2


def test_a_fused_subclass_with_its_own_commit_keeps_it_on_every_step():
    commits = []

    class Counting(batchnorm.BatchNormAct2d):
        def _commit_running_stats(self, new_mean, new_var, finite):
            commits.append(bool(finite))
            super()._commit_running_stats(new_mean, new_var, finite)

    module = Counting(3)
    module(torch.randn(4, 3, 2, 2))
    module(torch.randn(4, 3, 2, 2).requires_grad_())
    assert commits == [True, True] and int(module.num_batches_tracked) == 2
