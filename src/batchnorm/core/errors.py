"""The exceptions the package raises for bad input.

Our messages name what was expected and what came; the classes keep both worlds working: a
:class:`BatchNormValueError` is a ``ValueError`` (our documented contract) and also a
``RuntimeError`` (what ``torch.nn.functional.batch_norm`` raises for a mis-sized buffer, a tensor
on another device or an unsupported dtype), so ``except RuntimeError`` written for torch still
catches it. :class:`BatchNormTypeError` is likewise a ``TypeError`` and a ``RuntimeError``.
"""

from __future__ import annotations


class BatchNormValueError(ValueError, RuntimeError):
    """A value, shape or device that batch norm cannot take (catchable as ValueError or
    RuntimeError)."""


class BatchNormTypeError(TypeError, RuntimeError):
    """A type or dtype that batch norm cannot take (catchable as TypeError or RuntimeError)."""
