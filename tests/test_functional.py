"""The functional forms against torch.nn.functional.batch_norm, and under torch.func."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.functional import batch_norm, batch_norm_pure


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
@pytest.mark.parametrize("with_stats", [True, False])
def test_matches_torch_functional(training, momentum, with_stats):
    x = torch.randn(5, 3, 4) * 3 + 2
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    stats = (torch.randn(3), torch.rand(3) + 0.5)
    ours_stats = tuple(s.clone() for s in stats) if with_stats else (None, None)
    theirs_stats = tuple(s.clone() for s in stats) if with_stats else (None, None)
    y = batch_norm(x, *ours_stats, weight, bias, training=training, momentum=momentum)
    if with_stats or training:
        expected = F.batch_norm(x, *theirs_stats, weight, bias, training=training,
                                momentum=momentum)
    else:  # torch needs running statistics in eval; ours falls back to the batch's own
        expected = F.batch_norm(x, None, None, weight, bias, training=True)
    torch.testing.assert_close(y, expected)
    if with_stats:
        for o, t in zip(ours_stats, theirs_stats, strict=True):
            torch.testing.assert_close(o, t)


def test_pure_form_modifies_nothing():
    x = torch.randn(6, 3)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    y, new_mean, new_var = batch_norm_pure(x, running_mean, running_var, training=True)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
    expected_mean, expected_var = torch.zeros(3), torch.ones(3)
    expected = F.batch_norm(x, expected_mean, expected_var, training=True)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(new_mean, expected_mean)
    torch.testing.assert_close(new_var, expected_var)
    y_eval, same_mean, same_var = batch_norm_pure(x, running_mean, running_var, training=False)
    assert same_mean is running_mean and same_var is running_var


def test_pure_form_under_vmap():
    x = torch.randn(4, 8, 3)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    y, new_mean, new_var = torch.func.vmap(
        lambda xb: batch_norm_pure(xb, running_mean, running_var, training=True)
    )(x)
    for i in range(4):
        rm, rv = torch.zeros(3), torch.ones(3)
        expected = F.batch_norm(x[i], rm, rv, training=True)
        torch.testing.assert_close(y[i], expected)
        torch.testing.assert_close(new_mean[i], rm)
        torch.testing.assert_close(new_var[i], rv)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("size", [(4, 3, 5, 5), (6, 3)])
def test_pure_form_vmapped_over_parameters_with_a_shared_input(training, size):
    """An ensemble over weight, bias and running statistics (in_dims 0) with one input (None)."""
    members = 5
    x = torch.randn(size)
    weights, biases = torch.rand(members, 3) + 0.5, torch.randn(members, 3)
    means, variances = torch.randn(members, 3), torch.rand(members, 3) + 0.5
    y, new_mean, new_var = torch.func.vmap(
        lambda w, b, m, v: batch_norm_pure(x, m, v, w, b, training=training)
    )(weights, biases, means, variances)
    for i in range(members):
        rm, rv = means[i].clone(), variances[i].clone()
        expected = F.batch_norm(x, rm, rv, weights[i], biases[i], training=training)
        torch.testing.assert_close(y[i], expected)
        torch.testing.assert_close(new_mean[i], rm)
        torch.testing.assert_close(new_var[i], rv)
    # the bias alone batched: the product x * scale is unbatched, the shift is batched
    y_bias = torch.func.vmap(
        lambda b: batch_norm_pure(x, means[0], variances[0], weights[0], b, training=training)[0]
    )(biases)
    for i in range(members):
        expected = F.batch_norm(x, means[0].clone(), variances[0].clone(), weights[0], biases[i],
                                training=training)
        torch.testing.assert_close(y_bias[i], expected)


def test_pure_form_under_func_grad():
    x = torch.randn(7, 3, dtype=torch.float64)
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    bias = torch.randn(3, dtype=torch.float64)

    def loss(w, b, inp):
        return (batch_norm_pure(inp, None, None, w, b, training=True)[0] ** 2 * inp).sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2))(weight, bias, x)
    w, b, xx = (t.clone().requires_grad_(True) for t in (weight, bias, x))
    expected = torch.autograd.grad(
        (F.batch_norm(xx, None, None, w, b, training=True) ** 2 * xx).sum(), (w, b, xx)
    )
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_module_under_functional_call_with_pure_statistics():
    """torch.func.functional_call over a module whose batch norm is applied purely."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.bn = batchnorm.BatchNorm1d(3)

        def forward(self, x):
            y, _, _ = batch_norm_pure(self.linear(x), self.bn.running_mean, self.bn.running_var,
                                      self.bn.weight, self.bn.bias, training=True)
            return y

    net = Net()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    x = torch.randn(5, 4)

    def loss(p):
        return torch.func.functional_call(net, (p, buffers), (x,)).pow(2).sum()

    grads = torch.func.grad(loss)(params)
    net.zero_grad()
    net(x).pow(2).sum().backward()
    for name, parameter in net.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad)
