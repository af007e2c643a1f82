"""The NumPy float64 reference as a backend: slow, exact, CPU only. Selected explicitly, for tests
and for checking a result, with ``batchnorm.use_backend("reference")``."""

from __future__ import annotations

import numpy as np
import torch

from batchnorm import reference
from batchnorm.core.layout import accumulation_dtype
from batchnorm.core.running import updated_running_stats  # noqa: F401 - the interface

name = "reference"
supports_mask = True


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).numpy()


def _torch(a: np.ndarray, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=dtype)


def train_forward(x, weight, bias, eps, mask=None):
    y, mean, var = reference.forward_train(_np(x), _np(weight), _np(bias), eps, _mask(mask))
    acc = accumulation_dtype(x.dtype)
    return _torch(y, x, x.dtype), _torch(mean, x, acc), _torch(var, x, acc)


def eval_forward(x, mean, variance, weight, bias, eps):
    y = reference.forward(_np(x), _np(mean), _np(variance), _np(weight), _np(bias), eps)
    return _torch(y, x, x.dtype)


def _grads(x, grads, needs):
    acc = accumulation_dtype(x.dtype)
    dx, dw, db = grads
    return (
        _torch(dx, x, x.dtype) if needs[0] else None,
        _torch(dw, x, acc) if needs[1] else None,
        _torch(db, x, acc) if needs[2] else None,
    )


def _mask(mask: torch.Tensor | None) -> np.ndarray | None:
    return None if mask is None else mask.numpy()


def train_backward(grad_out, x, mean, variance, weight, eps, needs, mask=None):
    grads = reference.backward_train(_np(grad_out), _np(x), _np(weight), eps, _mask(mask))
    return _grads(x, grads, needs)


def eval_backward(grad_out, x, mean, variance, weight, eps, needs):
    grads = reference.backward_eval(
        _np(grad_out), _np(x), _np(mean), _np(variance), _np(weight), eps
    )
    return _grads(x, grads, needs)
