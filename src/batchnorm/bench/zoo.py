"""Benchmark tooling: import torchvision and timm for the whole-model benchmarks.

Only the benchmarks (``batchnorm.bench``) and the tests (``tests/zoo.py``, which turns a failed
import into a skipped test) use this module; the layers, variants and the lab never import a
model zoo.

Why it is needed. The registry's torchvision wheels are built against the CUDA build of torch.
Beside the CPU build this project installs, torchvision's compiled ops (``torchvision/_C.so``)
cannot load; torchvision's Python code checks for them before use, but at import it registers
fake implementations for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and
registering an implementation for an operator whose schema was never defined fails with
``RuntimeError: operator torchvision::nms does not exist``. ``import timm`` fails with it.

The workaround: when, and only when, the import fails for that reason, define the missing
operator schemas (nms's signature, as torchvision's C++ declares it; no kernel) and import
again. The model definitions are plain Python and need none of the compiled ops; calling one
of those ops still raises torchvision's own "Couldn't load custom C++ ops" error. Where the
compiled ops load, the first import succeeds and nothing is defined.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

# The operators torchvision registers fake implementations for at import even without its
# compiled extension; nms's schema as torchvision/csrc/ops/nms.cpp declares it, qnms's the same.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Kept alive for the process: a Library that is garbage collected removes its definitions.
_libraries: list[torch.library.Library] = []


def _missing_operator(error: BaseException) -> str | None:
    """The ``torchvision::`` operator an import error says does not exist, if any."""
    message = str(error)
    prefix = "operator torchvision::"
    if prefix not in message or "does not exist" not in message:
        return None
    return message.split(prefix, 1)[1].split()[0]


def load_torchvision() -> ModuleType:
    """``import torchvision``, defining the operator schemas its import needs when its compiled
    ops cannot load. Raises ``ImportError`` when torchvision is missing or still fails."""
    for _ in range(len(_SCHEMAS) + 1):
        try:
            return importlib.import_module("torchvision")
        except RuntimeError as error:
            operator = _missing_operator(error)
            if operator not in _SCHEMAS:
                raise ImportError(
                    f"torchvision does not import next to torch {torch.__version__}: {error}"
                ) from error
            for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
                del sys.modules[name]  # a half-imported package: the next import starts afresh
            library = torch.library.Library("torchvision", "FRAGMENT")
            library.define(_SCHEMAS[operator])
            _libraries.append(library)
    raise ImportError("torchvision did not import after defining its operator schemas")


def load_timm() -> ModuleType:
    """``import timm`` (which imports torchvision) with the same workaround."""
    load_torchvision()
    return importlib.import_module("timm")
