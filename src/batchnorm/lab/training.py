"""The one training loop every experiment uses: SGD with momentum, seeded, with checkpoints.

A run is deterministic for a given seed: the seed fixes the initial weights, the batch order and
dropout. Training stops early when the loss stops being finite (recorded as ``nonfinite``).
Checkpoints score the validation part; the test part is scored once, after training
(``experiments.base.fit``), so nothing a run decides can depend on it.
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
def correct_predictions(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
    """Which examples the model classifies correctly, in eval mode (population statistics),
    in chunks to bound memory. A model whose outputs are not finite gets none right."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(labels), 2048):
        logits = model(inputs[start : start + 2048])
        right = logits.argmax(dim=1) == labels[start : start + 2048]
        parts.append(right & torch.isfinite(logits).all(dim=1))
    model.train(was_training)
    return torch.cat(parts).cpu()


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy (a fraction) in eval mode."""
    return float(correct_predictions(model, inputs, labels).float().mean())


def sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """One plain training step: the batch's cross-entropy and, when it is finite, the update.
    Returns the loss (the caller stops on a non-finite one)."""
    loss = nn.functional.cross_entropy(model(inputs), labels)
    if torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss


# ``take_step(step, model, optimizer, inputs, labels) -> loss``: what one step does (the default
# :func:`sgd_step`, or an experiment's own that measures around it)
StepFunction = Callable[[int, nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor],
                        torch.Tensor]


@dataclass
class TrainResult:
    """What a training run leaves: the checkpoints and the final state."""

    steps: list[int] = field(default_factory=list)  # the steps at which checkpoints were taken
    validation_accuracy: list[float] = field(default_factory=list)
    nonfinite: bool = False
    steps_done: int = 0
    final_loss: float = math.nan


def train(
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    validation_inputs: torch.Tensor,
    validation_labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
    eval_every: int = 0,
    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
    take_step: StepFunction | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` SGD steps; score the validation part at step 0 and every
    ``eval_every`` steps (no checkpoints when 0). ``take_step`` replaces what one step does
    (default: :func:`sgd_step`); the seeding, batch order, optimizer, checkpoints and the stop on
    a non-finite loss stay the loop's."""
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=MOMENTUM)
    result = TrainResult()
    batches = batch_indices(len(train_labels), batch_size, generator)

    def checkpoint(step: int) -> None:
        result.steps.append(step)
        result.validation_accuracy.append(accuracy(model, validation_inputs, validation_labels))
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
            if take_step is None:
                loss = sgd_step(model, optimizer, train_inputs[index], train_labels[index])
            else:
                loss = take_step(step, model, optimizer, train_inputs[index], train_labels[index])
            if not torch.isfinite(loss):
                result.nonfinite = True
                break
            result.steps_done = step
            result.final_loss = loss.item()
            if eval_every and step % eval_every == 0:
                checkpoint(step)
    return result
