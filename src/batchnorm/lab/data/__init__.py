"""The lab's data: a ``Dataset`` of train/test tensors; ``load_data`` reads a ``--data`` spec.

Specs: ``digits`` (default, bundled with scikit-learn, no download), ``mnist:PATH``,
``fashion-mnist:PATH`` (idx files, gzipped or not) and ``cifar10:PATH`` (the python batches).
"""

from __future__ import annotations

from pathlib import Path

from batchnorm.lab.data.dataset import DataError, Dataset

__all__ = ["DATA_SPECS", "DataError", "Dataset", "describe_spec", "load_data"]

# Name -> what its PATH must hold (for --help and error messages).
DATA_SPECS = {
    "digits": "no path: scikit-learn's bundled 8x8 handwritten digits",
    "mnist": "mnist:PATH, a folder with the four MNIST idx files (or a torchvision root)",
    "fashion-mnist": "fashion-mnist:PATH, a folder with the four idx files (or a torchvision root)",
    "cifar10": "cifar10:PATH, the folder cifar-10-batches-py (or its parent)",
}


def _split_spec(spec: str) -> tuple[str, str | None]:
    name, sep, path = spec.partition(":")
    name = name.strip().lower()
    if name not in DATA_SPECS:
        expected = ", ".join(DATA_SPECS)
        raise DataError(f"unknown data '{spec}': expected one of {expected}")
    if name == "digits":
        if sep:
            raise DataError(f"data 'digits' takes no path, got '{spec}'")
        return name, None
    if not path:
        raise DataError(f"data '{name}' needs a folder: expected {DATA_SPECS[name]}, got '{spec}'")
    return name, path


def describe_spec(spec: str) -> dict:
    """The identity of a data spec, as stored with every run (name and absolute path)."""
    name, path = _split_spec(spec)
    return {"name": name, "path": None if path is None else str(Path(path).expanduser().resolve())}


# The experiments are sized for thousands of examples; larger sets are cut to a fixed subset so
# that a suite on MNIST or CIFAR-10 takes tens of minutes rather than hours.
TRAIN_LIMIT = 10_000
TEST_LIMIT = 2_000


def load_data(spec: str = "digits") -> Dataset:
    """Read the data named by ``spec``; a bad spec or folder raises ``DataError``."""
    name, path = _split_spec(spec)
    if name == "digits":
        from batchnorm.lab.data.digits import load_digits

        return load_digits()
    if name in ("mnist", "fashion-mnist"):
        from batchnorm.lab.data.idx import load_idx_dataset

        dataset = load_idx_dataset(name, Path(path).expanduser())
    else:
        from batchnorm.lab.data.cifar import load_cifar10

        dataset = load_cifar10(Path(path).expanduser())
    return dataset.subset(TRAIN_LIMIT, TEST_LIMIT)
