r"""Batch norm in recurrent networks (Cooijmans et al. 2016).

A recurrent network's activations have different statistics at different time steps, so
:class:`RecurrentBatchNorm` keeps separate running statistics per time step up to ``max_steps``;
steps at or beyond ``max_steps`` share the last slot (in training they update it, at eval they
reuse it). The scale gamma starts at 0.1: with 1.0 the normalized pre-activations saturate the
tanh and sigmoid gates and their gradients vanish.

:class:`BNLSTMCell` normalizes the input-to-hidden and hidden-to-hidden projections separately
and the cell state before the output nonlinearity:

.. math::
    (i, f, o, g) = \mathrm{BN}(W_h h_{t-1}) + \mathrm{BN}(W_x x_t) + b, \quad
    c_t = \sigma(f) c_{t-1} + \sigma(i) \tanh(g), \quad
    h_t = \sigma(o) \tanh(\mathrm{BN}(c_t)).

Variable lengths: a boolean ``mask`` (N,) per step marks the sequences still running; the batch
statistics of that step come from them alone, and finished sequences keep their state. A step
with fewer than two running sequences normalizes with its running statistics (one value has no
variance), and does not update them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from batchnorm.core import checks
from batchnorm.core.errors import BatchNormValueError
from batchnorm.functional import batch_norm_core, commit_running_stats, validate_arguments


def _check_time_step(t: int, owner: str) -> None:
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise BatchNormValueError(f"{owner}: expected a time step t >= 0 (int), got {t!r}")


def _check_step_statistics(running_means, running_vars, input, owner) -> None:
    """The per-step running statistics: floating (max_steps, C) tensors on the input's device."""
    channels = input.shape[1]
    for what, rows in (("running_mean", running_means), ("running_var", running_vars)):
        checks.check_floating(rows, f"{owner}: {what}")
        if rows.dim() != 2 or rows.shape[0] < 1 or rows.shape[1] != channels:
            raise BatchNormValueError(
                f"{owner}: expected {what} of shape (max_steps, {channels}) (a row of running "
                f"statistics per time step, for the input's {channels} channels), got shape "
                f"{tuple(rows.shape)}"
            )
        checks.check_device(rows, input.device, what, owner)
    if running_means.shape != running_vars.shape:
        raise BatchNormValueError(
            f"{owner}: expected running_mean and running_var of the same shape, got "
            f"{tuple(running_means.shape)} and {tuple(running_vars.shape)}"
        )


def _recurrent_core(input, t, running_means, running_vars, weight, bias, training, momentum,
                    eps, mask, owner, num_batches_tracked=None):
    """Batch norm of step ``t`` against that step's row; returns what ``batch_norm_core`` does
    plus the row index. Validates every argument once, first; nothing is modified.

    ``momentum=None`` with ``num_batches_tracked`` (the module's per-step counts): the
    cumulative average of that step's batches."""
    checks.check_input(input, owner=owner)
    _check_time_step(t, owner)
    _check_step_statistics(running_means, running_vars, input, owner)
    checks.check_mask(mask, input, owner)
    step = min(t, running_means.shape[0] - 1)
    # Near the end of variable-length batches a step may hold a single running sequence, whose
    # statistics cannot be estimated: that step uses its running statistics instead.
    training = training and (mask is None or int(mask.sum()) >= 2)
    if momentum is None and num_batches_tracked is not None:
        momentum = 1.0 / (num_batches_tracked[step] + 1).to(running_means.dtype)
    validate_arguments(
        input, running_means[step], running_vars[step], weight, bias, training, momentum, eps,
        owner, mask,
    )
    # Copies: autograd saves the statistics used at this step, and the same rows are updated in
    # place at later steps of the sequence.
    result = batch_norm_core(
        input, running_means[step].clone(), running_vars[step].clone(), weight, bias,
        training=training, momentum=momentum, eps=eps, owner=owner, mask=mask,
        input_checked=True,
    )
    return (*result, step)


