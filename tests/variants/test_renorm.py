import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchRenorm1d, BatchRenorm2d, RenormSchedule
from batchnorm.variants.renorm import batch_renorm


def _straightforward(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """The paper's equations, written out with plain autograd ops (float64)."""
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dim=dims)
    std = torch.sqrt(x.var(dim=dims, unbiased=False) + eps)
    running_std = torch.sqrt(running_var + eps)
    r = torch.clamp(std.detach() / running_std, 1 / r_max, r_max)
    d = torch.clamp((mean.detach() - running_mean) / running_std, -d_max, d_max)
    x_hat = (x - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
    return x_hat * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 4)])
def test_matches_the_equations_with_clipping_active(shape):
    torch.manual_seed(0)
    module_cls = BatchRenorm2d if len(shape) == 4 else BatchRenorm1d
    module = module_cls(3, r_max=1.5, d_max=0.5, momentum=0.2, dtype=torch.float64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        # Running statistics far from the batch's, so that both clips bind.
        module.running_mean.fill_(3.0)
        module.running_var.fill_(9.0)
    x = (torch.randn(shape, dtype=torch.float64) * 0.5).requires_grad_(True)
    g = torch.randn(shape, dtype=torch.float64)
    rm, rv = module.running_mean.clone(), module.running_var.clone()
    y = module(x)
    w = module.weight.detach().clone().requires_grad_()
    b = module.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_(True)
    expected = _straightforward(xr, w, b, rm, rv, module.eps, 1.5, 0.5)
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y, (x, module.weight, module.bias), g)
    expected_grads = torch.autograd.grad(expected, (xr, w, b), g)
    for ours, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, ref)
    dims = (0, *range(2, len(shape)))
    torch.testing.assert_close(module.running_mean, 0.8 * rm + 0.2 * x.detach().mean(dims))
    torch.testing.assert_close(module.running_var, 0.8 * rv + 0.2 * x.detach().var(dims))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_with_r_max_1_and_d_max_0_it_is_batch_norm(dtype):
    torch.manual_seed(1)
    renorm = BatchRenorm2d(4, r_max=1.0, d_max=0.0, momentum=0.1, dtype=dtype)
    plain = batchnorm.BatchNorm2d(4, dtype=dtype)
    with torch.no_grad():
        renorm.weight.uniform_(0.5, 2)
        renorm.bias.normal_()
    plain.load_state_dict(renorm.state_dict())
    for step in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=dtype) * 2 + step
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = renorm(xa), plain(xb)
        assert torch.equal(ya, yb)
        ga = torch.autograd.grad(ya.sum() * 2, (xa, renorm.weight, renorm.bias))
        gb = torch.autograd.grad(yb.sum() * 2, (xb, plain.weight, plain.bias))
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(renorm.state_dict()[key], value)
    renorm.eval()
    plain.eval()
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    assert torch.equal(renorm(x), plain(x))


def test_published_schedule_and_its_step_survives_a_checkpoint():
    schedule = RenormSchedule()
    for step, (r, d) in {0: (1, 0), 5000: (1, 0), 15000: (1 + 2 * 10 / 35, 2.5),
                         25000: (1 + 2 * 20 / 35, 5), 40000: (3, 5), 90000: (3, 5)}.items():
        r_max, d_max = schedule.limits(torch.tensor(step))
        assert float(r_max) == pytest.approx(r) and float(d_max) == pytest.approx(d)
    module = BatchRenorm1d(3)
    assert module.schedule == RenormSchedule()
    module.num_batches_tracked.fill_(15000)
    restored = BatchRenorm1d(3)
    restored.load_state_dict(module.state_dict())
    assert float(restored.current_limits()[1]) == pytest.approx(2.5)
    restored(torch.randn(4, 3))
    assert int(restored.num_batches_tracked) == 15001


def test_state_dict_moves_to_and_from_torch():
    torch_bn = nn.BatchNorm1d(3)
    torch_bn(torch.randn(8, 3))
    renorm = BatchRenorm1d(3, r_max=2.0, d_max=1.0)
    renorm.load_state_dict(torch_bn.state_dict(), strict=True)
    torch_bn.load_state_dict(renorm.state_dict(), strict=True)


def test_functional_form_updates_in_place():
    rm, rv = torch.zeros(2), torch.ones(2)
    x = torch.randn(6, 2) + 1
    y = batch_renorm(x, rm, rv, training=True, momentum=0.5, r_max=1.0, d_max=0.0)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(rm, 0.5 * x.mean(0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        BatchRenorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="both given"):
        BatchRenorm1d(3, r_max=2.0)
    with pytest.raises(ValueError, match="r_max >= 1"):
        BatchRenorm1d(3, r_max=0.5, d_max=0.0)
    module = BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="expected 4D input"):
        module(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3, 1, 1))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])


BAD_LIMITS = [
    ({"r_max": 0.5, "d_max": 1.0}, r"finite r_max >= 1, got r_max=0.5"),
    ({"r_max": float("nan"), "d_max": 1.0}, r"finite r_max >= 1, got r_max=nan"),
    ({"r_max": float("inf"), "d_max": 1.0}, r"finite r_max >= 1, got r_max=inf"),
    ({"r_max": 2.0, "d_max": -0.1}, r"finite d_max >= 0, got d_max=-0.1"),
    ({"r_max": 2.0, "d_max": float("nan")}, r"finite d_max >= 0, got d_max=nan"),
    ({"r_max": torch.tensor(0.9), "d_max": 1.0}, r"finite r_max >= 1, got r_max=0.9"),
    ({"r_max": 2.0, "d_max": torch.tensor(float("-inf"))}, r"finite d_max >= 0, got d_max=-inf"),
]


