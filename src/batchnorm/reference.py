r"""A NumPy float64 implementation of batch norm: the oracle the tests compare against.

It is written independently of the torch code, straight from the equations, with no attention
to speed. Arrays are laid out (N, C, *spatial); statistics are per channel.
"""

from __future__ import annotations

import numpy as np


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def moments(x: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    r"""Per-channel mean and biased variance, over the valid positions when a mask is given.

    .. math::
        \mu_c = \frac{1}{n}\sum_{i \in V} x_{ic}, \qquad
        \sigma^2_c = \frac{1}{n}\sum_{i \in V} (x_{ic} - \mu_c)^2, \qquad n = |V|
    """
    x = np.asarray(x, dtype=np.float64)
    # Move channels last and keep only the valid rows: a plain (n, C) table of values.
    table = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if mask is not None:
        table = table[np.asarray(mask, dtype=bool).reshape(-1)]
    mean = table.mean(axis=0)
    var = ((table - mean) ** 2).mean(axis=0)
    return mean, var


def forward(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
) -> np.ndarray:
    r"""Normalize with the given statistics, then scale and shift.

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta
    """
    x = np.asarray(x, dtype=np.float64)
    x_hat = (x - _per_channel(mean, x.ndim)) / np.sqrt(_per_channel(var, x.ndim) + eps)
    if weight is not None:
        x_hat = x_hat * _per_channel(weight, x.ndim)
    if bias is not None:
        x_hat = x_hat + _per_channel(bias, x.ndim)
    return x_hat


def forward_train(x, weight, bias, eps, mask=None):
    """Training forward: batch statistics. Returns (y, mean, biased variance)."""
    mean, var = moments(x, mask)
    return forward(x, mean, var, weight, bias, eps), mean, var


def backward_train(grad_out, x, weight, eps, mask=None):
    r"""Gradients when the statistics are the batch's own (they depend on x).

    With :math:`\hat x = (x-\mu)/\sqrt{\sigma^2+\epsilon}` and :math:`g = \partial L/\partial y`:

    .. math::
        \partial_\beta L = \sum g, \quad \partial_\gamma L = \sum g \hat x, \quad
        \partial_x L = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}
        \Big(g - \overline{g} - \hat x\, \overline{g \hat x}\Big)

    where the bars are per-channel means over the n values. With a mask the statistics use the
    n valid positions; every output still depends on them, so the sums run over all positions,
    are divided by n, and only valid inputs get the two correction terms.
    Returns (dx, dweight, dbias).
    """
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(grad_out, dtype=np.float64)
    axes = _axes(x)
    mean, var = moments(x, mask)
    valid = np.ones((x.shape[0], 1, *x.shape[2:]), dtype=bool) if mask is None else (
        np.expand_dims(np.asarray(mask, dtype=bool), 1)
    )
    count = valid.sum()
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    gamma = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64)
    # a padded position whose output got no gradient contributes nothing, whatever it holds
    g_x_hat = np.where(valid | (g != 0), g * np.where(valid | (g != 0), x_hat, 0.0), 0.0)
    mean_g = g.sum(axis=axes, keepdims=True) / count
    mean_g_xhat = g_x_hat.sum(axis=axes, keepdims=True) / count
    correction = np.where(valid, mean_g + np.where(valid, x_hat, 0.0) * mean_g_xhat, 0.0)
    dx = _per_channel(gamma * invstd, x.ndim) * (g - correction)
    return dx, g_x_hat.sum(axis=axes), g.sum(axis=axes)


def backward_eval(grad_out, x, mean, var, weight, eps):
    r"""Gradients with fixed statistics: :math:`\partial_x L = \gamma g / \sqrt{\sigma^2+\epsilon}`.

    Returns (dx, dweight, dbias).
    """
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(grad_out, dtype=np.float64)
    axes = _axes(x)
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    x_hat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    gamma = np.ones_like(invstd) if weight is None else np.asarray(weight, dtype=np.float64)
    dx = g * _per_channel(gamma * invstd, x.ndim)
    return dx, (g * x_hat).sum(axis=axes), g.sum(axis=axes)


def update_running(running_mean, running_var, batch_mean, batch_var, count, momentum):
    r"""One running-statistics update (torch's convention: momentum weighs the new batch).

    .. math::
        \hat\mu \leftarrow (1-m)\hat\mu + m\mu_B, \quad
        \hat\sigma^2 \leftarrow (1-m)\hat\sigma^2 + m\frac{n}{n-1}\sigma_B^2
    """
    new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * batch_mean
    new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * (
        batch_var * count / (count - 1)
    )
    return new_mean, new_var
