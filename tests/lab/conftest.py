"""Tiny files in the real formats (idx, CIFAR-10 python batches) and tiny experiment configs."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if gzipped:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_idx_folder(
    folder: Path, gzipped: bool, train: int = 20, test: int = 10, shape: tuple = (6, 5)
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, *shape)),
        "train-labels-idx1-ubyte": np.arange(train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, *shape)),
        "t10k-labels-idx1-ubyte": (np.arange(test) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gzipped)
    return arrays


def make_cifar_folder(folder: Path, per_batch: int = 4, protocol: int = 2) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(label) for label in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = batch
    return batches


@pytest.fixture
def tiny_configs():
    return make_tiny_configs()


TINY_DATA = "digits"  # the tiny suites run every experiment on the bundled digits (fast to load)


def make_tiny_configs() -> dict:
    """Every experiment at a size that runs in a few seconds in total (on the digits)."""
    from batchnorm.lab.experiments.baselines import BaselinesConfig
    from batchnorm.lab.experiments.batch_size import BatchSizeConfig
    from batchnorm.lab.experiments.convergence import ConvergenceConfig
    from batchnorm.lab.experiments.depth import DepthConfig
    from batchnorm.lab.experiments.gradients import GradientsConfig
    from batchnorm.lab.experiments.hyperparameters import HyperparameterConfig
    from batchnorm.lab.experiments.ics import IcsConfig
    from batchnorm.lab.experiments.inference import InferenceConfig
    from batchnorm.lab.experiments.initialization import InitConfig
    from batchnorm.lab.experiments.ioffe_mnist import IoffeConfig
    from batchnorm.lab.experiments.learning_rate import LearningRateConfig
    from batchnorm.lab.experiments.overhead import OverheadConfig
    from batchnorm.lab.experiments.placement import PlacementConfig
    from batchnorm.lab.experiments.recurrent import RecurrentConfig
    from batchnorm.lab.experiments.regularization import RegularizationConfig
    from batchnorm.lab.experiments.smoothness import SmoothnessConfig

    return {
        "convergence": ConvergenceConfig(tuning_rates=(0.03, 0.1), steps=40, eval_every=20,
                                         widths=(4, 8, 8), target_accuracy=0.3),
        "learning-rate": LearningRateConfig(learning_rates=(0.01, 1.0), steps=20, width=32),
        "ioffe-mnist": IoffeConfig(tuning_rates=(0.1,), steps=40, eval_every=20, width=20),
        "batch-size": BatchSizeConfig(mlp_norms=("batch", "layer"), cnn_norms=("batch", "group"),
                                      batch_sizes=(16, 32), tuning_rates=(0.1,), epochs=1,
                                      width=16, widths=(4, 8, 8)),
        "init": InitConfig(scales=(0.1, 1.0), tuning_rates=(0.03,), steps=20, eval_every=20,
                           width=32),
        "regularization": RegularizationConfig(tuning_rates=(0.03,), steps=30, eval_every=30,
                                               width=32),
        "baselines": BaselinesConfig(tuning_rates=(0.1,), steps=20, eval_every=20),
        "ics": IcsConfig(tuning_rates=(0.05,), steps=20, measure_every=10, eval_every=10,
                         depth=3, width=16, batch_size=32),
        "gradients": GradientsConfig(depth=4, width=8, batch_size=16, steps=4, eval_every=2),
        "depth": DepthConfig(depths=(1, 3), cnn_depths=(1, 3), tuning_depth=1,
                             tuning_rates=(0.1,), steps=4, batch_size=16, width=8, channels=2),
        "inference": InferenceConfig(steps=12, batch_sizes=(4, 16), tuning_rates=(0.01,),
                                     width=8, precise_batch=100),
        "overhead": OverheadConfig(rounds=2, warmup_rounds=1, steps_per_timing=1,
                                   batches_per_timing=1, width=8, widths=(4, 8),
                                   inference_batch=16),
        "smoothness": SmoothnessConfig(steps=6, probe_every=3, probe_batch=16,
                                       multipliers=(0.5, 4.0), widths=(4, 8, 8), linear_depth=4,
                                       linear_width=4),
        "recurrent": RecurrentConfig(norms=("batch", "layer"), hidden_size=4,
                                     tuning_rates=(0.1,), steps=4, eval_every=2, batch_size=16,
                                     length_factors=(1.0, 1.5)),
        "placement": PlacementConfig(tuning_rates=(0.1,), width=16, mlp_steps=6),
        "hyperparameters": HyperparameterConfig(epsilons=(1e-5, 1e-1), usual_epsilons=(1e-5,),
                                                tuning_rates=(0.1,), steps=10, width=8),
    }
