"""gradcheck and gradgradcheck in float64: the closed-form backward and the double backward."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from batchnorm.functional import batch_norm, batch_norm_pure


def _inputs(shape, affine, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    c = shape[1]
    weight = (torch.rand(c, generator=generator, dtype=torch.float64) + 0.5) if affine else None
    bias = torch.randn(c, generator=generator, dtype=torch.float64) if affine else None
    tensors = [t.requires_grad_(True) for t in (x, weight, bias) if t is not None]
    return x, weight, bias, tensors


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 3, 2), (2, 2, 2, 2, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(shape, affine, training):
    x, weight, bias, tensors = _inputs(shape, affine)
    c = shape[1]
    running_mean = torch.randn(c, dtype=torch.float64)
    running_var = torch.rand(c, dtype=torch.float64) + 0.5

    def fn(*args):
        x_, w_, b_ = (list(args) + [None, None])[:3] if affine else (args[0], None, None)
        # The pure form: gradcheck calls fn many times and must not move the statistics.
        return batch_norm_pure(x_, running_mean, running_var, w_, b_, training=training)[0]

    assert gradcheck(fn, tensors)
    assert gradgradcheck(fn, tensors)


def test_gradient_penalty_matches_autograd_through_plain_ops():
    """A gradient penalty (double backward) equals the one from a plain-ops implementation."""
    x, weight, bias, _ = _inputs((6, 3, 4), True, seed=5)

    def plain(x_, w_, b_):
        mean = x_.mean(dim=(0, 2), keepdim=True)
        var = x_.var(dim=(0, 2), unbiased=False, keepdim=True)
        return (x_ - mean) / torch.sqrt(var + 1e-5) * w_.view(1, -1, 1) + b_.view(1, -1, 1)

    def penalty(forward):
        y = forward(x, weight, bias)
        (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        return torch.autograd.grad((gx**2).sum(), [x, weight, bias])

    ours = penalty(lambda a, b, c: batch_norm(a, None, None, b, c, training=True))
    expected = penalty(plain)
    for o, e in zip(ours, expected, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3, 2)])
def test_training_step_path_gradients_and_running_statistics(shape):
    """A training call that updates running statistics in place and needs gradients takes one
    Function for output and update (batchnorm.autograd.apply_train_update): first and second
    derivatives as the pure form's, running statistics as torch's."""
    x, weight, bias, tensors = _inputs(shape, True, seed=3)
    c = shape[1]
    ours_stats = [torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)]
    torch_stats = [t.clone() for t in ours_stats]
    y = batch_norm(x, *ours_stats, weight, bias, training=True)
    assert type(y.grad_fn).__name__ == "_BatchNormTrainUpdateBackward"
    torch.nn.functional.batch_norm(x.detach(), *torch_stats, weight.detach(), bias.detach(),
                                   training=True)
    for ours, theirs in zip(ours_stats, torch_stats, strict=True):
        torch.testing.assert_close(ours, theirs)

    def fn(*args):
        return batch_norm(args[0], *ours_stats, args[1], args[2], training=True)

    assert gradcheck(fn, tensors)
    assert gradgradcheck(fn, tensors)


def test_training_step_path_uses_a_backends_fused_entry():
    """A backend with ``train_forward_update`` computes a training step's output and running
    update in one call; the result is the two-call path's."""
    from batchnorm import dispatch
    from batchnorm.backends import eager

    calls = []

    class Fused:
        name = "fused-test"
        supports = eager.supports
        train_forward, eval_forward = eager.train_forward, eager.eval_forward
        train_backward, eval_backward = eager.train_backward, eager.eval_backward
        updated_running_stats = eager.updated_running_stats

        @staticmethod
        def train_forward_update(x, weight, bias, eps, running_mean, running_var, momentum,
                                 count):
            calls.append(count)
            output, mean, variance = eager.train_forward(x, weight, bias, eps)
            _, _, finite = eager.updated_running_stats(
                running_mean, running_var, mean, variance, momentum, count, in_place=True
            )
            return output, mean, variance, finite

    x, weight, bias, _ = _inputs((5, 3, 4), True, seed=4)
    stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    expected_stats = [t.clone() for t in stats]
    dispatch.register_backend(Fused)  # the class: its functions stay plain functions
    try:
        with dispatch.use_backend("fused-test"):
            y = batch_norm(x, *stats, weight, bias, training=True, momentum=0.3)
            grads = torch.autograd.grad(y.sum() + (y**2).sum(), [x, weight, bias])
    finally:
        dispatch.unregister_backend("fused-test")
    assert calls == [20]
    with dispatch.use_backend("eager"):
        expected = batch_norm(x, *expected_stats, weight, bias, training=True, momentum=0.3)
        expected_grads = torch.autograd.grad(expected.sum() + (expected**2).sum(),
                                             [x, weight, bias])
    torch.testing.assert_close(y, expected)
    for ours, theirs in zip([*stats, *grads], [*expected_stats, *expected_grads], strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.usefixtures("python_path")  # (the spies see the Python path's calls)
def test_common_step_nodes_run_their_backward_as_apply():
    """Autograd calls the common step's backward straight from its node (no frames of torch's
    wrapper between); the gradients, and a direct ``grad_fn.apply``, are torch's."""
    from batchnorm import autograd
    from batchnorm.modules import norm_act
    from batchnorm.modules.batchnorm import BatchNorm2d

    for function in (autograd._BatchNormTrainUpdate, norm_act._FusedBatchNormAct):
        assert function._backward_cls.apply is function.backward
    torch.manual_seed(0)
    ours, theirs = BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    expected = torch.autograd.grad(theirs(x), [x, theirs.weight, theirs.bias], grad)
    y = ours(x)
    assert type(y.grad_fn).__name__ == "_BatchNormTrainUpdateBackward"
    found = torch.autograd.grad(y, [x, ours.weight, ours.bias], grad, retain_graph=True)
    direct = y.grad_fn.apply(grad, None)[:3]
    for ours_grads in (found, direct):
        for o, e in zip(ours_grads, expected, strict=True):
            torch.testing.assert_close(o, e)


def test_backward_called_directly_only_for_a_plain_backward():
    """A Function with its own ``vjp``, or with boxed gradients, keeps torch's ``apply``."""
    from batchnorm.autograd import call_backward_directly

    class TimesTwo(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

    class Doubles(TimesTwo):
        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    class WithVjp(TimesTwo):
        @staticmethod
        def vjp(ctx, grad):
            return grad * 2

    class Boxed(TimesTwo):
        boxed_grads_call = True  # backward receives the gradients as one list

        @staticmethod
        def backward(ctx, grads):
            return grads[0] * 2

    original = {f: f._backward_cls.apply for f in (WithVjp, Boxed)}
    for function in (Doubles, WithVjp, Boxed):
        call_backward_directly(function)
    assert Doubles._backward_cls.apply is Doubles.backward
    for function, apply in original.items():
        assert function._backward_cls.apply is apply
    x = torch.ones(3, requires_grad=True)
    for function in (Doubles, WithVjp, Boxed):
        (grad,) = torch.autograd.grad(function.apply(x).sum(), x)
        torch.testing.assert_close(grad, torch.full((3,), 2.0))
