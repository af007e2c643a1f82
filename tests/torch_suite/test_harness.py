"""Checks of the harness itself: the guarded import, the upstream marks, the differences list."""

from __future__ import annotations

import json
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
import torch

from tests.torch_suite.cases import CASES, ENTRIES, ERROR_CASES, upstream_marks
from tests.torch_suite.conftest import COLLECTED
from tests.torch_suite.differences import DELIBERATE, matches
from tests.torch_suite.torch_testing import common_modules

REPO = Path(__file__).resolve().parents[2]

# Prints the state torch's test helpers are known to change, before and after importing them
# through the guard, in a fresh interpreter (pytest's own state is not what is being checked).
_PROBE = r"""
import json, os, sys, warnings
import torch, torch.backends
def state():
    return {
        "dtype": str(torch.get_default_dtype()),
        "device": str(torch.get_default_device()),
        "rng": torch.get_rng_state().tolist()[:64],
        "flags_frozen": torch.backends.flags_frozen(),
        "filters": [repr(f) for f in warnings.filters],
        "environ": dict(os.environ),
        "argv": sys.argv,
        "script_call": repr(torch._C.ScriptFunction.__call__),
        "method_call": repr(torch._C.ScriptMethod.__call__),
        "warn_always": torch.is_warn_always_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "swap": torch.__future__.get_swap_module_params_on_conversion(),
        "function_modes": torch._C._len_torch_function_stack(),
        "expecttest_loaded": "expecttest" in sys.modules,
    }
before = state()
import tests.torch_suite.torch_testing
print(json.dumps({"before": before, "after": state()}))
"""


def test_known_effects_of_torch_helpers_are_undone():
    """The cheap check, in this process: what common_utils is known to change at import."""
    from torch.testing._internal import common_utils

    assert not torch.backends.flags_frozen()
    assert torch._C.ScriptFunction.__call__ is not common_utils.prof_func_call
    assert torch._C.ScriptMethod.__call__ is not common_utils.prof_meth_call
    module = sys.modules.get("expecttest")
    assert module is None or "stand-in" not in (module.__doc__ or "")


@pytest.mark.slow  # a fresh interpreter importing torch and its test helpers: 5-10 s
def test_importing_torch_helpers_leaves_global_state_alone():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, "--an-argument-for-torch-to-ignore"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    states = json.loads(result.stdout.strip().splitlines()[-1])
    changed = sorted(k for k in states["before"] if states["before"][k] != states["after"][k])
    assert not changed, f"importing torch's test helpers changed: {changed}"


def test_every_entry_and_input_is_covered():
    assert {info.module_cls for info in ENTRIES} == {
        torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d
    }
    for info in ENTRIES:
        expected = info.module_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        assert len([case for case in CASES if case.info is info]) == len(expected)
        errors = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        assert len([case for case in ERROR_CASES if case.info is info]) == len(errors)


def test_upstream_decorators_become_marks():
    """A skip or expected failure active on the CPU carries over; one for MPS does not."""
    DecorateInfo = common_modules.DecorateInfo
    from torch.testing._internal.common_device_type import expectedFailureMPS, skipMPS

    info = common_modules.ModuleInfo(
        torch.nn.BatchNorm2d,
        module_inputs_func=common_modules.module_inputs_torch_nn_BatchNorm2d,
        skips=(
            DecorateInfo(unittest.skip("because"), "TestModule", "test_forward"),
            DecorateInfo(unittest.expectedFailure, "TestModule", "test_repr"),
            DecorateInfo(expectedFailureMPS, "TestModule", "test_save_load"),
            DecorateInfo(skipMPS),
        ),
    )

    def kinds(test_name):
        return [mark.name for mark in upstream_marks(info, "TestModule", test_name, None, True)]

    assert kinds("test_forward") == ["skip"]
    assert kinds("test_repr") == ["xfail"]
    assert kinds("test_save_load") == []
    assert kinds("test_grad") == []


def test_differences_name_collected_tests(request):
    """Each entry of the list matches a test (checked when the whole suite was collected)."""
    collected = request.config.stash.get(COLLECTED, [])
    files = {Path(path).name for path, _ in collected}
    suite = {path.name for path in Path(__file__).parent.glob("test_*.py")}
    if files != suite:
        pytest.skip("only part of tests/torch_suite was collected")
    names = [name for _, name in collected]
    stale = [pattern for pattern in DELIBERATE if not any(matches(n, pattern) for n in names)]
    assert not stale, f"differences.DELIBERATE entries that match no test: {stale}"
