"""Scratch memory for the eager path's temporaries on the CPU.

The eager backward needs a product tensor (grad * centred) and the forward a square
(centred * centred) only long enough to reduce them. A fresh allocation of that size is returned
to the operating system when freed and page-faulted back in on the next call; on virtual machines
the faults cost more than the arithmetic (measured: an eager forward of 8x512x28x28 took 8.5 ms
with fresh temporaries and 1.6 ms once memory was reused). So each thread keeps one flat buffer,
grown to the largest temporary seen up to ``LIMIT_BYTES``, and hands out views of it shaped and
strided like the tensor they stand beside.

Only for CPU tensors outside autograd: a view handed out here is overwritten by the next call.
"""

from __future__ import annotations

import threading

import torch

LIMIT_BYTES = 64 << 20
# Below this size a fresh allocation comes from the allocator's free lists without page faults,
# and is cheaper than the bookkeeping here.
MIN_BYTES = 256 << 10
_local = threading.local()


def _dense(t: torch.Tensor) -> bool:
    """Strides that are a permutation of a contiguous layout (contiguous, channels_last, ...)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def scratch_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialized memory with ``t``'s shape, dtype and strides, valid until the next call
    on this thread; a fresh ``empty_like`` where reuse does not apply."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or not MIN_BYTES <= nbytes <= LIMIT_BYTES or not _dense(t):
        return torch.empty_like(t)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(t.dtype)
    if buffer is None or buffer.numel() < t.numel():
        buffer = buffers[t.dtype] = torch.empty(t.numel(), dtype=t.dtype)
    return buffer.as_strided(t.shape, t.stride())
