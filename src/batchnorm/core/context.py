"""What surrounds a call: whether a torch.func transform (vmap, grad, jacrev, ...) is active.

Under a transform, tensors may be batched or gradient-tracking wrappers without storage of
their own, even when the input itself is plain: the kernels cannot view them, the classic
autograd Functions cannot carry a vmap rule, and an in-place update may meet a batched operand.
"""

from __future__ import annotations

import torch

# torch versions without the query count as "a transform may be active", the safe answer.
transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None) or (
    lambda: True
)

_functorch = torch._C._functorch
# is_opaque's two questions, for hot paths that ask them inline (a call less each)
is_functorch_wrapped = _functorch.is_functorch_wrapped_tensor
is_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", lambda tensor: False)
# a tensor batched by torch.func.vmap (one value per vmapped member)
is_batched = _functorch.is_batchedtensor


def is_opaque(tensor: torch.Tensor) -> bool:
    """A tensor without memory of its own to read: a torch.func wrapper (batched or
    gradient-tracking) or a batched tensor of the older vmap that ``gradcheck``'s batched
    gradients and ``autograd.grad(..., is_grads_batched=True)`` use."""
    return is_functorch_wrapped(tensor) or is_legacy_batched(tensor)
