"""MNIST and Fashion-MNIST from their idx files (gzipped or not), read from a local folder.

The folder may hold the four files itself, or be a torchvision root (``ROOT/MNIST/raw/...`` or
``ROOT/FashionMNIST/raw/...``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from batchnorm.lab.data.dataset import DataError, Dataset, make_dataset

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
UNSIGNED_BYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """One idx file of unsigned bytes as an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read the idx file ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an idx file (expected a header 0x00 0x00 <type> <dims>)")
    data_type, dims = raw[2], raw[3]
    if data_type != UNSIGNED_BYTE:
        raise DataError(
            f"{path}: expected unsigned-byte data (type 0x08), got type {data_type:#04x}"
        )
    header_size = 4 + 4 * dims
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes for {dims} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape))
    if len(raw) - header_size != expected:
        raise DataError(
            f"{path}: expected {expected} bytes of data for shape {shape}, "
            f"got {len(raw) - header_size}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def find_idx_folder(name: str, path: Path) -> Path:
    """The folder that holds the idx files: ``path`` itself or its torchvision layout."""
    candidates = [path, path / "raw", path / TORCHVISION_FOLDERS[name] / "raw"]
    for folder in candidates:
        if all(_find_file(folder, stem) for stem in FILES.values()):
            return folder
    if not path.is_dir():
        raise DataError(f"{name}: folder '{path}' does not exist")
    expected = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    raise DataError(
        f"{name}: '{path}' does not hold the idx files: expected {expected} in it or in "
        f"{TORCHVISION_FOLDERS[name]}/raw under it"
    )


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(name: str, path: Path) -> Dataset:
    """The train and test split of MNIST or Fashion-MNIST as 1xHxW images."""
    folder = find_idx_folder(name, path)
    arrays = {key: read_idx(_find_file(folder, stem)) for key, stem in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{name}: {split} images must be (N, H, W) and labels (N,), "
                f"got {images.shape} and {labels.shape}"
            )
    return make_dataset(
        name,
        arrays["train_images"][:, None],
        arrays["train_labels"],
        arrays["test_images"][:, None],
        arrays["test_labels"],
    )
