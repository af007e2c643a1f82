"""The registry of experiments, in the order the default suite runs them (the order of the claims
they test; the baselines, which test none, last).

One file per experiment; each defines ``EXPERIMENT``. New experiments are added to ``EXPERIMENTS``.
"""

from __future__ import annotations

from batchnorm.lab.experiments import (
    baselines,
    batch_size,
    convergence,
    depth,
    gradients,
    hyperparameters,
    ics,
    inference,
    initialization,
    ioffe_mnist,
    learning_rate,
    overhead,
    placement,
    recurrent,
    regularization,
    smoothness,
)
from batchnorm.lab.experiments.base import Experiment

EXPERIMENTS: dict[str, Experiment] = {
    module.EXPERIMENT.name: module.EXPERIMENT
    for module in (
        convergence,
        learning_rate,
        ioffe_mnist,
        ics,
        smoothness,
        regularization,
        initialization,
        gradients,
        depth,
        batch_size,
        recurrent,
        placement,
        inference,
        overhead,
        hyperparameters,
        baselines,
    )
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment '{name}': expected one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
