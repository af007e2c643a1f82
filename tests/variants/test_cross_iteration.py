"""Cross-iteration batch norm against its definition (Yao et al. 2021), written out here in float64
with explicit Jacobians (torch.func.jacrev), and against torch's batch norm where it must equal
it (window=1, the first iteration, the burn-in)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.variants.cross_iteration import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    link_preceding,
)
from tests.conftest import assert_close

F64 = torch.float64


def _train(model, inputs, lr=0.05, seed=0):
    """SGD steps on a fixed loss; returns each step's output and input gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for x in inputs:
        leaf = x.clone().requires_grad_(True)
        y = model(leaf)
        target = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        loss = (y * target).sum() + (y * y).sum() * 0.1
        optimizer.zero_grad()
        loss.backward()
        results.append((y.detach(), leaf.grad))
        optimizer.step()
    return results


def _conv_pair(window, **kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    ours = nn.Sequential(conv, CrossIterationBatchNorm2d(4, window=window, preceding=conv,
                                                         momentum=0.2, **kwargs))
    theirs = copy.deepcopy(nn.Sequential(conv, nn.BatchNorm2d(4, momentum=0.2)))
    with torch.no_grad():
        ours[1].weight.uniform_(0.5, 1.5)
        ours[1].bias.normal_()
    theirs[1].load_state_dict(ours[1].state_dict(), strict=False)
    return ours, theirs


def test_window_one_is_batch_norm():
    ours, theirs = _conv_pair(window=1)
    inputs = [torch.randn(2, 3, 6, 6) * 2 + 1 for _ in range(4)]
    mine, expected = _train(ours, inputs), _train(theirs, inputs)
    for (y, dx), (y_t, dx_t) in zip(mine, expected, strict=True):
        assert_close(y, y_t, torch.float32)
        assert_close(dx, dx_t, torch.float32)
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, torch.float32)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 6, 6)
    assert_close(ours(x), theirs(x), torch.float32)


@pytest.mark.parametrize("burn_in", [0, 3])
def test_batch_norm_until_there_is_a_history_and_through_the_burn_in(burn_in):
    ours, theirs = _conv_pair(window=3, burn_in=burn_in)
    inputs = [torch.randn(2, 3, 6, 6) for _ in range(max(burn_in, 1) + 1)]
    mine, expected = _train(ours, inputs), _train(theirs, inputs)
    for step in range(max(burn_in, 1)):
        assert_close(mine[step][0], expected[step][0], torch.float32)
        assert_close(mine[step][1], expected[step][1], torch.float32)
    # then the window is used, and the outputs part from batch norm's
    assert not torch.allclose(mine[-1][0], expected[-1][0], atol=1e-3)


def _paper_reference(inputs, weights, gamma, beta, eps, window):
    """The paper's statistics in float64, for a Linear layer before the norm (x = u W^T): per
    iteration mu, nu = E[x^2] and their full Jacobians in W (jacrev), compensated by
    J (W_t - W_tau), pooled as (1/k) sum mu', (1/k) sum max(nu', mu'^2) - mean^2. Returns the
    output of the last iteration."""
    def moments(weight, u):
        x = u @ weight.T
        return x.mean(0), (x * x).mean(0)

    t = len(inputs) - 1
    current = weights[t]
    mus, nus = [], []
    for tau in range(max(0, t - window + 1), t + 1):
        mu, nu = moments(weights[tau], inputs[tau])
        jac_mu, jac_nu = torch.func.jacrev(moments)(weights[tau], inputs[tau])
        change = current - weights[tau]
        mus.append(mu + torch.einsum("cij,ij->c", jac_mu, change))
        nus.append(nu + torch.einsum("cij,ij->c", jac_nu, change))
    mean = torch.stack(mus).mean(0)
    var = torch.stack([torch.maximum(nu, mu * mu) for mu, nu in zip(mus, nus, strict=True)]
                      ).mean(0) - mean * mean
    x = inputs[t] @ current.T
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta, mean, var


