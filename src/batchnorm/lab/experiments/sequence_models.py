"""The recurrent experiment's models: one LSTM whose three normalizations are the only difference.

Every model is our :class:`~batchnorm.variants.recurrent.BNLSTM` (its cell's equations, its
initialization: uniform input weights, orthogonal recurrent weights, the forget gate's bias at
1). For "batch" its per-time-step batch norms of the input projection, the recurrent projection
and the cell state stay. For "none" all three become the identity. For "layer" the recurrent
projection and the cell state get a LayerNorm over the features of one example, with its gain
starting at batch norm's 0.1, and the input projection is left as it is: over one example's
features, LayerNorm of ``W_x x`` keeps only the direction of the few input values of a step
and throws away their size (with one value per step, only its sign). Ba et al. normalize that
projection too, but their inputs are wide embeddings; here, in their form, the LN-LSTM stayed
near 17% validation accuracy (one LayerNorm over the sum of both projections: about 21%) where
the others reached about 46% (400 steps on MNIST-1D, four values per step). Batch norm of the
same projection keeps each example's size, because it normalizes each feature over the batch.

A signal of length L (a flat (N, L) vector, as the lab's MLP reads it) is read k consecutive
values per time step (L / k steps); the classifier sees the last hidden state. Any length can be
fed: batch norm beyond the trained number of steps reuses the last trained step's statistics
(see the variant's docstring).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from batchnorm.variants.recurrent import BNLSTM

SEQUENCE_NORMS = ("none", "batch", "layer")


class StepFree(nn.Module):
    """A norm that takes the recurrent cell's ``(x, t, mask)`` call and ignores ``t`` and
    ``mask``: LayerNorm's statistics come from one example, so neither the time step nor the
    other sequences in the batch change them."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, input: torch.Tensor, t: int, mask: torch.Tensor | None = None):
        return self.norm(input)


def _layer_norm(features: int, gamma_init: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(features)
    with torch.no_grad():
        norm.weight.fill_(gamma_init)
    return norm


def sequence_lstm(norm: str, input_size: int, hidden_size: int, max_steps: int,
                  gamma_init: float) -> BNLSTM:
    """A one-layer LSTM normalized by ``norm`` (one of ``SEQUENCE_NORMS``, placed as the module
    docstring says); LayerNorm's gain starts at ``gamma_init`` as batch norm's does."""
    if norm not in SEQUENCE_NORMS:
        raise ValueError(f"unknown norm '{norm}': expected one of {', '.join(SEQUENCE_NORMS)}")
    lstm = BNLSTM(input_size, hidden_size, max_steps, gamma_init=gamma_init)
    if norm == "batch":
        return lstm

    def make(features: int) -> nn.Module:
        if norm == "none":
            return StepFree(nn.Identity())
        return StepFree(_layer_norm(features, gamma_init))

    for cell in lstm.cells:
        cell.bn_ih = StepFree(nn.Identity())  # see the module docstring
        cell.bn_hh, cell.bn_c = make(4 * hidden_size), make(hidden_size)
    return lstm


class SequenceClassifier(nn.Module):
    """An LSTM that reads a signal ``values_per_step`` consecutive values per time step, then a
    linear classifier on the last hidden state. Input: (N, L) (or any (N, ...) that flattens to
    it) with L a multiple of ``values_per_step``; ``max_steps`` is the trained length in steps
    (batch norm keeps statistics for that many)."""

    def __init__(self, classes: int, norm: str = "none", hidden_size: int = 32,
                 max_steps: int = 40, values_per_step: int = 1, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.norm, self.values_per_step = norm, values_per_step
        self.lstm = sequence_lstm(norm, values_per_step, hidden_size, max_steps, gamma_init)
        self.classifier = nn.Linear(hidden_size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.lstm(as_steps(x, self.values_per_step))[1][0][-1])


def as_steps(signals: torch.Tensor, values_per_step: int) -> torch.Tensor:
    """Signals (N, L) as a sequence (L / k, N, k) of k = ``values_per_step`` consecutive values
    per time step."""
    flat = signals.flatten(1)
    if flat.shape[1] % values_per_step:
        raise ValueError(f"a signal of {flat.shape[1]} values does not split into steps of "
                         f"{values_per_step}")
    return flat.reshape(len(flat), -1, values_per_step).transpose(0, 1)


def stretch(signals: torch.Tensor, length: int) -> torch.Tensor:
    """Signals (N, L) resampled to ``length`` points by linear interpolation (the ends kept):
    the same shapes, drawn more slowly, so a longer sequence carries the same content."""
    flat = signals.flatten(1)
    if flat.shape[1] == length:
        return flat.clone()
    return functional.interpolate(flat.unsqueeze(1), size=length, mode="linear",
                                  align_corners=True).squeeze(1)

