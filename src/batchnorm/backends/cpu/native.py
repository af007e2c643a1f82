"""The compiled call path of the CPU backend: a module's common call (training step with its
running-statistics update, inference forward, and the training step's backward) from the tensor
checks to the kernel in C++ (``native.cpp``), calling the Numba kernels through C functions
(``kernels.c_entry_points``).

Why: inside a model each batch norm runs between convolutions, with caches they filled, and
there the Python between a module's ``forward`` and its kernel (the checks, the autograd
Function, the dispatcher of the Numba call) cost several microseconds a call more than torch's
C++ path, and the backward, a Python function, about twice torch's whole backward on small
layers (BENCHMARKS.md, "Since adcfbf2"). Here the checks are C++, the training step's backward
is a C++ autograd node, and the kernels are called by address. The arithmetic is the same
kernels' with the same blocks, so the results are bit for bit those of the Python path. A call
on several blocks is launched by torch's ``at::parallel_for``, each thread running the kernels
serially on its share, rather than by Numba's parallel loops (BENCHMARKS.md, "Since 6d11ea9").

What it takes: float32 and float64 inputs of the common form (see ``native.cpp``), after the
first call of the process has started Numba's thread pool through the Python path. Everything
else (other dtypes and layouts, double backward, batched gradients, transforms) takes the Python
path, which the compiled one declines to, having changed nothing; so does every call where the
extension is not built.

Building: ``batchnorm compile`` (which ``make setup`` runs) compiles the extension with torch's
C++ extension tools (a C++ compiler and ninja), next to this file or, where that folder is
read-only, in the user's cache folder; it is never compiled implicitly by a call. An extension
built for another source, torch or Python is not loaded. ``BATCHNORM_NATIVE=0`` in the
environment turns the compiled path off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

SOURCE = pathlib.Path(__file__).with_name("native.cpp")
# -fopenmp: at::parallel_for is inline OpenMP, so without it a parallel call ran on one thread;
# the extension then needs libgomp.so.1, which resolves to the runtime torch loaded first (its
# thread pool: see native.cpp)
_FLAGS = ("-O3", "-fopenmp")

def module_name() -> str:
    """The extension's module name: it changes with the source, torch, Python and the flags,
    so a stale build is never loaded."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    for part in (torch.__version__, sys.version, *_FLAGS):
        digest.update(part.encode())
    return f"batchnorm_native_{digest.hexdigest()[:16]}"


def _folders() -> list[pathlib.Path]:
    """Where a build may live: next to this file, then the user's cache folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [SOURCE.parent / "__native__", pathlib.Path(cache) / "batchnorm" / "native"]


def _library(folder: pathlib.Path, name: str) -> pathlib.Path:
    return folder / name / f"{name}.so"


def built() -> pathlib.Path | None:
    """The built extension for this source, torch and Python, or None."""
    name = module_name()
    for folder in _folders():
        path = _library(folder, name)
        if path.is_file():
            return path
    return None


def build(verbose: bool = False) -> pathlib.Path:
    """Compile the extension (a minute or so) unless it is built; returns its path. Raises
    ``RuntimeError`` naming the cause where it cannot be built here (no compiler, no ninja, no
    writable folder)."""
    path = built()
    if path is not None:
        return path
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = module_name()
    unwritable = []
    for folder in _folders():
        target = folder / name
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            unwritable.append(f"{target}: {error}")
            continue
        try:
            cpp_extension.load(
                name, [str(SOURCE)], extra_cflags=list(_FLAGS), extra_ldflags=["-fopenmp"],
                build_directory=str(target),
                verbose=verbose, is_python_module=True,
            )
        except (OSError, RuntimeError, ImportError) as error:  # (what load raises)
            raise RuntimeError(
                f"batchnorm: the compiled call path could not be built in {target} (the Python "
                f"path serves every call): {error}"
            ) from error
        return _library(folder, name)
    raise RuntimeError(
        "batchnorm: no writable folder for the compiled call path (the Python path serves "
        "every call): " + "; ".join(unwritable)
    )


def _put_ninja_on_path() -> None:
    """torch's extension tools run ``ninja`` from PATH; the ninja package's own, where installed
    (a virtual environment's scripts are not on PATH unless it is activated)."""
    try:
        import ninja
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")


def _import(path: pathlib.Path) -> ModuleType:
    name = path.stem
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def register_backward_fallback(act: int, function: Callable) -> None:
    """The Python backward of a common training step with the activation of kernel code
    ``act`` (``kernels.ACTIVATIONS``), for what the C++ node hands back (a double backward, a
    batched or opaque gradient, a transform active): ``function(grad, x, weight, bias, mean,
    variance, eps, needs) -> (dx, dweight, dbias)``. ``batchnorm.autograd`` registers plain
    batch norm's, ``batchnorm.modules.norm_act`` the fused ReLU's."""
    _backward_fallbacks[act] = function


_backward_fallbacks: dict[int, Callable] = {}


def _fallback(grad, x, weight, bias, mean, variance, eps, act, needs):
    function = _backward_fallbacks.get(act)
    if function is None:  # (each module registers its own at import, before any call)
        raise RuntimeError(f"batchnorm: no Python backward registered for activation {act}")
    return function(grad, x, weight, bias, mean, variance, eps, needs)


def load(serial_below: int, backward_planes_serial_below: int, threads: int) -> ModuleType | None:
    """The extension with the kernels' entry points handed over, or None where it is off
    (``BATCHNORM_NATIVE=0``), not built, or its entry points are not in Numba's cache (the
    kernels changed since ``batchnorm compile``; nothing is compiled here). Called once Numba's
    thread pool has started: the C functions' parallel kernels link against it."""
    if os.environ.get("BATCHNORM_NATIVE", "1") == "0":
        return None
    path = built()
    if path is None:
        return None
    from numba.np.ufunc import parallel

    from batchnorm.backends.cpu import kernels

    parallel._launch_threads()  # (idempotent; the entry points' libraries need its symbols)
    entry_points = [kernels.c_entry_points(dtype, compile=False)
                    for dtype in ("float32", "float64")]
    if None in entry_points:  # not compiled since the kernels changed: batchnorm compile
        return None
    module = _import(path)
    module.set_entry_points(
        *([function.address for function in functions] for functions in entry_points),
        serial_below, backward_planes_serial_below, threads, _fallback,
    )
    return module


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block every call takes the Python path (for tests and side-by-side timing)."""
    from batchnorm.backends import cpu

    before = cpu.compiled, cpu._native_tried
    cpu.compiled, cpu._native_tried = None, True  # (nor loaded inside the block)
    try:
        yield
    finally:
        cpu.compiled, cpu._native_tried = before