@pytest.mark.parametrize("window", [2, 3, 5])
def test_equals_the_paper_with_explicit_jacobians(window):
    """float64, a Linear layer trained by SGD between iterations: every iteration's output
    equals the paper's formulas computed from the stored inputs and weights."""
    torch.manual_seed(window)
    linear = nn.Linear(5, 4, bias=False, dtype=F64)
    norm = CrossIterationBatchNorm1d(4, window=window, preceding=linear, dtype=F64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    model = nn.Sequential(linear, norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, weights = [], []
    for _ in range(window + 3):
        u = torch.randn(6, 5, dtype=F64) * 2 + 0.5
        inputs.append(u)
        weights.append(linear.weight.detach().clone())
        gamma, beta = norm.weight.detach().clone(), norm.bias.detach().clone()
        y = model(u)
        expected, mean, var = _paper_reference(inputs, weights, gamma, beta, norm.eps, window)
        torch.testing.assert_close(y.detach(), expected, rtol=1e-10, atol=1e-10)
        optimizer.zero_grad()
        (y * torch.randn(y.shape, dtype=F64)).sum().backward()
        optimizer.step()


def test_the_mean_compensation_is_exact_for_a_linear_layer():
    """The mean of a linear layer's output is linear in the weight, so the compensated past
    means equal the means of the past inputs through the current weight."""
    torch.manual_seed(1)
    linear = nn.Linear(5, 4, bias=False, dtype=F64)
    norm = CrossIterationBatchNorm1d(4, window=4, preceding=linear, dtype=F64)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.5)
    inputs = [torch.randn(6, 5, dtype=F64) + i for i in range(4)]
    for u in inputs:
        optimizer.zero_grad()
        norm(linear(u)).pow(3).sum().backward()
        optimizer.step()
    means, _ = _history_compensated(norm, linear.weight)
    assert len(means) == 3  # the ring holds the last three iterations
    for u in inputs[1:]:
        expected = (u @ linear.weight.detach().T).mean(0)
        assert any(torch.allclose(m, expected, rtol=1e-12, atol=1e-12) for m in means)


def _history_compensated(norm, weight):
    change = weight.detach()[None] - norm.history_weight
    mean_shift = (norm.history_mean_jacobian * change).flatten(2).sum(-1)
    var_shift = (norm.history_var_jacobian * change).flatten(2).sum(-1)
    return norm.history_mean + mean_shift, norm.history_var + var_shift - mean_shift ** 2


def test_with_constant_weights_the_window_is_the_concatenated_batches():
    """A preceding weight that does not change (here it does not require grad): the
    statistics are those of the last k batches joined, exactly; the running statistics receive
    them with Bessel's factor over all their values."""
    linear = nn.Linear(5, 3, bias=False, dtype=F64).requires_grad_(False)
    norm = CrossIterationBatchNorm1d(3, window=3, preceding=linear, momentum=1.0, dtype=F64)
    inputs = [torch.randn(n, 5, dtype=F64) * 3 + 1 for n in (4, 7, 2, 5)]
    for step, u in enumerate(inputs):
        x = linear(u).requires_grad_(True)
        y = norm(x)
        joined = torch.cat([linear(v) for v in inputs[max(0, step - 2): step + 1]])
        mean, var = joined.mean(0), joined.var(0, unbiased=False)
        torch.testing.assert_close(y.detach(), (x.detach() - mean) / torch.sqrt(var + norm.eps))
        torch.testing.assert_close(norm.running_mean, mean)
        torch.testing.assert_close(norm.running_var, joined.var(0, unbiased=True))


@given(steps=st.integers(1, 6), window=st.integers(1, 4), batch=st.integers(2, 5),
       seed=st.integers(0, 10_000))
def test_gradients_are_those_of_the_current_iteration_only(steps, window, batch, seed):
    """gradcheck (float64) in the input and the affine parameters after a random number of
    recorded iterations: the remembered statistics are constants."""
    torch.manual_seed(seed)
    linear = nn.Linear(4, 3, bias=False, dtype=F64)
    norm = CrossIterationBatchNorm1d(3, window=window, preceding=linear, dtype=F64)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.2)
    for _ in range(steps):
        optimizer.zero_grad()
        norm(linear(torch.randn(batch, 4, dtype=F64))).pow(2).mean().backward()
        optimizer.step()
    state = copy.deepcopy(norm.state_dict())

    def run(u, gamma, beta):
        try:
            return torch.func.functional_call(norm, {"weight": gamma, "bias": beta},
                                              (linear(u),))
        finally:
            norm.load_state_dict(state)  # each evaluation sees the same history

    u = torch.randn(batch, 4, dtype=F64, requires_grad=True)
    gamma = torch.rand(3, dtype=F64, requires_grad=True)
    beta = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (u, gamma, beta))


