"""Differential tests of the modules against torch.nn.BatchNorm{1,2,3}d."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm import reference
from tests.conftest import assert_close, check_common_backward_composes, make_input, record_answers

OURS = {
    2: batchnorm.BatchNorm1d,
    3: batchnorm.BatchNorm1d,
    4: batchnorm.BatchNorm2d,
    5: batchnorm.BatchNorm3d,
}
THEIRS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_pair(ndim, channels, param_dtype=torch.float32, seed=0, **flags):
    ours = OURS[ndim](channels, dtype=param_dtype, **flags)
    theirs = THEIRS[ndim](channels, dtype=param_dtype, **flags)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ours.affine:
            ours.weight.copy_(torch.rand(channels, generator=generator, dtype=param_dtype) + 0.5)
            ours.bias.copy_(torch.randn(channels, generator=generator, dtype=param_dtype))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run_steps(module, inputs, grads):
    """Training steps; returns outputs and gradients of input, weight and bias per step."""
    results = []
    for x, g in zip(inputs, grads, strict=True):
        x = x.detach().clone().requires_grad_(True)
        y = module(x)
        params = [p for p in (module.weight, module.bias) if p is not None]
        grads_ = torch.autograd.grad(y, [x, *params], g)
        results.append((y.detach(), *grads_))
    return results


shapes = st.integers(2, 5).flatmap(
    lambda ndim: st.tuples(
        st.just(ndim),
        st.integers(2, 6),  # N
        st.integers(1, 5),  # C
        st.lists(st.integers(1, 4), min_size=ndim - 2, max_size=ndim - 2),
    )
)


@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, None]),
    eps=st.sampled_from([1e-5, 1e-3]),
    seed=st.integers(0, 10_000),
)
# eval without running statistics in float16, on 2 values per channel: torch's result is 0.05 off
@example(shape=(2, 2, 4, []), dtype=torch.float16, layout="contiguous", affine=False,
         track=False, momentum=0.1, eps=1e-5, seed=9999)
def test_matches_torch(shape, dtype, layout, affine, track, momentum, eps, seed):
    ndim, n, c, spatial = shape
    size = (n, c, *spatial)
    if layout == "channels_last" and ndim not in (4, 5):
        layout = "contiguous"
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    flags = dict(affine=affine, track_running_stats=track, momentum=momentum, eps=eps)
    ours, theirs = make_pair(ndim, c, param_dtype, seed, **flags)
    inputs = [make_input(size, dtype, layout, seed=seed + i, scale=2.0, offset=i) for i in range(3)]
    grads = [make_input(size, dtype, layout, seed=seed + 100 + i) for i in range(3)]
    ours_steps, theirs_steps = run_steps(ours, inputs, grads), run_steps(theirs, inputs, grads)
    # Half-precision outputs and input gradients are rounded to the input dtype; the parameter
    # gradients are sums over N*spatial values and carry that rounding in proportion.
    count_scale = max(1.0, float(np.sqrt(n * np.prod(spatial or [1]))))
    weight = None if ours.weight is None else ours.weight.detach().double().numpy()
    bias = None if ours.bias is None else ours.bias.detach().double().numpy()
    for x, g, ours_step, theirs_step in zip(inputs, grads, ours_steps, theirs_steps, strict=True):
        if dtype in (torch.float16, torch.bfloat16):
            # torch's half-precision path loses digits where few values per channel make the
            # result cancel (seen: 0.025 off on 2 values); ours accumulates in float32, so it
            # is held to the float64 reference computed from the same rounded inputs instead.
            xs, gs = x.double().numpy(), g.double().numpy()
            y_ref = reference.forward_train(xs, weight, bias, eps)[0]
            expected = [y_ref, *reference.backward_train(gs, xs, weight, eps)]
            expected = [torch.from_numpy(e) for e in expected]
            if weight is None:
                expected = expected[:2]
        else:
            expected = theirs_step
        assert_close(ours_step[0], expected[0], dtype)
        assert_close(ours_step[1], expected[1], dtype, scale=4)
        for ours_grad, expected_grad in zip(ours_step[2:], expected[2:], strict=True):
            assert_close(ours_grad, expected_grad, dtype, scale=4 * count_scale)
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, param_dtype)
    ours.eval()
    theirs.eval()
    x = make_input(size, dtype, layout, seed=seed + 7)
    with torch.no_grad():
        if dtype in (torch.float16, torch.bfloat16) and not track:
            # without running statistics eval normalizes with the batch's own, where torch's
            # half-precision path cancels as in training (seen: 0.91 for 0.956 on 2 values)
            expected = torch.from_numpy(reference.forward_train(x.double().numpy(), weight, bias,
                                                                eps)[0])
        else:
            expected = theirs(x)
        assert_close(ours(x), expected, dtype)


@pytest.mark.parametrize(
    "ndim, layout",
    [(n, "contiguous") for n in (2, 3, 4, 5)]
    + [(n, "strided") for n in (2, 3, 4, 5)]
    + [(4, "channels_last"), (5, "channels_last")],
)
def test_matches_float64_reference(ndim, layout):
    size = (3, 4, *([3] * (ndim - 2)))
    ours, _ = make_pair(ndim, 4, torch.float64, seed=1)
    x = make_input(size, torch.float64, layout, seed=2, scale=3.0, offset=-2.0)
    g = make_input(size, torch.float64, layout, seed=3)
    y, dx, dw, db = run_steps(ours, [x], [g])[0]
    weight, bias = ours.weight.detach().numpy(), ours.bias.detach().numpy()
    ref_y, ref_mean, ref_var = reference.forward_train(x.numpy(), weight, bias, ours.eps)
    ref_dx, ref_dw, ref_db = reference.backward_train(g.numpy(), x.numpy(), weight, ours.eps)
    for ours_value, ref in [(y, ref_y), (dx, ref_dx), (dw, ref_dw), (db, ref_db)]:
        np.testing.assert_allclose(ours_value.numpy(), ref, rtol=1e-10, atol=1e-12)
    ref_rm, ref_rv = reference.update_running(np.zeros(4), np.ones(4), ref_mean, ref_var,
                                              x.numel() // 4, 0.1)
    np.testing.assert_allclose(ours.running_mean.numpy(), ref_rm, rtol=1e-12)
    np.testing.assert_allclose(ours.running_var.numpy(), ref_rv, rtol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_output_keeps_memory_format(layout):
    x = make_input((2, 3, 4, 5), torch.float32, layout)
    module = batchnorm.BatchNorm2d(3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert module(x).is_contiguous(memory_format=fmt)
    module.eval()
    with torch.no_grad():
        assert module(x).is_contiguous(memory_format=fmt)
    x.requires_grad_(True)
    module.train()
    (grad,) = torch.autograd.grad(module(x).sum(), x)
    assert grad.is_contiguous(memory_format=fmt)


def test_state_dict_round_trip_both_ways():
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                           nn.LazyLinear(5), nn.BatchNorm1d(5, momentum=None))
    theirs(torch.randn(6, 3, 8, 8))  # materialize and move the running statistics
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(144, 5), batchnorm.BatchNorm1d(5, momentum=None))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    ours.train()
    ours(torch.randn(6, 3, 8, 8))
    back = copy.deepcopy(theirs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back[5].num_batches_tracked) == 2


def test_is_recognised_as_a_batch_norm():
    assert isinstance(batchnorm.BatchNorm2d(3), nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("backend", [None, "eager"])  # the flag: a bool, or a bool tensor
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_protects_running_statistics(momentum, bad, backend):
    with batchnorm.use_backend(backend):
        module = batchnorm.BatchNorm1d(3, momentum=momentum)
        module(torch.randn(8, 3))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        x = torch.randn(8, 3)
        x[2, 1] = bad
        with pytest.warns(batchnorm.NonFiniteStatisticsWarning, match="BatchNorm1d"):
            y = module(x)
        assert not torch.isfinite(y[:, 1]).all(), "the non-finite output stays visible"
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), key
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module(x)  # warns once per module
        module(torch.randn(8, 3))
        assert int(module.num_batches_tracked) == 2


def test_warning_names_the_converted_module():
    model = batchnorm.convert(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    x = torch.full((4, 2), float("nan"))
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning, match="'1'"):
        model(x)


def test_cumulative_average_with_momentum_none():
    module = batchnorm.BatchNorm1d(2, momentum=None)
    batches = [torch.randn(10, 2) * (i + 1) + i for i in range(4)]
    for b in batches:
        module(b)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(module.running_mean, expected_mean)
    torch.testing.assert_close(module.running_var, expected_var)


def test_autocast_bfloat16():
    model = nn.Sequential(nn.Linear(6, 4), batchnorm.BatchNorm1d(4))
    reference_model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    reference_model.load_state_dict(model.state_dict())
    x = torch.randn(16, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y_ref = reference_model(x)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert model[0].weight.grad is not None and model[1].weight.grad.dtype == torch.float32
    torch.testing.assert_close(model[1].running_mean, reference_model[1].running_mean,
                               rtol=1e-2, atol=1e-2)


def test_track_running_stats_false_uses_batch_statistics_in_eval():
    ours, theirs = make_pair(4, 3, track_running_stats=False)
    assert ours.running_mean is None
    x = torch.randn(4, 3, 2, 2)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_training_step_counts_as_in_place_change_of_running_statistics():
    """An eval graph saves the running statistics; a later training step updates them in place
    (written by the kernel, not by a torch operation), so that graph's backward refuses rather
    than use the new values. (torch's own module does not check this.)"""
    module = batchnorm.BatchNorm1d(3)
    module.eval()
    x = torch.randn(6, 3, requires_grad=True)
    y = module(x)
    module.train()
    module(torch.randn(6, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _eval_pair(channels: int = 5, **flags):
    ours, theirs = make_pair(4, channels, seed=3, **flags)
    with torch.no_grad():
        ours.running_mean.copy_(torch.linspace(-1.0, 1.0, channels))
        ours.running_var.copy_(torch.linspace(0.5, 2.0, channels))
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


# Per-channel tensors in forms the common inference call declines (batchnorm.functional's
# normalize_common; the kernels would read them wrongly by address), each replacing one tensor
# of the module with the same values: the general path must answer, with torch's result.
def _strided(t):
    wide = torch.zeros(2 * t.shape[0], dtype=t.dtype)
    wide[::2] = t
    return wide[::2]


def _negated_view(t):
    # dense, with the negative bit: its memory holds the values' negatives
    view = torch._neg_view(-t)
    assert view.is_neg() and view.is_contiguous()
    return view


def _expanded(t):
    return t[:1].expand(t.shape[0])


UNCOMMON_FORMS = {
    "strided running_var": ("running_var", _strided),
    "negated running_mean": ("running_mean", _negated_view),
    "float64 running_var": ("running_var", lambda t: t.double()),
    "strided weight": ("weight", lambda t: nn.Parameter(_strided(t.detach()))),
    "expanded bias": ("bias", lambda t: nn.Parameter(_expanded(t.detach()))),
}


@pytest.mark.usefixtures("python_path")  # (the spies see the Python path's calls)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("form", [None, *UNCOMMON_FORMS])
def test_inference_call_takes_the_common_path_only_for_dense_statistics(monkeypatch, form,
                                                                        layout):
    """An eval forward of a plain model is answered by the backend's common call (one check of
    everything, one kernel call); any per-channel tensor in another form is declined there and
    still normalized with its own values, as torch does."""
    from batchnorm.backends import cpu

    ours, theirs = _eval_pair()
    if form is not None:
        name, change = UNCOMMON_FORMS[form]
        changed = change(getattr(ours, name))
        setattr(ours, name, changed)
        with torch.no_grad():  # torch's module gets the same values, densely
            getattr(theirs, name).copy_(changed.to(getattr(theirs, name).dtype))
    answered = record_answers(monkeypatch, cpu, "eval_common", lambda y: y is not None)
    x = make_input((6, 5, 3, 4), torch.float32, layout, seed=1)
    with torch.no_grad():
        y = ours(x)
    assert answered == [form is None]
    assert_close(y, theirs(x), torch.float32)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                           torch.contiguous_format)


def test_inference_call_with_misplaced_statistics_is_refused_by_the_full_checks():
    ours, _ = _eval_pair()
    ours.running_var = torch.ones(4)
    with pytest.raises(RuntimeError, match="running_var"):
        with torch.no_grad():
            ours(torch.randn(2, 5, 3, 3))
    ours, _ = _eval_pair()
    ours.running_mean = torch.zeros(5, device="meta")
    with pytest.raises(RuntimeError, match="running_mean"):
        with torch.no_grad():
            ours(torch.randn(2, 5, 3, 3))


@pytest.mark.parametrize("form", ["negated", "strided", "float16"])
def test_inference_call_on_an_uncommon_input_is_normalized_by_its_values(form):
    ours, theirs = _eval_pair()
    x = make_input((6, 5, 3, 4), torch.float32, "strided" if form == "strided" else "contiguous")
    if form == "negated":
        x = _negated_view(x)
    with torch.no_grad():
        if form == "float16":
            y = ours(x.half())
            assert y.dtype == torch.float16
            assert_close(y.float(), theirs(x.half().float()), torch.float16)
        else:
            assert_close(ours(x), theirs(x.clone()), torch.float32)


@pytest.mark.usefixtures("python_path")  # (the spies see the Python path's calls)
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("form", [None, *UNCOMMON_FORMS])
def test_training_step_takes_the_common_path_only_for_dense_tensors(monkeypatch, form, layout,
                                                                    grad):
    """A training step of a plain model is accepted whole by the backend (one check of
    everything, then the one-call forward and running update); any per-channel tensor in
    another form is declined and the step still gives torch's output, gradients, running
    statistics and count."""
    from batchnorm.backends import cpu

    ours, theirs = _eval_pair()
    ours.train(), theirs.train()
    if form is not None:
        name, change = UNCOMMON_FORMS[form]
        changed = change(getattr(ours, name))
        setattr(ours, name, changed)
        with torch.no_grad():
            getattr(theirs, name).copy_(changed.to(getattr(theirs, name).dtype))
    answered = record_answers(monkeypatch, cpu, "train_common")
    common_backward = record_answers(monkeypatch, cpu, "backward_common", lambda g: g is not None)
    general_backward = record_answers(monkeypatch, cpu, "train_backward", lambda _: True)
    x = make_input((6, 5, 3, 4), torch.float32, layout, seed=4, scale=2.0, offset=0.5)
    g = make_input((6, 5, 3, 4), torch.float32, layout, seed=5)
    for _ in range(2):
        versions = [t._version for t in (ours.running_mean, ours.running_var,
                                         ours.num_batches_tracked)]
        if grad:
            mine, expected = run_steps(ours, [x], [g])[0], run_steps(theirs, [x], [g])[0]
        else:
            with torch.no_grad():
                mine, expected = (ours(x),), (theirs(x),)
        for a, b in zip(mine, expected, strict=True):
            assert_close(a, b, torch.float32)
        # each step is an in-place change of the statistics and of the count, as in torch
        assert all(t._version > v for t, v in zip(
            (ours.running_mean, ours.running_var, ours.num_batches_tracked), versions,
            strict=True))
    assert answered == [0 if form is not None else 6 * 3 * 4] * 2
    # the backward of a common step takes the backend's shortest path, asking only about the
    # incoming gradient; any other step's takes the general one
    assert common_backward == ([True] * 2 if grad and form is None else [])
    assert general_backward == ([True] * 2 if grad and form is not None else [])
    assert int(ours.num_batches_tracked) == 2
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key].to(value.dtype), value, torch.float32)


