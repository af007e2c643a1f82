"""The lab's data: a ``Dataset`` of train/test tensors; ``load_data`` reads a ``--data`` spec.

Specs: ``digits`` (default, bundled with scikit-learn, no download), ``mnist1d`` (generated on
this machine by the mnist1d package), ``mnist:PATH``, ``fashion-mnist:PATH`` (idx files, gzipped
or not) and ``cifar10:PATH`` (the python batches).
"""

from __future__ import annotations

from pathlib import Path

from batchnorm.lab.data.dataset import DataError, Dataset

__all__ = [
    "DATA_SPECS",
    "DataError",
    "Dataset",
    "describe_spec",
    "largest_batch_size",
    "load_data",
]

# Name -> what its PATH must hold (for --help and error messages).
PATHLESS = ("digits", "mnist1d")  # bundled or generated: no folder to read
DATA_SPECS = {
    "digits": "no path: scikit-learn's bundled 8x8 handwritten digits",
    "mnist1d": "no path: MNIST-1D, generated on this machine from the mnist1d package's defaults",
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
    if name in PATHLESS:
        if sep:
            raise DataError(f"data '{name}' takes no path, got '{spec}'")
        return name, None
    if not path:
        raise DataError(f"data '{name}' needs a folder: expected {DATA_SPECS[name]}, got '{spec}'")
    return name, path


def describe_spec(spec: str) -> dict:
    """The identity of a data spec, as stored with every run (name and absolute path)."""
    name, path = _split_spec(spec)
    if path is None:
        return {"name": name, "path": None}
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise DataError(f"{name}: '{path}' cannot be resolved ({error})") from None
    return {"name": name, "path": str(resolved)}


# The experiments are sized for thousands of examples; larger sets are cut to a fixed subset so
# that a suite on MNIST or CIFAR-10 takes tens of minutes rather than hours.
TRAIN_LIMIT = 10_000
TEST_LIMIT = 2_000


def largest_batch_size(configs) -> int:
    """The largest mini-batch any of the experiment ``configs`` trains on (their ``batch_size``
    or ``batch_sizes``), so that a training set can be checked to hold one before any run."""
    sizes = [1]
    for config in configs:
        sizes.append(getattr(config, "batch_size", 1))
        sizes.extend(getattr(config, "batch_sizes", ()))
    return max(sizes)


def load_data(spec: str = "digits", min_train: int = 1) -> Dataset:
    """Read the data named by ``spec``; a bad spec or folder raises ``DataError``.

    The training set must hold at least ``min_train`` images: one batch of the experiments.
    """
    name, path = _split_spec(spec)
    if name == "digits":
        from batchnorm.lab.data.dataset import check_training_size
        from batchnorm.lab.data.digits import load_digits

        dataset = load_digits()
        check_training_size(len(dataset.train_labels), min_train, "digits")
        return dataset
    if name == "mnist1d":
        from batchnorm.lab.data.dataset import check_training_size
        from batchnorm.lab.data.mnist1d import load_mnist1d

        dataset = load_mnist1d()
        check_training_size(len(dataset.train_labels), min_train, "mnist1d")
        return dataset
    if name in ("mnist", "fashion-mnist"):
        from batchnorm.lab.data.idx import load_idx_dataset

        dataset = load_idx_dataset(name, Path(path).expanduser(), min_train)
    else:
        from batchnorm.lab.data.cifar import load_cifar10

        dataset = load_cifar10(Path(path).expanduser(), min_train)
    return dataset.subset(TRAIN_LIMIT, TEST_LIMIT)
