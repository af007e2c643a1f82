import pytest
import torch
import torch.nn.functional as F

from batchnorm import BNLSTM, RecurrentBatchNorm


def test_separate_statistics_per_step_and_reuse_beyond_max_steps():
    bn = RecurrentBatchNorm(3, max_steps=2, momentum=0.5)
    assert torch.allclose(bn.weight, torch.full((3,), 0.1))
    inputs = [torch.randn(8, 3) * (t + 1) + t for t in range(3)]
    for t, x in enumerate(inputs):
        y = bn(x, t)
        torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.weight, bn.bias,
                                                   training=True))
    torch.testing.assert_close(bn.running_mean[0], 0.5 * inputs[0].mean(0))
    # Steps 1 and 2 share the last slot.
    slot = 0.5 * (0.5 * inputs[1].mean(0)) + 0.5 * inputs[2].mean(0)
    torch.testing.assert_close(bn.running_mean[1], slot)
    assert bn.num_batches_tracked.tolist() == [1, 2]
    bn.eval()
    x = torch.randn(4, 3)
    expected = F.batch_norm(x, bn.running_mean[1], bn.running_var[1], bn.weight, bn.bias)
    torch.testing.assert_close(bn(x, 7), expected)


def test_lstm_ignores_padding_and_returns_last_valid_state():
    torch.manual_seed(0)
    lstm = BNLSTM(3, 5, max_steps=6, batch_first=True)
    lengths = torch.tensor([6, 4, 2, 5])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    x = torch.randn(4, 6, 3)
    noisy = x.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 3) * 100
    out, (h, c) = lstm(x, mask)
    out_noisy, (h_noisy, _) = lstm(noisy, mask)
    torch.testing.assert_close(out, out_noisy)
    torch.testing.assert_close(h, h_noisy)
    assert out.shape == (4, 6, 5) and h.shape == (1, 4, 5)
    assert torch.all(out[~mask] == 0)
    for i, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(h[0, i], out[i, length - 1])
    out.sum().backward()
    assert lstm.cells[0].weight_hh.grad is not None


def test_bad_inputs():
    bn = RecurrentBatchNorm(3, max_steps=2)
    with pytest.raises(ValueError, match="time step t >= 0"):
        bn(torch.randn(4, 3), -1)
    with pytest.raises(ValueError, match="expected 3 channels"):
        bn(torch.randn(4, 2), 0)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\)"):
        BNLSTM(2, 4, max_steps=3)(torch.randn(3, 2, 2), torch.ones(3, 2, dtype=torch.bool))


def test_gradcheck_and_the_functional_form():
    from torch.autograd import gradcheck, gradgradcheck

    from batchnorm.variants.recurrent import recurrent_batch_norm

    torch.manual_seed(3)
    means = torch.zeros(2, 3, dtype=torch.float64)
    variances = torch.ones(2, 3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        def step(a, gamma, beta, training=training):
            return recurrent_batch_norm(a, 1, means.clone(), variances.clone(), gamma, beta,
                                        training=training)

        assert gradcheck(step, (x, w, b))
        assert gradgradcheck(step, (x, w, b))
    bn = RecurrentBatchNorm(3, max_steps=2, dtype=torch.float64)
    expected = bn(x, 3)
    y = recurrent_batch_norm(x, 3, means, variances, bn.weight, bn.bias, training=True)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(means, bn.running_mean)
    assert bn.num_batches_tracked.tolist() == [0, 1]


def test_steps_beyond_max_steps_share_the_last_row_as_documented():
    """Steps t >= max_steps use row max_steps - 1: in training each of them updates it (and its
    count) in turn, at eval they all normalize with it; earlier rows are left alone."""
    torch.manual_seed(0)
    bn = RecurrentBatchNorm(3, max_steps=3, momentum=0.25, dtype=torch.float64)
    last_mean = torch.zeros(3, dtype=torch.float64)
    last_var = torch.ones(3, dtype=torch.float64)
    inputs = [torch.randn(6, 3, dtype=torch.float64) * (1 + t) + t for t in range(8)]
    for t, x in enumerate(inputs):
        y = bn(x, t)
        torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.weight, bn.bias,
                                                   training=True))
        if t >= 2:  # torch's update of the shared row, one step after another
            F.batch_norm(x, last_mean, last_var, training=True, momentum=0.25)
    assert bn.num_batches_tracked.tolist() == [1, 1, 6]
    torch.testing.assert_close(bn.running_mean[2], last_mean)
    torch.testing.assert_close(bn.running_var[2], last_var)
    torch.testing.assert_close(bn.running_mean[0], 0.25 * inputs[0].mean(0))
    bn.eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = F.batch_norm(x, last_mean, last_var, bn.weight, bn.bias)
    for t in (2, 3, 50):
        torch.testing.assert_close(bn(x, t), expected)
    assert bn.num_batches_tracked.tolist() == [1, 1, 6]


def test_a_sequence_longer_than_max_steps_runs_on_the_last_row():
    torch.manual_seed(0)
    lstm = BNLSTM(3, 4, max_steps=2)
    out, (h, _) = lstm(torch.randn(7, 5, 3))
    assert out.shape == (7, 5, 4) and torch.isfinite(out).all()
    cell = lstm.cells[0]
    for bn in (cell.bn_ih, cell.bn_hh, cell.bn_c):
        assert bn.num_batches_tracked.tolist() == [1, 6]
    lstm.eval()
    # at eval every step from 1 on normalizes with the same (last) row; step 0 has its own
    x, state = torch.randn(5, 3), (torch.randn(5, 4), torch.randn(5, 4))
    with torch.no_grad():
        first, shared, beyond = (cell(x, state, t) for t in (0, 1, 6))
    for a, b in zip(shared, beyond, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(first[0], shared[0])


def test_bad_step_statistics_and_time_steps_are_refused_before_anything_changes():
    from batchnorm.variants.recurrent import recurrent_batch_norm

    x = torch.randn(4, 3)
    means, variances = torch.zeros(2, 3), torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"running_mean and running_var of the same shape, got "
                                         r"\(2, 3\) and \(3, 3\)"):
        recurrent_batch_norm(x, 0, means, variances, training=True)
    with pytest.raises(ValueError, match=r"running_mean of shape \(max_steps, 3\).*got shape "
                                         r"\(3,\)"):
        recurrent_batch_norm(x, 0, torch.zeros(3), torch.ones(3), training=True)
    bn = RecurrentBatchNorm(3, max_steps=2)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for t in (True, 1.0, -1):
        with pytest.raises(ValueError, match="time step t >= 0 .int., got"):
            bn(x, t)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="max_steps >= 1"):
        RecurrentBatchNorm(3, max_steps=0)
