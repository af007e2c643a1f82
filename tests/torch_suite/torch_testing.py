"""Import torch's test helpers (``torch.testing._internal``) without letting them touch the session.

``common_modules`` pulls in ``common_utils``, which at import time freezes torch's backend flags
(``torch.backends.disable_global_flags()``), re-routes ``torch.jit`` script calls through a
profiling wrapper, adds warning filters (through scipy and sympy), and sets an environment
variable (through inductor). Any of those would change how the rest of our test session runs, so
the import happens once, here, inside a snapshot of that state which is put back afterwards.
``tests/torch_suite/test_import_guard.py`` checks that the snapshot is complete enough.

``common_utils`` also imports ``expecttest`` (a torch development dependency, not installed by
``pip install torch``). Where it is missing, a stand-in that provides the two names
``common_utils`` reads at import (``TestCase``, ``ACCEPT``) is placed in ``sys.modules`` for the
duration of the import and removed after; nothing here uses expect-tests.

The argument parsing of ``common_utils`` (``parse_cmd_line_args``) only runs from its
``run_tests()``, which we never call, so pytest's command line is not read.
"""

from __future__ import annotations

import copy
import os
import sys
import types
import unittest
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.backends

# The flag disable_global_flags() clears lives in the namespace of torch/backends/__init__.py,
# which is not the object at sys.modules["torch.backends"] (torch swaps in a wrapper module).
_FLAGS_NAME = "__allow_nonbracketed_mutation_flag"
_BACKENDS_NAMESPACE = torch.backends.disable_global_flags.__globals__


@contextmanager
def preserved_global_state() -> Iterator[None]:
    """Put back every piece of global state an import of torch's test helpers is known to touch
    (and the usual suspects besides: default dtype and device, RNG, grad mode, argv)."""
    saved = {
        "dtype": torch.get_default_dtype(),
        "device": torch.get_default_device(),
        "rng": torch.get_rng_state(),
        "grad": torch.is_grad_enabled(),
        "flags": _BACKENDS_NAMESPACE[_FLAGS_NAME],
        "filters": list(warnings.filters),
        "environ": dict(os.environ),
        "argv": list(sys.argv),
        "script_function_call": torch._C.ScriptFunction.__call__,
        "script_method_call": torch._C.ScriptMethod.__call__,
        "warn_always": torch.is_warn_always_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "swap": torch.__future__.get_swap_module_params_on_conversion(),
        "overwrite": torch.__future__.get_overwrite_module_params_on_conversion(),
        "print_options": copy.copy(vars(torch._tensor_str.PRINT_OPTS)),
    }
    try:
        yield
    finally:
        _restore(saved)


def _restore(saved: dict) -> None:
    # Each setter runs only where the value changed: set_default_device, for one, installs a
    # torch-function mode even when given the device already in use.
    def put_back(name, current, setter):
        if current != saved[name]:
            setter(saved[name])

    put_back("dtype", torch.get_default_dtype(), torch.set_default_dtype)
    put_back("device", torch.get_default_device(), torch.set_default_device)
    if not torch.equal(torch.get_rng_state(), saved["rng"]):
        torch.set_rng_state(saved["rng"])
    put_back("grad", torch.is_grad_enabled(), torch.set_grad_enabled)
    _BACKENDS_NAMESPACE[_FLAGS_NAME] = saved["flags"]
    if warnings.filters != saved["filters"]:
        warnings.filters[:] = saved["filters"]
        warnings._filters_mutated()  # type: ignore[attr-defined]
    for name in set(os.environ) - set(saved["environ"]):
        del os.environ[name]
    for name, value in saved["environ"].items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    if sys.argv != saved["argv"]:
        sys.argv[:] = saved["argv"]
    torch._C.ScriptFunction.__call__ = saved["script_function_call"]
    torch._C.ScriptMethod.__call__ = saved["script_method_call"]
    put_back("warn_always", torch.is_warn_always_enabled(), torch.set_warn_always)
    put_back(
        "deterministic",
        torch.are_deterministic_algorithms_enabled(),
        torch.use_deterministic_algorithms,
    )
    put_back(
        "swap",
        torch.__future__.get_swap_module_params_on_conversion(),
        torch.__future__.set_swap_module_params_on_conversion,
    )
    put_back(
        "overwrite",
        torch.__future__.get_overwrite_module_params_on_conversion(),
        torch.__future__.set_overwrite_module_params_on_conversion,
    )
    vars(torch._tensor_str.PRINT_OPTS).update(saved["print_options"])


@contextmanager
def _expecttest_available() -> Iterator[None]:
    try:
        import expecttest  # noqa: F401

        yield
        return
    except ImportError:
        pass
    stand_in = types.ModuleType("expecttest")
    stand_in.__doc__ = "stand-in for torch's test helpers; see tests/torch_suite/torch_testing.py"
    stand_in.TestCase = unittest.TestCase
    stand_in.ACCEPT = False
    sys.modules["expecttest"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("expecttest") is stand_in:
            del sys.modules["expecttest"]


def _import_helpers():
    with preserved_global_state(), _expecttest_available():
        from torch.testing._internal import common_modules, common_utils

    return common_modules, common_utils


common_modules, common_utils = _import_helpers()

freeze_rng_state = common_utils.freeze_rng_state
gradcheck = common_utils.gradcheck
gradgradcheck = common_utils.gradgradcheck
mock_wrapper = common_utils.mock_wrapper
get_tensors_from = common_utils.get_tensors_from
ModuleErrorEnum = common_modules.ModuleErrorEnum