def test_a_checkpoint_resumes_exactly_and_plain_batch_norm_checkpoints_load():
    ours, _ = _conv_pair(window=3)
    inputs = [torch.randn(2, 3, 6, 6) for _ in range(6)]
    _train(ours, inputs[:3])
    checkpoint = copy.deepcopy(ours.state_dict())
    resumed = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), CrossIterationBatchNorm2d(4, window=3,
                                                                                      momentum=0.2))
    resumed.load_state_dict(checkpoint, strict=True)  # unlinked: the history takes its shape
    resumed[1].link(resumed[0])
    for (y, dx), (y_r, dx_r) in zip(_train(ours, inputs[3:]),
                                    _train(resumed, inputs[3:]), strict=True):
        assert torch.equal(y, y_r) and torch.equal(dx, dx_r)
    plain = nn.BatchNorm2d(4)
    plain.running_mean.fill_(0.5)
    ours[1].load_state_dict(plain.state_dict(), strict=True)
    assert int(ours[1].history_recorded) == 0
    assert torch.equal(ours[1].running_mean, plain.running_mean)


def test_convert_to_cross_iteration_then_link():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 5, bias=False), nn.BatchNorm1d(5))
    model(torch.randn(4, 3, 6, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batchnorm.convert(model, to="cross_iteration", window=3)
    assert type(model[1]) is CrossIterationBatchNorm2d and model[1].window == 3
    assert type(model[5]) is CrossIterationBatchNorm1d
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert link_preceding(model, torch.randn(2, 3, 6, 6)) == {"1": "0", "5": "4"}
    _train(model, [torch.randn(4, 3, 6, 6) for _ in range(3)])
    assert int(model[1].history_recorded) == 3 and int(model[5].history_recorded) == 3


def test_freeze_and_convert_back_keep_the_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), CrossIterationBatchNorm2d(4, window=2))
    link_preceding(model, torch.randn(2, 3, 6, 6))
    _train(model, [torch.randn(4, 3, 6, 6) for _ in range(3)])
    mean = model[1].running_mean.clone()
    batchnorm.freeze(model)
    assert type(model[1]) is batchnorm.FrozenBatchNorm2d
    assert torch.equal(model[1].running_mean, mean)


def test_link_preceding_finds_layers_in_any_graph_and_names_what_it_cannot():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.norm = CrossIterationBatchNorm2d(4, window=2)
            self.shortcut = nn.Conv2d(4, 4, 1, bias=False)
            self.after_sum = CrossIterationBatchNorm2d(4, window=2)
            self.plain = CrossIterationBatchNorm2d(4, window=1)  # needs no link

        def forward(self, x):
            y = torch.relu(self.norm(self.conv(x)))
            return self.plain(self.after_sum(y + self.shortcut(x)))

    block = Block().train()
    with pytest.raises(ValueError, match="is the input of after_sum"):
        link_preceding(block, torch.randn(2, 4, 5, 5))
    assert block.norm.preceding is None  # nothing linked when one cannot be
    assert block.training and block.norm.training  # modes restored
    block.after_sum.link(block.shortcut)
    assert link_preceding(block, torch.randn(2, 4, 5, 5)) == {"norm": "conv"}
    assert block.norm.preceding is block.conv and block.after_sum.preceding is block.shortcut
    assert "preceding" not in dict(block.norm.named_children())
    assert [name for name, _ in block.named_modules()].count("conv") == 1


