"""The ModuleInfo entries of torch's batch norms, each input as a case that builds OUR module.

A :class:`Case` is one ``ModuleInput`` of one entry: the entry is torch's own (its generators
are called with it, since ``module_error_inputs_func`` picks shapes by comparing
``module_info.module_cls`` with torch's classes), and the module under test is ours.
Inputs are generated afresh in each test, with the requested dtype, mode and requires_grad,
exactly as upstream calls the generators.

:func:`upstream_marks` turns the entry's skips and decorators that are active for a test on the
CPU into pytest marks, so an upstream ``unittest.skip`` or ``expectedFailure`` carries over.
"""

from __future__ import annotations

import types
import unittest
from dataclasses import dataclass

import pytest
import torch

import batchnorm
from tests.torch_suite.torch_testing import common_modules

OURS = {
    torch.nn.BatchNorm1d: batchnorm.BatchNorm1d,
    torch.nn.BatchNorm2d: batchnorm.BatchNorm2d,
    torch.nn.BatchNorm3d: batchnorm.BatchNorm3d,
}

ENTRIES = [info for info in common_modules.module_db if info.module_cls in OURS]
assert [info.module_cls for info in ENTRIES] == list(OURS), "module_db lost a batch norm entry"

DEVICE = "cpu"
MODES = {"train": True, "eval": False}


@dataclass(frozen=True)
class Case:
    info: common_modules.ModuleInfo  # torch's entry, unchanged
    index: int  # position in what module_inputs_func returns
    desc: str

    @property
    def torch_cls(self) -> type[torch.nn.Module]:
        return self.info.module_cls

    @property
    def our_cls(self) -> type[torch.nn.Module]:
        return OURS[self.info.module_cls]

    @property
    def name(self) -> str:
        return self.torch_cls.__name__

    @property
    def id(self) -> str:
        return f"{self.name}-{self.desc}"

    def module_input(self, dtype, training, requires_grad=False, device=DEVICE):
        inputs = self.info.module_inputs_func(
            self.info, device=device, dtype=dtype, requires_grad=requires_grad, training=training
        )
        chosen = inputs[self.index]
        assert (chosen.desc or "default") == self.desc, "the entry's inputs changed order"
        return chosen

    def build(self, module_input, dtype, training, cls=None) -> torch.nn.Module:
        """Our module (or ``cls``) from the input's constructor arguments, as upstream builds it:
        constructed, then ``.to(device).to(dtype)``, then ``.train(training)``."""
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        module = (cls or self.our_cls)(*args, **kwargs)
        module.to(DEVICE).to(dtype)
        module.train(training)
        return module


def _cases() -> list[Case]:
    cases = []
    for info in ENTRIES:
        inputs = info.module_inputs_func(
            info, device=DEVICE, dtype=torch.float32, requires_grad=False, training=True
        )
        names = [module_input.desc or "default" for module_input in inputs]
        assert len(set(names)) == len(names), f"duplicate input names in {info.name}: {names}"
        cases += [Case(info, index, name) for index, name in enumerate(names)]
    return cases


CASES = _cases()


@dataclass(frozen=True)
class ErrorCase:
    info: common_modules.ModuleInfo
    index: int
    desc: str

    @property
    def name(self) -> str:
        return self.info.module_cls.__name__

    @property
    def our_cls(self):
        return OURS[self.info.module_cls]

    def error_input(self, dtype):
        # upstream passes its training flag here, but the generator ignores it (and so does the
        # test: the module is used in the training mode it is constructed in)
        inputs = self.info.module_error_inputs_func(
            self.info, device=DEVICE, dtype=dtype, requires_grad=False, training=True
        )
        return inputs[self.index]


def _describe_error_input(error_input) -> str:
    constructor = error_input.module_error_input.constructor_input
    parts = [repr(a) for a in constructor.args[1:]]
    parts += [f"{key}={value!r}" for key, value in constructor.kwargs.items()]
    return ",".join(parts) or "default"


def _error_cases() -> list[ErrorCase]:
    cases = []
    for info in ENTRIES:
        if info.module_error_inputs_func is None:
            continue
        inputs = info.module_error_inputs_func(
            info, device=DEVICE, dtype=torch.float32, requires_grad=False, training=True
        )
        cases += [
            ErrorCase(info, index, _describe_error_input(error_input))
            for index, error_input in enumerate(inputs)
        ]
    return cases


ERROR_CASES = _error_cases()


class _ProbeRan(Exception):
    """Raised by the probe test body: tells whether a decorator let the body run."""


def upstream_marks(info, test_class: str, test_name: str, dtype, training) -> list:
    """The entry's skips/decorators active for this CPU test, as pytest marks.

    Each active decorator is applied to a probe body that raises :class:`_ProbeRan`, and the
    result is called the way torch's device-generic tests call it (``self.device_type ==
    "cpu"``): a ``SkipTest`` is a skip, a swallowed failure is an expected failure, the probe's
    own exception coming through means the decorator does nothing on the CPU.
    """
    marks = []
    decorators = info.get_decorators(test_class, test_name, DEVICE, dtype, {"training": training})
    for decorator in decorators:

        def probe(self, *args, **kwargs):
            raise _ProbeRan

        wrapped = decorator(probe)
        if getattr(wrapped, "__unittest_skip__", False):
            marks.append(pytest.mark.skip(reason=f"upstream: {wrapped.__unittest_skip_why__}"))
            continue
        if getattr(wrapped, "__unittest_expecting_failure__", False):
            marks.append(pytest.mark.xfail(strict=True, reason="upstream: expectedFailure"))
            continue
        fake_test = types.SimpleNamespace(device_type=DEVICE, device=DEVICE, dtype=dtype)
        fake_test.fail = lambda message: (_ for _ in ()).throw(AssertionError(message))
        try:
            wrapped(fake_test, dtype=dtype)
        except _ProbeRan:
            continue  # inactive on the CPU
        except unittest.SkipTest as skip:
            marks.append(pytest.mark.skip(reason=f"upstream: {skip}"))
            continue
        marks.append(pytest.mark.xfail(strict=True, reason="upstream: expected failure on CPU"))
    return marks


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def module_params(
    test_name: str,
    dtypes=None,
    modes=("train", "eval"),
    test_class: str = "TestModule",
    extra: dict | None = None,
) -> list:
    """``pytest.param(case, dtype, training[, extra...])`` for every case, with upstream's marks.

    ``dtypes`` defaults to the entry's own (``floating_types()``: float32 and float64).
    ``extra`` maps a name to its values; each value adds a parameter after ``training``.
    """
    extra = extra or {}
    params = []
    for case in CASES:
        for dtype in dtypes or case.info.dtypes:
            for mode in modes:
                training = MODES[mode]
                combos = [()]
                for name, values in extra.items():
                    combos = [(*c, (name, v)) for c in combos for v in values]
                for combo in combos:
                    suffix = "".join(f"-{name}={value}" for name, value in combo)
                    params.append(
                        pytest.param(
                            case,
                            dtype,
                            training,
                            *(value for _, value in combo),
                            id=f"{case.id}-{dtype_name(dtype)}-{mode}{suffix}",
                            marks=upstream_marks(
                                case.info, test_class, test_name, dtype, training
                            ),
                        )
                    )
    return params
