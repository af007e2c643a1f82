import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.core.moments import unbiased
from batchnorm.core.running import updated_running_stats


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0])
def test_update_matches_reference(momentum):
    rng = np.random.default_rng(0)
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2, size=4)
    bm, bv = rng.normal(size=4), rng.uniform(0.5, 2, size=4)
    new_mean, new_var, finite = updated_running_stats(
        torch.tensor(rm), torch.tensor(rv), torch.tensor(bm), unbiased(torch.tensor(bv), 10),
        momentum,
    )
    ref_mean, ref_var = reference.update_running(rm, rv, bm, bv, 10, momentum)
    np.testing.assert_allclose(new_mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(new_var.numpy(), ref_var, rtol=1e-12)
    assert bool(finite)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_statistics_unchanged(bad):
    rm, rv = torch.zeros(3), torch.ones(3)
    bm = torch.tensor([0.5, bad, 0.1])
    new_mean, new_var, finite = updated_running_stats(rm, rv, bm, torch.ones(3), 0.1)
    assert not bool(finite)
    assert torch.equal(new_mean, rm) and torch.equal(new_var, rv)


def test_tensor_momentum_is_accepted():
    new_mean, _, _ = updated_running_stats(
        torch.zeros(2), torch.ones(2), torch.ones(2), torch.ones(2), torch.tensor(0.25)
    )
    torch.testing.assert_close(new_mean, torch.full((2,), 0.25))


def test_count_applies_bessels_factor():
    rm, rv, bm, bv = torch.zeros(3), torch.ones(3), torch.randn(3), torch.rand(3) + 0.5
    with_count = updated_running_stats(rm, rv, bm, bv, 0.3, count=7)
    given_unbiased = updated_running_stats(rm, rv, bm, unbiased(bv, 7), 0.3)
    for a, b in zip(with_count, given_unbiased, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_in_place_writes_into_the_running_tensors(bad):
    """in_place returns the running tensors themselves holding the pure form's result; a
    non-finite batch leaves them as they were."""
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    bm, bv = torch.randn(4), torch.rand(4) + 0.5
    if bad is not None:
        bm[1] = bad
    before = rm.clone(), rv.clone()
    pure = updated_running_stats(rm, rv, bm, bv, 0.2, count=5)
    new_mean, new_var, finite = updated_running_stats(rm, rv, bm, bv, 0.2, count=5, in_place=True)
    assert new_mean is rm and new_var is rv
    assert torch.equal(rm, pure[0]) and torch.equal(rv, pure[1])
    assert bool(finite) == (bad is None)
    if bad is not None:
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