def recurrent_batch_norm(
    input: torch.Tensor,
    t: int,
    running_means: torch.Tensor,
    running_vars: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | torch.Tensor = 0.1,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional recurrent batch norm: batch norm of step ``t`` with that step's row of the
    (max_steps, C) running statistics (the last row for later steps), updated in place in
    training. A step with fewer than two valid rows in ``mask`` uses the running statistics."""
    output, new_mean, new_var, finite, step = _recurrent_core(
        input, t, running_means, running_vars, weight, bias, training, momentum, eps, mask,
        "recurrent_batch_norm",
    )
    commit_running_stats(running_means[step], running_vars[step], new_mean, new_var, finite,
                         "recurrent_batch_norm")
    return output


class RecurrentBatchNorm(nn.Module):
    """Batch norm with running statistics per time step; call as ``bn(x, t)`` (x: (N, C)).

    Steps ``t >= max_steps`` use the last row (see the module docstring). ``bias=False``
    (keyword-only): a scale without a shift.

    State dict: ``weight``, ``bias`` (C,), ``running_mean``, ``running_var`` (max_steps, C) and
    ``num_batches_tracked`` (max_steps,).
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        gamma_init: float = 0.1,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise BatchNormValueError(
                f"{owner}: expected max_steps >= 1 (int), got {max_steps!r}"
            )
        checks.check_construction(eps, momentum, owner)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.max_steps = num_features, max_steps
        self.eps, self.momentum, self.affine = eps, momentum, affine
        if affine:
            self.weight = nn.Parameter(torch.full((num_features,), gamma_init, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features, **factory))
        self.register_buffer("running_var", torch.ones(max_steps, num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.zeros(max_steps, dtype=torch.long, device=device)
        )

    def forward(
        self, input: torch.Tensor, t: int, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        owner = type(self).__name__
        checks.check_input(input, allowed_dims=(2,), num_features=self.num_features, owner=owner)
        parameters, buffers = self._parameters, self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        tracked = buffers["num_batches_tracked"]
        output, new_mean, new_var, finite, step = _recurrent_core(
            input, t, running_mean, running_var, parameters["weight"], parameters["bias"],
            self.training, self.momentum, self.eps, mask, owner, tracked,
        )
        if new_mean is not None:
            commit_running_stats(running_mean[step], running_var[step], new_mean, new_var,
                                 finite, owner)
            with torch.no_grad():
                tracked[step].add_(finite)  # a bool (tensor): adds 1 or 0
        return output

    def extra_repr(self) -> str:
        text = f"{self.num_features}, max_steps={self.max_steps}, eps={self.eps}"
        return text + (", bias=False" if self.affine and self.bias is None else "")


class BNLSTMCell(nn.Module):
    """One step of the batch-normalized LSTM; call as ``cell(x, (h, c), t, mask=None)``."""

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias = nn.Parameter(torch.zeros(gates))
        options = {"eps": eps, "momentum": momentum, "gamma_init": gamma_init}
        self.bn_ih = RecurrentBatchNorm(gates, max_steps, **options)
        self.bn_hh = RecurrentBatchNorm(gates, max_steps, **options)
        self.bn_c = RecurrentBatchNorm(hidden_size, max_steps, **options)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.orthogonal_(self.weight_hh)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.hidden_size : 2 * self.hidden_size] = 1.0  # forget gate opens

    def forward(self, x, state, t: int, mask: torch.Tensor | None = None):
        h, c = state
        gates = (
            self.bn_ih(x @ self.weight_ih.t(), t, mask)
            + self.bn_hh(h @ self.weight_hh.t(), t, mask)
            + self.bias
        )
        i, f, g, o = gates.chunk(4, dim=1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(self.bn_c(c_next, t, mask))
        if mask is not None:
            keep = mask.unsqueeze(1)
            h_next = torch.where(keep, h_next, h)
            c_next = torch.where(keep, c_next, c)
        return h_next, c_next


class BNLSTM(nn.Module):
    """A batch-normalized LSTM over whole sequences.

    ``forward(x, mask=None, state=None)`` with x of shape (T, N, I), or (N, T, I) when
    ``batch_first``; ``mask`` (N, T) bool marks valid steps of variable-length sequences (valid
    steps first). Returns ``(output, (h_n, c_n))``: output (T, N, H) (or batch first), zero at
    padded steps, and the state after each sequence's last valid step, per layer.
    """

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, num_layers: int = 1,
                 batch_first: bool = False, **options) -> None:
        super().__init__()
        self.hidden_size, self.num_layers, self.batch_first = hidden_size, num_layers, batch_first
        self.cells = nn.ModuleList(
            BNLSTMCell(input_size if layer == 0 else hidden_size, hidden_size, max_steps,
                       **options)
            for layer in range(num_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, state=None):
        checks.check_floating(x, "BNLSTM: input")
        if x.dim() != 3:
            raise BatchNormValueError(
                f"BNLSTM: expected 3D input, got {x.dim()}D of shape {tuple(x.shape)}"
            )
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if mask is not None and tuple(mask.shape) != (batch, steps):
            raise BatchNormValueError(
                f"BNLSTM: expected mask of shape {(batch, steps)} (batch, time), got "
                f"{tuple(mask.shape)}"
            )
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros)
        h_all, c_all = list(state[0].unbind(0)), list(state[1].unbind(0))
        layer_input = x
        for layer, cell in enumerate(self.cells):
            h, c = h_all[layer], c_all[layer]
            outputs = []
            for t in range(steps):
                valid = None if mask is None else mask[:, t]
                h, c = cell(layer_input[t], (h, c), t, valid)
                outputs.append(h if valid is None else h * valid.unsqueeze(1))
            layer_input = torch.stack(outputs)
            h_all[layer], c_all[layer] = h, c
        output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        return output, (torch.stack(h_all), torch.stack(c_all))