def test_training_step_with_running_statistics_that_require_grad_is_declined(monkeypatch):
    from batchnorm.backends import cpu

    ours, theirs = _eval_pair()
    ours.train(), theirs.train()
    ours.running_mean.requires_grad_(True)
    answered = record_answers(monkeypatch, cpu, "train_common")
    x = make_input((6, 5, 3, 4), torch.float32, seed=4)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), torch.float32)
    assert answered == [0]


def test_a_subclass_with_its_own_commit_keeps_it_on_every_step():
    """The common training step commits inside the backend; a subclass that commits in its own
    way is not given that path (nor its eval shortcut), so its override still runs."""
    commits = []

    class Counting(batchnorm.BatchNorm2d):
        def _commit_running_stats(self, new_mean, new_var, finite):
            commits.append(finite)
            super()._commit_running_stats(new_mean, new_var, finite)

    module = Counting(3)
    module(torch.randn(4, 3, 2, 2))
    assert commits == [True] and int(module.num_batches_tracked) == 1


@pytest.mark.usefixtures("python_path")  # (the spies see the Python path's calls)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_common_step_backward_is_exact_and_composes(monkeypatch, layout):
    """The common step's backward (the backend's shortest path) passes gradcheck and
    gradgradcheck in float64, batched gradients included; double backward and a batched
    incoming gradient leave it for the general path, and the first-order backward stays on it."""
    module = batchnorm.BatchNorm2d(3, dtype=torch.float64)
    check_common_backward_composes(monkeypatch, module, layout)


