"""MNIST and Fashion-MNIST from their idx files (gzipped or not), read from a local folder.

The folder may hold the four files itself, or be a torchvision root (``ROOT/MNIST/raw/...`` or
``ROOT/FashionMNIST/raw/...``).

A file is trusted only as far as its header agrees with it. All four headers are read first and
must describe 28x28 unsigned-byte images with one label per image; a raw file must then hold
exactly the bytes its header declares (checked against its size, so an 8 GiB file is refused
without being read), and a gzipped one is decompressed a chunk at a time, refused the moment it
holds more than declared (a gzip bomb) or when it ends short. So memory never goes beyond the data
that is there, nor beyond what the header declares, which may not exceed ``MAX_PAYLOAD``.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batchnorm.lab.data.dataset import (
    DataError,
    Dataset,
    check_labels,
    check_training_size,
    make_dataset,
)
from batchnorm.lab.data.files import find_files

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
UNSIGNED_BYTE = 0x08
IMAGE_SIZE = (28, 28)
CLASSES = 10
# MNIST's largest file holds 47 MB; a header that declares more than this is not MNIST's.
MAX_PAYLOAD = 256 << 20
CHUNK = 1 << 20  # how much a gzip stream is decompressed at a time
# What a damaged gzip stream raises: a bad header or CRC (OSError), a bad deflate block
# (zlib.error), a stream that ends before its end marker (EOFError).
GZIP_ERRORS = (OSError, EOFError, zlib.error)


def read_idx(path: Path, *, max_payload: int = MAX_PAYLOAD) -> np.ndarray:
    """One idx file of unsigned bytes as an array of its declared shape."""
    with _open(path) as handle:
        shape = _read_header(path, handle, max_payload)
        size = math.prod(shape)
        # Grown chunk by chunk, so memory follows the data that is there, not the declared size.
        payload = bytearray()
        while len(payload) < size:
            chunk = _guarded(path, handle.read, min(CHUNK, size - len(payload)))
            if not chunk:
                raise DataError(
                    f"{path}: truncated, holds only {len(payload)} of the {size} bytes of data "
                    f"its header declares for shape {shape}"
                )
            payload += chunk
        # One byte more: a longer stream is refused (a gzip bomb), and reaching the end of a
        # gzip stream is what checks its CRC.
        if _guarded(path, handle.read, 1):
            raise DataError(
                f"{path}: holds more than the {size} bytes of data its header declares "
                f"for shape {shape}"
            )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def read_idx_shape(path: Path, *, max_payload: int = MAX_PAYLOAD) -> tuple[int, ...]:
    """The shape an idx file's header declares (for a raw file, checked against its size)."""
    with _open(path) as handle:
        return _read_header(path, handle, max_payload)


def _open(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read the idx file ({error.strerror or error})") from None


def _guarded(path: Path, read, argument):
    """``read(argument)``, a damaged file's error turned into a DataError naming it."""
    try:
        return read(argument)
    except GZIP_ERRORS as error:
        kind = "gzip stream" if path.suffix == ".gz" else "idx file"
        raise DataError(f"{path}: cannot read the {kind} ({error})") from None


def _read_exactly(path: Path, handle: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = _guarded(path, handle.read, size - len(data))
        if not more:
            break
        data += more
    return data


def _read_header(path: Path, handle: BinaryIO, max_payload: int) -> tuple[int, ...]:
    """The declared shape, after checking the magic, type code and declared size."""
    start = _read_exactly(path, handle, 4)
    if len(start) < 4 or start[0] != 0 or start[1] != 0:
        raise DataError(f"{path}: not an idx file (expected a header 0x00 0x00 <type> <dims>)")
    data_type, dims = start[2], start[3]
    if data_type != UNSIGNED_BYTE:
        raise DataError(
            f"{path}: expected unsigned-byte data (type 0x08), got type {data_type:#04x}"
        )
    if dims == 0:
        raise DataError(f"{path}: the header declares no dimensions")
    sizes = _read_exactly(path, handle, 4 * dims)
    if len(sizes) < 4 * dims:
        raise DataError(f"{path}: truncated header ({4 + len(sizes)} bytes for {dims} dimensions)")
    shape = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(dims))
    payload = math.prod(shape)  # a Python int: sizes that multiply past 2**64 do not wrap
    if payload > max_payload:
        raise DataError(
            f"{path}: header declares shape {shape}, {payload} bytes of data, more than the "
            f"{max_payload >> 20} MiB an idx file of the lab may hold"
        )
    if path.suffix != ".gz":
        actual = os.fstat(handle.fileno()).st_size - 4 - 4 * dims
        if actual != payload:
            problem = "truncated" if actual < payload else "trailing bytes"
            raise DataError(
                f"{path}: expected {payload} bytes of data for shape {shape}, the file holds "
                f"{actual} ({problem})"
            )
    return shape


def _check_shapes(paths: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> None:
    for split in ("train", "test"):
        images, labels = f"{split}_images", f"{split}_labels"
        if len(shapes[images]) != 3 or shapes[images][1:] != IMAGE_SIZE:
            raise DataError(
                f"{paths[images]}: expected 28x28 images, shape (N, 28, 28), "
                f"got shape {shapes[images]}"
            )
        if len(shapes[labels]) != 1:
            raise DataError(
                f"{paths[labels]}: expected one label per image, shape (N,), "
                f"got shape {shapes[labels]}"
            )
        if shapes[labels][0] != shapes[images][0]:
            raise DataError(
                f"{paths[labels]}: holds {shapes[labels][0]} labels for the "
                f"{shapes[images][0]} images of {paths[images]}"
            )
        if shapes[images][0] == 0:
            raise DataError(f"{paths[images]}: holds no images")


def load_idx_dataset(name: str, path: Path, min_train: int = 1) -> Dataset:
    """The train and test split of MNIST or Fashion-MNIST as 1x28x28 images.

    The training set must hold at least ``min_train`` images (one batch of the experiments).
    """
    expected = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    paths = find_files(
        name,
        path,
        [path, path / "raw", path / TORCHVISION_FOLDERS[name] / "raw"],
        {key: (stem, f"{stem}.gz") for key, stem in FILES.items()},
        f"the idx files: expected {expected} in it or in {TORCHVISION_FOLDERS[name]}/raw under it",
    )
    shapes = {key: read_idx_shape(file) for key, file in paths.items()}
    _check_shapes(paths, shapes)
    check_training_size(shapes["train_images"][0], min_train, str(paths["train_images"]))
    arrays = {key: read_idx(file) for key, file in paths.items()}
    for key in ("train_labels", "test_labels"):
        check_labels(arrays[key], str(paths[key]), CLASSES)
    return make_dataset(
        name,
        arrays["train_images"][:, None],
        arrays["train_labels"],
        arrays["test_images"][:, None],
        arrays["test_labels"],
        classes=CLASSES,
    )
