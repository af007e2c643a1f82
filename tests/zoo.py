"""Test tooling: import torchvision (and timm) for model-zoo tests, or skip the test.

Never imported by the library: only tests and measurement scripts under ``tests/`` use it.

Why this exists. The registry's torchvision wheels are built against the CUDA build of torch.
Beside the CPU build this project installs (``torch==2.13.0+cpu``), torchvision's compiled ops
(``torchvision/_C.so``) cannot load (they link ``libtorch_cuda.so``). torchvision is meant to
survive that: its Python code checks ``extension._has_ops()`` before using them. But at import
it registers fake (meta) implementations for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, and registering an implementation for an operator whose schema was never
defined fails::

    RuntimeError: operator torchvision::nms does not exist

so ``import torchvision`` fails, and with it ``import timm`` (timm imports torchvision). The
model definitions themselves are plain Python and need none of the compiled ops.

The workaround: when, and only when, that import fails for that reason, define the missing
operator schemas (with nms's signature, as torchvision's C++ declares it; no kernel) and import
again. The models then build and train; calling one of the compiled ops (``nms``,
``roi_align``, ...) raises torchvision's own "Couldn't load custom C++ ops" error, as wherever
its extension is missing, never a wrong result. Where the compiled ops do load (a torchvision
built for this torch), the first import succeeds and nothing is defined.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

# The operators torchvision 0.28 registers fake implementations for at import even without its
# compiled extension; nms's schema as torchvision/csrc/ops/nms.cpp declares it, qnms's the same.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Kept alive for the process: a Library that is garbage collected removes its definitions.
_libraries: list[torch.library.Library] = []


def _forget(package: str) -> None:
    """Drop a half-imported package from ``sys.modules`` so the next import starts afresh."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def _missing_operator(error: BaseException) -> str | None:
    """The name of the ``torchvision::`` operator an import error complains about, if any."""
    message = str(error)
    prefix = "operator torchvision::"
    if prefix not in message or "does not exist" not in message:
        return None
    return message.split(prefix, 1)[1].split()[0]


def _define(operator: str) -> None:
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define(_SCHEMAS[operator])
    _libraries.append(library)


def load_torchvision() -> ModuleType:
    """``import torchvision``, defining the operator schemas its import needs when its compiled
    ops cannot load (see the module docstring). Raises ``ImportError`` when torchvision is not
    installed or still cannot be imported."""
    for _ in range(len(_SCHEMAS) + 1):
        try:
            return importlib.import_module("torchvision")
        except RuntimeError as error:
            operator = _missing_operator(error)
            if operator is None or operator not in _SCHEMAS:
                raise ImportError(
                    f"torchvision does not import next to torch {torch.__version__}: {error}"
                ) from error
            _forget("torchvision")
            _define(operator)
    raise ImportError("torchvision did not import after defining its operator schemas")


def load_timm() -> ModuleType:
    """``import timm`` (which imports torchvision) with the same workaround."""
    load_torchvision()
    return importlib.import_module("timm")


def _or_skip(loader, package: str) -> ModuleType:
    import pytest

    try:
        return loader()
    except ImportError as error:
        pytest.skip(f"{package} is not usable here ({error}); `pip install -e '.[zoo]'`")


def import_torchvision() -> ModuleType:
    """torchvision for a test, or skip the test with the reason (like ``pytest.importorskip``)."""
    return _or_skip(load_torchvision, "torchvision")


def import_timm() -> ModuleType:
    """timm for a test, or skip the test with the reason (like ``pytest.importorskip``)."""
    return _or_skip(load_timm, "timm")
