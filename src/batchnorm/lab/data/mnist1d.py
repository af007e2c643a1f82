"""MNIST-1D: ten digit templates turned into 1-D signals of length 40, generated on this machine.

The ``mnist1d`` package builds the data set from its default arguments (5,000 signals, 4,000 for
training and 1,000 for test, seed 42). Only its generator is called: nothing is downloaded and no
pickle is read or written. The signals become "images" of shape 1x1x40, so the lab's MLP reads 40
inputs and its CNN runs 1-D convolutions over them.

Unlike the 8x8 digits, where logistic regression already reaches about 97%, MNIST-1D leaves room
between models: the generator's authors report about 32% for logistic regression, 68% for an MLP,
91% for a GRU and 94% for a CNN, so an effect of batch norm has room to show.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from batchnorm.lab.data.dataset import DataError, Dataset, make_dataset

NAME = "mnist1d"
TRAIN_SIZE, TEST_SIZE, LENGTH = 4000, 1000, 40

# Test accuracy (%) reported by the MNIST-1D authors for each model family (quoted in our issue,
# not checked against their paper: the report marks them "as quoted").
PUBLISHED_ACCURACY = {
    "logistic regression": 32.0,
    "MLP": 68.0,
    "CNN": 94.0,
    "GRU": 91.0,
}


def generate() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The default MNIST-1D arrays: (train signals, train labels, test signals, test labels).

    The generator seeds numpy's and Python's global random state; both are restored afterwards,
    so loading the data does not change the random numbers anything else draws.
    """
    try:
        from mnist1d.data import get_dataset_args
        from mnist1d.data import make_dataset as generate_mnist1d
    except ImportError as error:
        raise DataError(
            f"mnist1d: the 'mnist1d' package is not installed ({error}); "
            "`pip install mnist1d` (it is one of batchnorm's dependencies)"
        ) from None
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        generated = generate_mnist1d(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = (generated["x"], generated["y"], generated["x_test"], generated["y_test"])
    expected = ((TRAIN_SIZE, LENGTH), (TRAIN_SIZE,), (TEST_SIZE, LENGTH), (TEST_SIZE,))
    shapes = tuple(np.shape(array) for array in arrays)
    if shapes != expected:
        raise DataError(
            f"mnist1d: the generator gave arrays of shapes {shapes}, expected {expected} "
            "(another version of the package?)"
        )
    return arrays


@lru_cache(maxsize=1)
def load_mnist1d() -> Dataset:
    """MNIST-1D as a ``Dataset``: 4,000 train / 1,000 test signals of shape 1x1x40, 10 classes."""
    train_x, train_y, test_x, test_y = generate()
    return make_dataset(
        NAME,
        train_x.reshape(-1, 1, 1, LENGTH),
        np.asarray(train_y, dtype=np.int64),
        test_x.reshape(-1, 1, 1, LENGTH),
        np.asarray(test_y, dtype=np.int64),
    )