def _state(*tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("limits, message", BAD_LIMITS)
@pytest.mark.parametrize("training", [True, False])
def test_the_functional_form_rejects_bad_limits_before_anything_changes(limits, message,
                                                                          training):
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = _state(rm, rv)
    with pytest.raises(ValueError, match=message) as caught:
        batch_renorm(torch.randn(6, 3), rm, rv, training=training, **limits)
    assert isinstance(caught.value, RuntimeError)  # what code written for torch catches
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("limits, message", [case for case in BAD_LIMITS
                                             if not isinstance(case[0]["r_max"], torch.Tensor)
                                             and not isinstance(case[0]["d_max"], torch.Tensor)])
def test_the_modules_reject_bad_limits_when_built_and_when_changed(limits, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm1d(3, **limits)
    module = BatchRenorm1d(3, r_max=2.0, d_max=1.0)
    module.r_max, module.d_max = limits["r_max"], limits["d_max"]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        module(torch.randn(6, 3))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_limits_of_the_wrong_kind_and_a_bad_schedule():
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(6, 3)
    with pytest.raises(TypeError, match=r"r_max as a number or a 0-dim real tensor, got a tensor "
                                        r"of shape \(3,\)"):
        batch_renorm(x, rm, rv, training=True, r_max=torch.full((3,), 2.0))
    with pytest.raises(TypeError, match="d_max as a number or a 0-dim tensor, got str"):
        batch_renorm(x, rm, rv, training=True, d_max="5")
    with pytest.raises(ValueError, match="d_max on the input's device cpu or the CPU, got d_max "
                                         "on meta"):
        batch_renorm(x, rm, rv, training=True, d_max=torch.tensor(1.0, device="meta"))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(ValueError, match="RenormSchedule: expected a finite r_max >= 1"):
        RenormSchedule(r_max=0.5)
    with pytest.raises(ValueError, match="RenormSchedule: expected warmup_steps as an integer"):
        RenormSchedule(warmup_steps=-1)
    # tensors within the limits are taken, as numbers are
    y = batch_renorm(x, rm, rv, training=True, r_max=torch.tensor(1.0), d_max=torch.tensor(0))
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("form", ["module", "functional"])
def test_arguments_are_validated_once_per_call(validations, training, form):
    x = torch.randn(6, 3)
    if form == "module":
        module = BatchRenorm1d(3, r_max=2.0, d_max=1.0).train(training)
        module(x)
    else:
        batch_renorm(x, torch.zeros(3), torch.ones(3), training=training)
    assert len(validations) == 1, validations


def test_r_and_d_are_constants_in_backprop_even_when_no_clip_binds():
    """With limits no batch reaches, r = sigma_B / sigma and d = (mu_B - mu) / sigma are used
    unclipped; differentiated through, they would cancel the batch statistics and leave the
    gradient of a fixed affine map (gamma / sigma). As constants, the gradient is batch norm's
    scaled by r."""
    torch.manual_seed(0)
    module = BatchRenorm1d(3, r_max=1e6, d_max=1e6, momentum=0.0, dtype=torch.float64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        module.running_var.copy_(torch.tensor([4.0, 0.25, 9.0], dtype=torch.float64))
    x = (torch.randn(8, 3, 5, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    g = torch.randn(8, 3, 5, dtype=torch.float64)
    rm, rv = module.running_mean.clone(), module.running_var.clone()
    y = module(x)
    ours = torch.autograd.grad(y, (x, module.weight, module.bias), g)

    def formula(detached):
        xr = x.detach().clone().requires_grad_(True)
        w = module.weight.detach().clone().requires_grad_(True)
        b = module.bias.detach().clone().requires_grad_(True)
        mean = xr.mean(dim=(0, 2))
        std = torch.sqrt(xr.var(dim=(0, 2), unbiased=False) + module.eps)
        running_std = torch.sqrt(rv + module.eps)
        r = (std.detach() if detached else std) / running_std
        d = ((mean.detach() if detached else mean) - rm) / running_std
        r_value, d_value = r.detach(), d.detach()
        assert float(r_value.max()) < 1e6 and float(d_value.abs().max()) < 1e6  # no clip binds
        assert float((r_value - 1).abs().min()) > 0.1 and float(d_value.abs().min()) > 0.1
        view = (1, -1, 1)
        x_hat = (xr - mean.view(view)) / std.view(view) * r.view(view) + d.view(view)
        out = x_hat * w.view(view) + b.view(view)
        return out, torch.autograd.grad(out, (xr, w, b), g)

    expected_y, expected = formula(detached=True)
    torch.testing.assert_close(y, expected_y)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)
    # the test tells the two apart: differentiating through r and d gives another gradient
    _, through = formula(detached=False)
    assert (ours[0] - through[0]).abs().max() > 0.1


def test_tensor_limits_trace_under_compile():
    """Under torch.compile the limits' values are not read (a graph break, or an error with
    fullgraph=True); the same result as without compiling. (The "eager" compile backend traces
    with dynamo and runs the graph as is, which is all this needs, in seconds.)"""

    def step(x, running_mean, running_var, r_max, d_max):
        return batch_renorm(x, running_mean, running_var, training=True, r_max=r_max,
                            d_max=d_max)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    x = torch.randn(6, 3) * 2 + 1
    limits = (torch.tensor(1.2), torch.tensor(0.3))
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    rm2, rv2 = rm.clone(), rv.clone()
    torch.testing.assert_close(compiled(x, rm, rv, *limits), step(x, rm2, rv2, *limits))
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
