"""Test tooling: import torchvision (and timm) for model-zoo tests, or skip the test.

The import itself is the benchmark tooling's (``batchnorm.bench.zoo``, whose docstring says why
torchvision's registry wheel needs operator schemas defined before it imports beside the CPU
build of torch); the library never imports a model zoo. This module adds what tests need on
top: a failed import becomes a skipped test with its reason.
"""

from __future__ import annotations

from types import ModuleType

from batchnorm.bench.zoo import load_timm, load_torchvision

__all__ = ["import_timm", "import_torchvision", "load_timm", "load_torchvision"]


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
