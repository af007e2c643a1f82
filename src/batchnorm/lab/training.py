"""The one training loop every experiment uses: SGD with momentum, seeded, with checkpoints.

A run is deterministic for a given seed: the seed fixes the initial weights, the batch order and
dropout. Training stops early when the loss stops being finite (recorded as ``nonfinite``).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from batchnorm.core.running import NonFiniteStatisticsWarning

MOMENTUM = 0.9


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and random; return a generator for the batch order."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed + 1_000_003)


def batch_indices(size: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches: a fresh permutation per epoch, short last batch dropped."""
    if batch_size > size:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({size})")
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy in eval mode (population statistics), in chunks to bound memory."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), 2048):
        logits = model(inputs[start : start + 2048])
        correct += int((logits.argmax(dim=1) == labels[start : start + 2048]).sum())
    model.train(was_training)
    return correct / len(labels)


@dataclass
class TrainResult:
    """What a training run leaves: the checkpoints and the final state."""

    steps: list[int] = field(default_factory=list)  # the steps at which checkpoints were taken
    test_accuracy: list[float] = field(default_factory=list)
    nonfinite: bool = False
    steps_done: int = 0
    final_loss: float = math.nan


def train(
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
    eval_every: int = 0,
    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` SGD steps; checkpoint at step 0 and every ``eval_every``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=MOMENTUM)
    result = TrainResult()
    batches = batch_indices(len(train_labels), batch_size, generator)

    def checkpoint(step: int) -> None:
        result.steps.append(step)
        result.test_accuracy.append(accuracy(model, test_inputs, test_labels))
        if on_checkpoint is not None:
            on_checkpoint(step, model)

    model.train()
    if eval_every:
        checkpoint(0)
    with warnings.catch_warnings():
        # A diverging run meets non-finite batches; it is stopped below, the warning adds nothing.
        warnings.simplefilter("ignore", NonFiniteStatisticsWarning)
        for step in range(1, steps + 1):
            index = next(batches)
            loss = nn.functional.cross_entropy(model(train_inputs[index]), train_labels[index])
            if not torch.isfinite(loss):
                result.nonfinite = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.steps_done = step
            result.final_loss = loss.item()
            if eval_every and step % eval_every == 0:
                checkpoint(step)
    return result
