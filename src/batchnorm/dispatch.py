"""The one place that decides which backend computes a batch norm.

Modules and functions never pick a kernel themselves: they call :func:`select_backend` with the
input, and the choice depends on the device, dtype and layout of that input, on which backends
are available in this installation, and on an explicit override:

- ``with batchnorm.use_backend("reference"):`` forces a backend inside the block (tests use it to
  run the same checks on every path);
- the environment variable ``BATCHNORM_BACKEND`` sets the default override for a process.

Backends are modules (or objects) with ``name``, ``supports(x)``, ``train_forward``,
``eval_forward``, ``train_backward``, ``eval_backward`` and ``updated_running_stats``
(the core's, or a faster twin); see ``batchnorm.backends.eager`` for
the signatures. A backend may also offer ``train_forward_update(x, weight, bias, eps,
running_mean, running_var, momentum, count)``, the training forward and the in-place running
update in one call, returning ``(y, mean, variance, finite)``: a training step then makes one
backend call instead of two (``batchnorm.autograd.apply_train_update``).

The common calls of a module (an eval forward, a training step) ask :func:`common_backend`
instead, which answers for the CPU kernels in a few questions; their ``eval_common`` and
``train_common`` then accept the tensors whole or decline, and a declined call comes back to
:func:`select_backend` through the general path (``batchnorm.functional.normalize_common`` and
``train_common``; the fused layers of ``batchnorm.modules.norm_act`` ask the same questions
through ``batchnorm.functional.common_step``, their activation included). The backward of an
accepted step runs on the same backend's ``backward_common``, which asks only about the
incoming gradient. Inside a model each question costs microseconds (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Protocol

import torch

from batchnorm.backends import eager, reference, traceable
from batchnorm.core.context import transforms_active


class Backend(Protocol):
    name: str

    def supports(self, x: torch.Tensor) -> bool: ...
    def train_forward(self, x, weight, bias, eps): ...
    def eval_forward(self, x, mean, variance, weight, bias, eps): ...
    def train_backward(self, grad_out, x, mean, variance, weight, eps, needs): ...
    def eval_backward(self, grad_out, x, mean, variance, weight, eps, needs): ...
    def updated_running_stats(self, running_mean, running_var, batch_mean, batch_var, momentum,
                              count=None, in_place=False): ...


_BACKENDS: dict[str, Backend | ModuleType] = {"eager": eager, "reference": reference}
# Automatic choice, in order of preference; the first that supports the input runs.
_PREFERENCE: list[str] = ["eager"]
_override: str | None = os.environ.get("BATCHNORM_BACKEND") or None


def register_backend(backend: Backend | ModuleType, *, preferred: bool = False) -> None:
    """Make a backend selectable by name; ``preferred`` puts it first in the automatic choice."""
    _BACKENDS[backend.name] = backend
    if preferred and backend.name not in _PREFERENCE:
        _PREFERENCE.insert(0, backend.name)


# The Triton kernels, preferred for the CUDA inputs they support. Registered before the CPU
# kernels, which so come first for CPU inputs (Triton takes those only under its interpreter,
# TRITON_INTERPRET=1). Without the triton package the import fails; Triton itself is imported at
# the first CUDA input, and a failure there (or a Triton older than 3.4) makes the backend
# decline every input. Either way the eager path serves.
try:
    from batchnorm.backends import triton as _triton_kernels
except Exception:  # noqa: BLE001 - any failure to load the kernels means "not available"
    _triton_kernels = None
else:
    register_backend(_triton_kernels, preferred=True)

# The Numba CPU kernels, preferred for the CPU inputs they support. Without a working Numba the
# import fails and the eager path serves every input.
try:
    from batchnorm.backends import cpu as _cpu_kernels
except Exception:  # noqa: BLE001 - any failure to load the kernels means "not available"
    _cpu_kernels = None
else:
    register_backend(_cpu_kernels, preferred=True)


def unregister_backend(name: str) -> None:
    """Remove a backend ``register_backend`` added (the benchmark's and tests' stand-ins)."""
    _BACKENDS.pop(name, None)
    if name in _PREFERENCE:
        _PREFERENCE.remove(name)


def available_backends() -> list[str]:
    return list(_BACKENDS)


def select_backend(x: torch.Tensor, mask: torch.Tensor | None = None) -> Backend | ModuleType:
    """The backend that will compute a batch norm of ``x`` (with statistics restricted to
    ``mask``, when given: only backends with ``supports_mask`` take one, else eager).

    While a graph is captured (``torch.export``, the ONNX exporter, ``torch.jit.trace``) the
    traceable backend, whose operations the graph can record (the kernels run outside torch)."""
    if traceable.capturing():
        return traceable
    if mask is not None:
        forced = _BACKENDS.get(_override) if _override is not None else None
        if forced is not None and getattr(forced, "supports_mask", False):
            return forced
        return eager
    if _override is not None:
        backend = _BACKENDS.get(_override)
        if backend is None:
            raise ValueError(
                f"unknown batch norm backend {_override!r}; available: {available_backends()}"
            )
        if not backend.supports(x):
            raise ValueError(
                f"backend {_override!r} does not support input on {x.device} with dtype "
                f"{x.dtype} and shape {tuple(x.shape)}"
            )
        return backend
    for name in _PREFERENCE:
        backend = _BACKENDS[name]
        if backend.supports(x):
            return backend
    return eager


def common_backend(x: torch.Tensor) -> Backend | ModuleType | None:
    """The backend :func:`select_backend` would choose for the common call, where the answer
    is quick to give (``batchnorm.functional.normalize_common``): the CPU kernels for a CPU
    input while no override chooses, no graph is captured and no torch.func transform is active
    (the caller has asked torch.compile's question first). None: ask :func:`select_backend`.

    The kernels' own acceptance (``eval_common``) asks the rest of ``supports``: dtype, layout,
    values, and whether the input has memory of its own."""
    if (
        _override is None
        and _cpu_kernels is not None
        and x.is_cpu
        and not traceable.capturing()
        and not transforms_active()
    ):
        return _cpu_kernels
    return None


def running_stats_updater(x: torch.Tensor, mask: torch.Tensor | None = None):
    """The running-statistics update of the backend chosen for ``x`` (for variants that
    normalize in their own way and then update as plain batch norm does)."""
    return select_backend(x, mask).updated_running_stats


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside a ``with`` block (``None`` restores the automatic choice)."""
    global _override
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown batch norm backend {name!r}; available: {available_backends()}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous
