"""Fixtures shared by the variants' tests."""

from __future__ import annotations

import sys

import pytest

import batchnorm.functional


@pytest.fixture
def validations(monkeypatch) -> list[str]:
    """Records each ``validate_arguments`` call (its ``owner``), wherever the package imported
    the function, so a test can count how often one call validates."""
    calls: list[str] = []
    original = batchnorm.functional.validate_arguments

    def counted(*args, **kwargs):
        calls.append(args[8])
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("batchnorm") and getattr(module, "validate_arguments", None) is original:
            monkeypatch.setattr(module, "validate_arguments", counted)
    return calls
