"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, no download needed."""

from __future__ import annotations

from functools import lru_cache

from batchnorm.lab.data.dataset import Dataset, make_dataset

TEST_FRACTION = 0.3
SPLIT_SEED = 0  # fixed, so every run and every machine sees the same split


@lru_cache(maxsize=1)
def load_digits() -> Dataset:
    """A fixed stratified split: 1,257 training and 540 test images of shape 1x8x8."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = bunch.images.reshape(-1, 1, 8, 8)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images,
        bunch.target,
        test_size=TEST_FRACTION,
        stratify=bunch.target,
        random_state=SPLIT_SEED,
    )
    return make_dataset("digits", train_images, train_labels, test_images, test_labels)
