"""The registry of experiments, in the order the default suite runs them.

One file per experiment; each defines ``EXPERIMENT``. New experiments are added to ``EXPERIMENTS``.
"""

from __future__ import annotations

from batchnorm.lab.experiments import (
    baselines,
    batch_size,
    convergence,
    initialization,
    ioffe_mnist,
    learning_rate,
    regularization,
)
from batchnorm.lab.experiments.base import Experiment

EXPERIMENTS: dict[str, Experiment] = {
    module.EXPERIMENT.name: module.EXPERIMENT
    for module in (
        convergence,
        learning_rate,
        ioffe_mnist,
        batch_size,
        initialization,
        regularization,
        baselines,
    )
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment '{name}': expected one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
