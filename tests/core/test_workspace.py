import torch

from batchnorm.core import workspace
from batchnorm.core.workspace import scratch_like


def test_scratch_matches_layout_and_is_reused(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    x = torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    first = scratch_like(x)
    assert first.shape == x.shape and first.stride() == x.stride() and first.dtype == x.dtype
    second = scratch_like(torch.randn(2, 6, 5, 3))
    assert second.data_ptr() == first.data_ptr(), "the same memory serves the next call"
    assert second.is_contiguous()
    assert scratch_like(torch.randn(3, 3, dtype=torch.float64)).dtype == torch.float64


def test_strided_views_and_large_tensors_get_fresh_memory(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    base = torch.randn(4, 6, 10)
    view = base[..., ::2]
    assert scratch_like(view).data_ptr() != scratch_like(torch.randn(4, 6, 5)).data_ptr()
    monkeypatch.setattr(workspace, "LIMIT_BYTES", 16)
    big = torch.randn(10)
    assert scratch_like(big).data_ptr() != scratch_like(big).data_ptr()


def test_small_tensors_get_fresh_memory():
    small = torch.randn(8, 8)
    assert small.numel() * small.element_size() < workspace.MIN_BYTES
    first, second = scratch_like(small), scratch_like(small)  # both alive: not shared
    assert first.data_ptr() != second.data_ptr()
    assert first.shape == small.shape and first.dtype == small.dtype
