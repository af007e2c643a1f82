import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import GhostBatchNorm1d, GhostBatchNorm2d
from batchnorm.variants.ghost import ghost_batch_norm


@pytest.mark.parametrize("batch, virtual", [(12, 4), (10, 4), (7, 3), (9, 2)])
def test_each_ghost_is_normalized_by_itself(batch, virtual):
    torch.manual_seed(batch)
    module = GhostBatchNorm2d(3, virtual_batch_size=virtual, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    x = (torch.randn(batch, 3, 2, 2, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    g = torch.randn_like(x)
    y = module(x)
    xr = x.detach().clone().requires_grad_(True)
    w = module.weight.detach().clone().requires_grad_(True)
    b = module.bias.detach().clone().requires_grad_(True)
    chunks = xr.split(virtual)
    expected = torch.cat([F.batch_norm(c, None, None, w, b, training=True) for c in chunks])
    torch.testing.assert_close(y, expected)
    ours = torch.autograd.grad(y, (x, module.weight, module.bias), g)
    ref = torch.autograd.grad(expected, (xr, w, b), g)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r)
    # One update: the whole batch's mean and the count-weighted mean of unbiased ghost variances.
    counts = torch.tensor([c.shape[0] * 4 for c in chunks], dtype=torch.float64)
    means = torch.stack([c.detach().mean((0, 2, 3)) for c in chunks])
    variances = torch.stack([c.detach().var((0, 2, 3), unbiased=True) for c in chunks])
    pooled_mean = (counts[:, None] * means).sum(0) / counts.sum()
    pooled_var = (counts[:, None] * variances).sum(0) / counts.sum()
    torch.testing.assert_close(module.running_mean, 0.3 * pooled_mean)
    torch.testing.assert_close(module.running_var, 0.7 + 0.3 * pooled_var)
    assert int(module.num_batches_tracked) == 1


@pytest.mark.parametrize("virtual", [8, 100])
def test_one_ghost_is_batch_norm(virtual):
    ghost = GhostBatchNorm1d(3, virtual_batch_size=virtual)
    plain = batchnorm.BatchNorm1d(3)
    for _ in range(3):
        x = torch.randn(8, 3, 4)
        assert torch.equal(ghost(x), plain(x))
    for key, value in plain.state_dict().items():
        assert torch.equal(ghost.state_dict()[key], value)
    ghost.eval()
    plain.eval()
    x = torch.randn(3, 3, 4)
    assert torch.equal(ghost(x), plain(x))


def test_a_ghost_of_one_value_is_the_core_error_and_changes_nothing():
    module = GhostBatchNorm1d(3, virtual_batch_size=4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"ghost batch of 1.*more than 1 value per channel"):
        module(torch.randn(9, 3))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])


def test_functional_and_bad_virtual_size():
    rm, rv = torch.zeros(2), torch.ones(2)
    x = torch.randn(8, 2)
    y = ghost_batch_norm(x, rm, rv, training=True, virtual_batch_size=4)
    torch.testing.assert_close(y[:4], F.batch_norm(x[:4], None, None, training=True))
    assert not torch.equal(rm, torch.zeros(2))
    with pytest.raises(ValueError, match="positive integer virtual_batch_size"):
        GhostBatchNorm1d(2, virtual_batch_size=0)


@pytest.mark.parametrize("training, batch", [(True, 12), (True, 3), (False, 12)])
@pytest.mark.parametrize("form", ["module", "functional"])
def test_arguments_are_validated_once_per_call(validations, training, batch, form):
    x = torch.randn(batch, 3)  # 12: three ghosts of 4; 3: one ghost
    if form == "module":
        GhostBatchNorm1d(3, virtual_batch_size=4).train(training)(x)
    else:
        ghost_batch_norm(x, torch.zeros(3), torch.ones(3), training=training,
                         virtual_batch_size=4)
    assert len(validations) == 1, validations


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("form", ["module", "functional"])
def test_a_bad_buffer_is_named_before_anything_changes(training, form):
    module = GhostBatchNorm1d(3, virtual_batch_size=4).train(training)
    module.running_var = torch.ones(2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(12, 3)
    with pytest.raises(ValueError, match=r"running_var of shape \(3,\).*got shape \(2,\)"):
        if form == "module":
            module(x)
        else:
            ghost_batch_norm(x, module.running_mean, module.running_var, training=training,
                             virtual_batch_size=4)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
