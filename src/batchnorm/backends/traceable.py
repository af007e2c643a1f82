r"""The form of batch norm that graph capture records: ``torch.export`` (and the ONNX exporter
built on it) and ``torch.jit.trace``.

Capture records the tensor operations a forward performs. The other backends cannot be recorded:
the CPU and Triton kernels run outside torch (the tracer sees no operation, or cannot hand the
kernel a tensor at all), and the autograd Functions are inlined by ``torch.export`` without their
backward, so a captured training step would hold operations autograd cannot differentiate. Here
every operation is an ordinary, differentiable torch operation:

- training (batch statistics): the eager path's math, the same two-pass centred moments of
  ``batchnorm.core.moments`` and the same normalization, in its out-of-place form, so autograd
  differentiates the captured graph; the running statistics are updated by ``batchnorm.core``'s
  protected update (``torch.where`` on the finiteness of the batch, no host synchronisation);
- eval (given statistics): torch's inference batch-norm operator,
  :math:`y = (x - \hat\mu)\,\gamma / \sqrt{\hat\sigma^2 + \epsilon} + \beta`, the same affine
  map. Exporters and runtimes know that operator: the ONNX exporter writes one
  ``BatchNormalization`` node and folds it into the convolution before it, as it does for
  ``torch.nn.BatchNorm2d``; spelled out as a multiply and an add it would stay two nodes.

``batchnorm.functional`` selects this backend whenever :func:`capturing` is true.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from batchnorm.backends import eager
from batchnorm.core.running import updated_running_stats  # noqa: F401 - the interface

name = "traceable"
supports_mask = True

# Asked on every call of every batch norm: the flag behind torch.compiler.is_exporting() and
# the C query behind torch.jit.is_tracing() cost 0.17 us together, the two public functions
# 0.5 us (2-core EPYC, timeit). A torch without them gets the public functions.
_compiler = torch.compiler
_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)
if not hasattr(_compiler, "_is_exporting_flag"):
    _compiler = type("_Flag", (), {"_is_exporting_flag": property(
        lambda self: torch.compiler.is_exporting())})()


# Dynamo cannot call the C query; it runs this function once while it traces and keeps the
# answer (False under torch.compile, True under torch.export's strict mode). In eager the
# decorator only marks the function.
@torch.compiler.assume_constant_result
def capturing() -> bool:
    """Whether the running forward is being recorded into a graph by ``torch.export`` (the ONNX
    exporter included) or ``torch.jit.trace``. (``torch.compile`` is not capture in this sense:
    Dynamo traces the autograd Functions with their backward.)"""
    return _compiler._is_exporting_flag or _is_tracing()


def supports(x: torch.Tensor) -> bool:
    return True


def train_forward(x, weight, bias, eps, mask=None):
    # The core picks in-place forms when gradients are off; a graph recorded with them fails
    # when it is later run with parameters that require grad. Grad mode decides only which
    # forms run: no tracer records it (and torch.export, which does, records nothing when it is
    # already on).
    with torch.enable_grad():
        return eager.train_forward(x, weight, bias, eps, mask)


def _for_operator(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Per-channel tensors in a dtype torch's operator takes with ``x``: its own, or float32
    beside a half-precision input (the operator accumulates those in float32 itself)."""
    if t is None or t.dtype == x.dtype:
        return t
    if x.dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32:
        return t
    return t.to(x.dtype)


def eval_forward(x, mean, variance, weight, bias, eps):
    return F.batch_norm(
        x, _for_operator(mean, x), _for_operator(variance, x), _for_operator(weight, x),
        _for_operator(bias, x), training=False, momentum=0.0, eps=eps,
    )


train_backward = eager.train_backward
eval_backward = eager.eval_backward
