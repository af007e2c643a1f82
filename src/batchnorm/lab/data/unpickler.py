"""A restricted unpickler for CIFAR-10's python batches.

A pickle can call any importable function while it loads, so a downloaded file must not be
trusted with ``pickle.load``. This unpickler resolves only the few globals that rebuilding numpy
arrays needs; any other global (``os.system``, ``builtins.eval``, ...) is refused before it is
called. Plain containers (dicts, lists, tuples, bytes, str, numbers) need no globals at all.
Nor can the allowed globals allocate more memory than the pickle's own bytes: arrays are rebuilt
from an empty one filled with bytes the file holds, and ``bytes`` is allowed only empty.
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

from batchnorm.lab.data.dataset import DataError


class UnsafePickleError(pickle.UnpicklingError, DataError):
    """The pickle asked for a global that a data file has no reason to use.

    Also a ``DataError``, so ``batchnorm lab`` reports it as one line naming the file.
    """


class _Refused(Exception):
    """Raised by the allowed globals for arguments they refuse; becomes UnsafePickleError."""


class _ArrayType:
    """What ``numpy.ndarray`` resolves to: only a token for ``_reconstruct``, since calling
    ``ndarray(shape)`` would let a few bytes of pickle allocate any amount of memory."""

    def __call__(self, *arguments, **keywords):
        raise _Refused(f"numpy.ndarray{arguments!r:.60}: arrays are rebuilt, never constructed")


_ARRAY_TYPE = _ArrayType()
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array rebuilder, whatever its module


def _reconstruct_empty(array_type, shape, dtype) -> np.ndarray:
    """What pickles of arrays call first: an empty ndarray, which the pickle then fills from
    the bytes it holds (``__setstate__`` checks their size). Anything larger is refused."""
    if array_type is not _ARRAY_TYPE or not isinstance(shape, tuple) or 0 not in shape:
        raise _Refused(
            f"numpy _reconstruct of shape {shape!r:.60}: an array in a data file is rebuilt "
            "from an empty one and the bytes the file holds"
        )
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


def _numpy_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): _ARRAY_TYPE}
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct_empty
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _rebuild_from_buffer
    # Protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(text, "latin1"),
    # and empty bytes (the data of an empty array) as a call to bytes().
    allowed[("_codecs", "encode")] = _latin1_encode
    for module in ("__builtin__", "builtins"):
        allowed[(module, "bytes")] = _empty_bytes
    return allowed


def _rebuild_from_buffer(buffer, dtype, shape, order) -> np.ndarray:
    """What protocol-5 pickles of arrays call: an array over the given bytes."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _empty_bytes(*arguments) -> bytes:
    """``bytes()`` only: ``bytes(n)`` would let a few bytes of pickle allocate n."""
    if arguments:
        raise _Refused(f"bytes{arguments!r:.40}: only bytes() is allowed")
    return b""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r:.40}")
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

    def load(self):
        try:
            return super().load()
        except _Refused as error:
            raise UnsafePickleError(f"{self._source}: refused {error}") from None


def restricted_loads(data: bytes, *, source: str = "pickle"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()
