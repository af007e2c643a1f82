"""Forward-mode AD and batched gradients through our Functions, against torch's batch norm.

gradcheck with ``check_forward_ad`` compares the jvp with finite differences; the explicit
comparisons check dual tensors (``torch.autograd.forward_ad``) and ``torch.func.jvp`` against
torch's own tangents, on every backend, and the batched backward (``is_grads_batched``,
vectorized Jacobians) against torch's Jacobian.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck

import batchnorm
from batchnorm.functional import batch_norm, batch_norm_pure

BACKENDS = [b for b in ("cpu", "eager", "reference") if b in batchnorm.available_backends()]


def _case(shape=(6, 3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    rm = torch.randn(c, generator=g, dtype=torch.float64)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 5), (2, 3, 3, 2)])
def test_gradcheck_forward_ad_and_batched_grad(shape, training):
    x, w, b, rm, rv = _case(shape)
    tensors = [t.requires_grad_(True) for t in (x, w, b)]

    def fn(x_, w_, b_):
        return batch_norm_pure(x_, rm, rv, w_, b_, training=training)[0]

    assert gradcheck(fn, tensors, check_forward_ad=True, check_batched_grad=True,
                     check_batched_forward_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_dual_tensor_tangent_equals_torch(backend, training, affine):
    x, w, b, rm, rv = _case()
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    if not affine:
        w = b = tw = tb = None

    def tangent(function):
        with fwAD.dual_level():
            dual = (
                fwAD.make_dual(x, tx),
                rm.clone(), rv.clone(),
                None if w is None else fwAD.make_dual(w, tw),
                None if b is None else fwAD.make_dual(b, tb),
            )
            out = function(*dual, training=training)
            primal, tangent = fwAD.unpack_dual(out)
            return primal, tangent

    with batchnorm.use_backend(backend):
        ours = tangent(batch_norm)
    expected = tangent(torch.nn.functional.batch_norm)
    assert ours[1] is not None, "the tangent was dropped"
    torch.testing.assert_close(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1])


@pytest.mark.parametrize("training", [True, False])
def test_module_under_func_jvp_equals_torch(training):
    x, *_ = _case((4, 3, 5, 5))
    tx = torch.randn_like(x)
    ours = batchnorm.BatchNorm2d(3).double().train(training)
    theirs = torch.nn.BatchNorm2d(3, track_running_stats=not training).double().train(training)
    out, tangent = torch.func.jvp(ours, (x,), (tx,))
    expected_out, expected_tangent = torch.func.jvp(theirs, (x,), (tx,))
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent, expected_tangent)
    if training:
        # torch's module refuses to update its buffers under jvp; ours updates them with the
        # batch's values, as an ordinary training step would
        reference = torch.nn.BatchNorm2d(3).double()
        reference(x)
        torch.testing.assert_close(ours.running_mean, reference.running_mean)
        torch.testing.assert_close(ours.running_var, reference.running_var)
        assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize("training", [True, False])
def test_masked_tangent_matches_finite_differences(training):
    x, w, b, rm, rv = _case((4, 3, 6))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    tensors = [t.requires_grad_(True) for t in (x, w, b)]

    def fn(x_, w_, b_):
        return batch_norm_pure(x_, rm, rv, w_, b_, training=training, mask=mask)[0]

    assert gradcheck(fn, tensors, check_forward_ad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_batched_gradients_and_vectorized_jacobian(backend, training):
    x, *_ = _case((4, 3, 5, 5))
    ours = batchnorm.BatchNorm2d(3).double().train(training)
    theirs = torch.nn.BatchNorm2d(3).double().train(training)
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    x = x.requires_grad_(True)
    with batchnorm.use_backend(backend):
        y = ours(x)
        cotangents = torch.randn(7, *y.shape, dtype=torch.float64)
        (batched,) = torch.autograd.grad(y, x, cotangents, is_grads_batched=True)
        jacobian = torch.autograd.functional.jacobian(ours, x, vectorize=True)
    y_expected = theirs(x)
    (expected,) = torch.autograd.grad(y_expected, x, cotangents, is_grads_batched=True)
    torch.testing.assert_close(batched, expected)
    expected_jacobian = torch.autograd.functional.jacobian(theirs, x, vectorize=True)
    torch.testing.assert_close(jacobian, expected_jacobian)