@pytest.mark.parametrize("form", ["expanded", "transposed", "other layout", "offset view"])
def test_common_step_backward_reads_any_incoming_gradient_by_its_values(form):
    """The incoming gradient is read as it is only when it has the input's dtype and strides;
    any other form (the expanded gradient of a sum, a transposed view, the other memory
    format) is conformed first; a view into a larger tensor is read from its own offset. The
    gradients are torch's."""
    ours, theirs = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = make_input((4, 3, 5, 5), torch.float32, seed=9, scale=2.0)
    base = make_input((4, 3, 5, 5), torch.float32, seed=10)
    grads = {
        "expanded": torch.tensor(0.7).expand(4, 3, 5, 5),
        "transposed": base.transpose(2, 3).contiguous().transpose(2, 3),
        "other layout": base.contiguous(memory_format=torch.channels_last),
        "offset view": torch.stack([-base, base])[1],
    }
    g = grads[form]
    found = []
    for module in (ours, theirs):
        xr = x.clone().requires_grad_(True)
        y = module(xr)
        found.append(torch.autograd.grad(y, [xr, module.weight, module.bias], g))
    for a, b in zip(*found, strict=True):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("needing", ["input", "weight", "bias"])
def test_a_gradient_for_any_one_tensor_is_torchs(mode, needing):
    """Only one of input, weight and bias requires a gradient (a frozen input, or a layer
    fine-tuned on its bias alone): the call computes that gradient, as torch's module does,
    in training and in eval."""
    ours, theirs = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    theirs.load_state_dict(ours.state_dict())
    x = make_input((4, 3, 5, 5), torch.float32, seed=11, scale=2.0)
    g = make_input((4, 3, 5, 5), torch.float32, seed=12)
    found = []
    for module in (ours, theirs):
        getattr(module, mode)()
        inputs = {"input": x.clone(), "weight": module.weight, "bias": module.bias}
        for name, tensor in inputs.items():
            tensor.requires_grad_(name == needing)
        y = module(inputs["input"])
        found.append((y.detach(), *torch.autograd.grad(y, [inputs[needing]], g)))
    for a, b in zip(*found, strict=True):
        torch.testing.assert_close(a, b)
