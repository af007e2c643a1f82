"""The recurrent experiment's models: one LSTM whose three normalizations are the only difference.

A signal of length L (a flat (N, L) vector, as the lab's MLP reads it) is read k consecutive
values per time step (L / k steps). Each step's k values first pass through one small input layer
shared by every step and every model (``embedding_size`` tanh units), then the LSTM; the
classifier sees the last hidden state. The input layer is there for the LN-LSTM: Ba et al.
normalize the input projection ``W_x x`` over its features, which for one or two raw values per
step keeps only their sign or direction and throws away their size (on MNIST-1D, 40 steps of one
value, that LN-LSTM stayed near 17% validation accuracy where the plain LSTM reached 75%). Their
inputs are wide embeddings; so are ours, and the same layer feeds all three models.

Every LSTM is our :class:`~batchnorm.variants.recurrent.BNLSTM` (its cell's equations, its
initialization: uniform input weights, orthogonal recurrent weights, the forget gate's bias at
1):

* "batch" keeps its per-time-step batch norms of the input projection, the recurrent projection
  and the cell state, gamma starting at 0.1 (Cooijmans et al.);
* "layer" puts a LayerNorm over one example's features in the same three places (Ba et al.'s
  LN-LSTM: ``W_x x`` and ``W_h h`` normalized separately, and the cell state before the output
  tanh), gain starting at 1 as theirs does; started at 0.1 it stayed near chance in 400 steps;
* "none" makes all three the identity.

Any length can be fed: batch norm beyond the trained number of steps reuses the last trained
step's statistics (see the variant's docstring).
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


def _layer_norm(features: int, gain_init: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(features)
    with torch.no_grad():
        norm.weight.fill_(gain_init)
    return norm


def sequence_lstm(norm: str, input_size: int, hidden_size: int, max_steps: int,
                  gamma_init: float, layer_gain_init: float = 1.0) -> BNLSTM:
    """A one-layer LSTM normalized by ``norm`` (one of ``SEQUENCE_NORMS``, placed as the module
    docstring says): batch norm's gamma starts at ``gamma_init``, LayerNorm's gain at
    ``layer_gain_init``."""
    if norm not in SEQUENCE_NORMS:
        raise ValueError(f"unknown norm '{norm}': expected one of {', '.join(SEQUENCE_NORMS)}")
    lstm = BNLSTM(input_size, hidden_size, max_steps, gamma_init=gamma_init)
    if norm == "batch":
        return lstm

    def make(features: int) -> nn.Module:
        if norm == "none":
            return StepFree(nn.Identity())
        return StepFree(_layer_norm(features, layer_gain_init))

    for cell in lstm.cells:
        cell.bn_ih, cell.bn_hh = make(4 * hidden_size), make(4 * hidden_size)
        cell.bn_c = make(hidden_size)
    return lstm


class SequenceClassifier(nn.Module):
    """The shared input layer, an LSTM and a linear classifier on its last hidden state (see the
    module docstring). Input: (N, L) (or any (N, ...) that flattens to it) with L a multiple of
    ``values_per_step``; ``max_steps`` is the trained length in steps (batch norm keeps
    statistics for that many)."""

    def __init__(self, classes: int, norm: str = "none", hidden_size: int = 32,
                 max_steps: int = 40, values_per_step: int = 1, gamma_init: float = 0.1,
                 embedding_size: int = 16, layer_gain_init: float = 1.0) -> None:
        super().__init__()
        self.norm, self.values_per_step = norm, values_per_step
        self.embedding = nn.Linear(values_per_step, embedding_size)
        self.lstm = sequence_lstm(norm, embedding_size, hidden_size, max_steps, gamma_init,
                                  layer_gain_init)
        self.classifier = nn.Linear(hidden_size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.tanh(self.embedding(as_steps(x, self.values_per_step)))
        return self.classifier(self.lstm(steps)[1][0][-1])


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
