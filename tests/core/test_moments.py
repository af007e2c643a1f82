import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference
from batchnorm.core.moments import batch_moments, merge_many, merge_moments
from tests.conftest import make_input


def test_variance_is_stable_when_mean_dwarfs_spread():
    # mean 1e4, std 1 in float32: E[x^2] - E[x]^2 loses every digit here.
    x = make_input((64, 3, 16, 16), torch.float32, offset=1e4, seed=3)
    mean, var = batch_moments(x)
    ref_mean, ref_var = reference.moments(x.to(torch.float64).numpy())
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-4)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-7)
    naive = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2
    assert not np.allclose(naive.numpy(), ref_var, rtol=1e-4), "the naive formula should fail"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_accumulation_dtype(dtype):
    x = make_input((4, 3, 5), dtype)
    mean, var = batch_moments(x)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == expected


@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=5).filter(lambda s: s[0] >= 1),
    layout=st.sampled_from(["contiguous", "strided", "channels_last"]),
    seed=st.integers(0, 1000),
)
def test_moments_match_reference(shape, layout, seed):
    if layout == "channels_last" and len(shape) not in (4, 5):
        layout = "contiguous"
    x = make_input(shape, torch.float64, layout, seed=seed)
    mean, var = batch_moments(x)
    ref_mean, ref_var = reference.moments(x.numpy())
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-10, atol=1e-12)


def _moments_of(chunk):
    mean, var = reference.moments(chunk)
    count = chunk.shape[0] * int(np.prod(chunk.shape[2:]))
    return count, mean, var * count


@given(
    sizes=st.lists(st.integers(0, 7), min_size=2, max_size=5).filter(lambda s: sum(s) >= 1),
    seed=st.integers(0, 1000),
)
def test_merging_groups_equals_moments_of_the_whole(sizes, seed):
    rng = np.random.default_rng(seed)
    whole = rng.normal(3.0, 2.0, size=(sum(sizes), 4, 3))
    groups = np.split(whole, np.cumsum(sizes)[:-1])
    stats = [_moments_of(g) if g.shape[0] else (0, np.zeros(4), np.zeros(4)) for g in groups]
    counts = torch.tensor([s[0] for s in stats], dtype=torch.float64)
    means = torch.tensor(np.stack([s[1] for s in stats]))
    m2s = torch.tensor(np.stack([s[2] for s in stats]))
    total, mean, m2 = merge_many(counts, means, m2s)
    ref_mean, ref_var = reference.moments(whole)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((m2 / total).numpy(), ref_var, rtol=1e-10)
    # Pairwise merging, one group at a time, gives the same.
    acc = (counts[0], means[0], m2s[0])
    for i in range(1, len(stats)):
        acc = merge_moments(*acc, counts[i], means[i], m2s[i])
    np.testing.assert_allclose(acc[1].numpy(), ref_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((acc[2] / acc[0]).numpy(), ref_var, rtol=1e-10)