def test_refusals_before_anything_changes():
    with pytest.raises(ValueError, match="window as an integer >= 1, got 0"):
        CrossIterationBatchNorm1d(3, window=0)
    with pytest.raises(ValueError, match="burn_in as an integer >= 0"):
        CrossIterationBatchNorm1d(3, window=2, burn_in=-1)
    with pytest.raises(TypeError, match="Linear or Conv1d/2d/3d"):
        CrossIterationBatchNorm2d(3, window=2, preceding=nn.ConvTranspose2d(2, 3, 3))
    with pytest.raises(ValueError, match="3 output channels, got Linear"):
        CrossIterationBatchNorm1d(3, window=2, preceding=nn.Linear(3, 4))
    norm = CrossIterationBatchNorm1d(3, window=2)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with pytest.raises(ValueError, match="window=2 needs the layer before it"):
        norm(torch.randn(4, 3))
    with pytest.raises(TypeError, match="takes no mask"):
        norm(torch.randn(4, 3, 2), torch.ones(4, 2, dtype=torch.bool))
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key
    norm.link(nn.Linear(5, 3))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with pytest.raises(ValueError, match="does not produce this layer's input"):
        norm(torch.randn(4, 3, requires_grad=True) * 2)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_forward_without_gradients_uses_the_window_and_records_nothing():
    linear = nn.Linear(5, 3, bias=False)
    norm = CrossIterationBatchNorm1d(3, window=3, preceding=linear)
    for _ in range(2):
        norm(linear(torch.randn(4, 5))).sum().backward()
    history = {k: v.clone() for k, v in norm.state_dict().items() if k.startswith("history")}
    batches = [torch.randn(4, 5) for _ in range(3)]
    with torch.no_grad():
        y = norm(linear(batches[0]))
        batchnorm.precise_bn(nn.Sequential(linear, norm), batches, progress=False)
    for key, value in history.items():
        assert torch.equal(norm.state_dict()[key], value), key
    joined = torch.cat([linear(b) for b in batches]).detach()
    torch.testing.assert_close(norm.running_mean, joined.mean(0))  # precise_bn's own sums
    plain = nn.BatchNorm1d(3)
    plain.load_state_dict(norm.state_dict(), strict=False)
    assert not torch.allclose(y, plain.train()(linear(batches[0])).detach(), atol=1e-4)


def test_a_compensated_variance_below_zero_is_clamped_to_zero():
    """The paper's max(nu', mu'^2): a remembered iteration whose compensated variance would be
    negative counts with variance 0 (its mean still counts)."""
    linear = nn.Linear(2, 1, bias=False, dtype=F64)
    norm = CrossIterationBatchNorm1d(1, window=2, preceding=linear, dtype=F64, affine=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        norm.history_mean.fill_(3.0)
        norm.history_var.fill_(0.5)
        norm.history_count.fill_(4.0)
        norm.history_weight.fill_(0.0)  # the weight moved by (1, 1) since then
        norm.history_mean_jacobian.fill_(0.5)  # mean shift 1
        norm.history_var_jacobian.fill_(-1.0)  # variance shift -2: 0.5 - 2 - 1 < 0
        norm.history_recorded.fill_(1)
    u = torch.randn(4, 2, dtype=F64)
    x = linear(u)
    y = norm(x)
    past = torch.full((4, 1), 4.0, dtype=F64)  # mean 3 + 1, variance max(., 0) = 0
    joined = torch.cat([x.detach(), past])
    expected = (x.detach() - joined.mean(0)) / torch.sqrt(joined.var(0, unbiased=False) + norm.eps)
    torch.testing.assert_close(y.detach(), expected)


def test_through_channel_wise_modules_the_jacobians_are_the_full_ones():
    """Linear, Tanh, then the norm (the norm after the activation): link_preceding looks
    through the activation, and the recorded Jacobians are the per-channel blocks of the full
    Jacobians of the batch mean and variance in the weight (jacrev through tanh)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 3, bias=False, dtype=F64), nn.Tanh(), nn.Dropout(0.0),
                          CrossIterationBatchNorm1d(3, window=2, dtype=F64))
    assert link_preceding(model, torch.randn(2, 5, dtype=F64)) == {"3": "0"}
    u = torch.randn(6, 5, dtype=F64)
    model(u).sum().backward()
    norm, weight = model[3], model[0].weight.detach()

    def moments(w):
        x = torch.tanh(u @ w.T)
        return x.mean(0), x.var(0, unbiased=False)

    full_mean, full_var = torch.func.jacrev(moments)(weight)  # (C, C, in)
    channels = torch.arange(3)
    torch.testing.assert_close(norm.history_mean_jacobian[0], full_mean[channels, channels])
    torch.testing.assert_close(norm.history_var_jacobian[0], full_var[channels, channels])
    # a channel's statistics depend on its own row only: the blocks off the diagonal are zero
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    assert full_mean[off_diagonal].abs().max() == 0 and full_var[off_diagonal].abs().max() == 0
