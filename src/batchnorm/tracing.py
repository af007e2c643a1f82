"""How our modules meet the tools that read a model without running it as Python: ``torch.fx``
symbolic tracing and ``torch.jit.script``.

``torch.fx``. Symbolic tracing calls each module's forward with a ``Proxy`` in place of the input,
except for leaf modules, which it records as one ``call_module`` node; by default only the
classes defined under ``torch.nn`` are leaves. Our forwards check their input (a ``Proxy`` is no
tensor) and run kernels fx cannot see, so they cannot be traced through. A module of ours that
receives a ``Proxy`` hands it to :func:`record_as_leaf`, which records the call as fx records
``torch.nn.BatchNorm2d``: one ``call_module`` node. The resulting ``GraphModule`` calls our module
itself, so its train/eval switch, its running statistics and our kernels all work as before,
and passes built on fx (FX quantization's ``prepare_fx``, fx-based feature extractors) see the
batch norm as one opaque layer, as they see any module they do not know.

``torch.jit.script`` compiles a module's forward from its Python source, which must be in the
TorchScript subset; ours is not (keyword expansion, the Numba kernels, ``isinstance`` on
arbitrary objects). :class:`RefusesScripting` makes ``torch.jit.script`` stop at once with an
error that names what works instead, rather than deep inside the compiler.
"""

from __future__ import annotations

import torch
import torch.fx

from batchnorm.core.errors import BatchNormTypeError

_Proxy = torch.fx.Proxy


def is_proxy(value: object) -> bool:
    """Whether ``value`` is the stand-in fx symbolic tracing passes instead of a tensor."""
    return isinstance(value, _Proxy)


def record_as_leaf(module: torch.nn.Module, *args, **kwargs) -> torch.fx.Proxy:
    """Record ``module(*args, **kwargs)`` as one ``call_module`` node in the graph fx is
    tracing (at least one argument is a ``Proxy``), and return the node's ``Proxy``."""
    proxy = next(a for a in (*args, *kwargs.values()) if isinstance(a, _Proxy))
    tracer = proxy.tracer
    try:
        path = tracer.path_of_module(module)
    except NameError:
        path = ""
    if not path:  # fx records a call by the module's path under the traced root
        raise BatchNormTypeError(
            f"{type(module).__name__}: torch.fx can record this module only as a part of the "
            "model it traces (a call of the module at its path in that model); it is the traced "
            "root here, or not inside the root. Trace the model that holds it"
        )
    return tracer.create_proxy("call_module", path, args, kwargs)


class RefusesScripting:
    """Mixin for our modules: ``torch.jit.script`` on them (or on a model that holds them)
    raises a clear error that names the ways that work."""

    def __prepare_scriptable__(self):
        name = type(self).__name__
        raise BatchNormTypeError(
            f"{name}: torch.jit.script cannot compile this module: its forward is Python outside "
            "the TorchScript subset (keyword expansion, Numba kernels). Use torch.export.export("
            "model, args) or torch.compile(model), which take it in training and eval; "
            "torch.jit.trace(model, example) records it as TorchScript; or "
            "batchnorm.convert(model, to='torch') first, for torch's own classes"
        )
