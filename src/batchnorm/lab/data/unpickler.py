"""A restricted unpickler for CIFAR-10's python batches.

A pickle can call any importable function while it loads, so a downloaded file must not be
trusted with ``pickle.load``. This unpickler resolves only the few globals that rebuilding numpy
arrays needs; any other global (``os.system``, ``builtins.eval``, ...) is refused before it is
called. Plain containers (dicts, lists, tuples, bytes, str, numbers) need no globals at all.
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global that a data file has no reason to use."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array rebuilder, whatever its module
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _rebuild_from_buffer
    # Protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _rebuild_from_buffer(buffer, dtype, shape, order) -> np.ndarray:
    """What protocol-5 pickles of arrays call: an array over the given bytes."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Loads numpy arrays, dicts, lists, tuples, bytes, strings and numbers; refuses the rest."""

    def __init__(self, file, *, source: str = "pickle") -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to load '{module}.{name}': a CIFAR-10 batch holds only "
                "numpy arrays, lists, dicts and bytes, so this file is not one (and loading it "
                "could run code)"
            ) from None


def restricted_loads(data: bytes, *, source: str = "pickle"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()
