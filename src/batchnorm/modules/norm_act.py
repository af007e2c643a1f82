r"""``BatchNormAct1d`` and ``BatchNormAct2d``: batch norm followed by an activation, optionally
adding a residual before it, in one pass over the data.

.. math::
    y = f\Big(\gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta
        \;[+\, r]\Big), \qquad f \in \{\mathrm{identity}, \mathrm{relu}, \mathrm{silu},
        \mathrm{gelu}\}

The modules subclass our ``BatchNorm1d/2d`` base, so parameters, buffers and state-dict keys are
exactly those of a plain batch norm (a checkpoint moves between the two freely).

On the CPU kernels, ReLU is applied as the normalized value is written; silu and gelu are
applied in place on the kernel's output by torch's vectorized operators (computing exp or erf
one value at a time inside the kernel was 4-10x slower than that extra pass). Either way the
backward recomputes the pre-activation from the saved input instead of storing a second tensor.
Elsewhere (eager, reference, a forced backend, double backward) the same result is composed
from the plain batch norm and torch's activation.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from batchnorm.core.checks import FLOATING_DTYPES, check_device
from batchnorm.core.errors import BatchNormTypeError, BatchNormValueError
from batchnorm.core.layout import values_per_channel
from batchnorm.dispatch import running_stats_updater, select_backend
from batchnorm.functional import batch_norm, validate_arguments
from batchnorm.modules.batchnorm import _BatchNorm

ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
}


def check_residual(residual: torch.Tensor | None, input: torch.Tensor, owner: str) -> None:
    """A residual is a floating tensor of exactly the input's shape, on its device: the fused
    kernels read it element for element, so nothing may broadcast."""
    if residual is None:
        return
    expected = f"a floating tensor of the input's shape {tuple(input.shape)}"
    if not isinstance(residual, torch.Tensor):
        raise BatchNormTypeError(
            f"{owner}: expected residual as {expected}, got {type(residual).__name__}"
        )
    if residual.dtype not in FLOATING_DTYPES:
        hint = (
            " (a mask? this module takes none: its second argument is the residual added "
            "before the activation)"
            if residual.dtype == torch.bool
            else ""
        )
        raise BatchNormTypeError(
            f"{owner}: expected residual as {expected}, got a {residual.dtype} tensor{hint}"
        )
    if residual.shape != input.shape:
        raise BatchNormValueError(
            f"{owner}: expected residual of the input's shape {tuple(input.shape)}, got shape "
            f"{tuple(residual.shape)}"
        )
    check_device(residual, input.device, "residual", owner)


def _composed(x, residual, weight, bias, mean, variance, eps, activation):
    """The unfused form: plain batch norm, residual add, activation (differentiable)."""
    y = batch_norm(x, mean, variance, weight, bias, training=mean is None, eps=eps)
    if residual is not None:
        y = y + residual
    return ACTIVATIONS[activation](y)


class _FusedBatchNormAct(torch.autograd.Function):
    """Fused forward and backward on a backend with ``forward``/``backward`` entry points.

    Outputs ``(y, batch_mean, batch_variance)``; the statistics are empty with given ones.
    Saves only the inputs: the backward recomputes the pre-activation from them.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, mean, variance, eps, activation, backend):
        y, batch_mean, batch_var = backend.forward(
            x, weight, bias, eps, mean=mean, variance=variance, activation=activation,
            residual=residual,
        )
        ctx.train = mean is None
        if ctx.train:
            mean, variance = batch_mean, batch_var
        else:
            batch_mean = batch_var = x.new_empty(0)
        ctx.save_for_backward(x, residual, weight, bias, mean, variance)
        ctx.eps, ctx.activation, ctx.backend = eps, activation, backend
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return y, batch_mean, batch_var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, residual, weight, bias, mean, variance = ctx.saved_tensors
        need_x, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # double backward: differentiate the composed form
            grads = _composed_gradients(ctx, grad_out, x, residual, weight, bias, mean, variance)
        else:
            dx, dw, db, dres = ctx.backend.backward(
                grad_out, x, mean, variance, weight, bias, ctx.eps,
                (need_x, need_weight, need_bias), train=ctx.train, activation=ctx.activation,
                residual=residual, need_residual=need_residual,
            )
            grads = (dx, dres, dw, db)
        grads = tuple(
            None if g is None else g.to(t.dtype)
            for g, t in zip(grads, (x, residual, weight, bias), strict=True)
        )
        return (*grads, None, None, None, None, None)


def _composed_gradients(ctx, grad_out, x, residual, weight, bias, mean, variance):
    inputs = (x, residual, weight, bias)
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[:4]) if need]
    stats = (None, None) if ctx.train else (mean, variance)
    out = _composed(x, residual, weight, bias, *stats, ctx.eps, ctx.activation)
    found = torch.autograd.grad(
        out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True
    )
    grads = [None] * 4
    for i, g in zip(wanted, found, strict=True):
        grads[i] = g
    return tuple(grads)


class _BatchNormAct(_BatchNorm):
    """Batch norm, optional residual add, activation; fused where the backend allows."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "relu",
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise BatchNormValueError(
                f"{type(self).__name__}: unknown activation {activation!r}; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(BN(input) + residual)``; ``residual`` has the input's shape, or is None.

        Everything is checked before the running statistics are touched."""
        owner = type(self).__name__
        self._check_input_dim(input)
        check_residual(residual, input, owner)
        backend = select_backend(input)
        # A residual of another floating dtype is added as torch would (promoting), unfused.
        fusable = self.activation in getattr(backend, "ACTIVATIONS", ()) and (
            residual is None or residual.dtype == input.dtype
        )
        if not fusable:
            y = super().forward(input)  # plain batch norm validates its own arguments
            if residual is not None:
                y = y + residual
            return ACTIVATIONS[self.activation](y)
        parameters, buffers = self._parameters, self._buffers
        weight, bias = parameters["weight"], parameters["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        updating = self.training and self.track_running_stats and running_mean is not None
        use_batch_stats = self.training or running_mean is None
        momentum = self._momentum_now() if updating else 0.0
        validate_arguments(
            input, running_mean, running_var, weight, bias, use_batch_stats, momentum, self.eps,
            owner, None, input_checked=True,  # the module's rule ran above
        )
        stats = (None, None) if use_batch_stats else (running_mean, running_var)
        arguments = (input, residual, weight, bias, *stats, self.eps, self.activation)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in arguments[:4]
        )
        if needs_grad:
            y, mean, variance = _FusedBatchNormAct.apply(*arguments, backend)
        else:
            y, mean, variance = backend.forward(
                input, weight, bias, self.eps, mean=stats[0], variance=stats[1],
                activation=self.activation, residual=residual,
            )
        if updating:
            new_mean, new_var, finite = running_stats_updater(input)(
                running_mean, running_var, mean, variance, momentum, values_per_channel(input),
                in_place=True,
            )
            self._commit_running_stats(new_mean, new_var, finite)
        return y


class BatchNormAct1d(_BatchNormAct):
    r"""Batch norm over (N, C) or (N, C, L), then an activation (optionally after adding a
    residual).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as for ``BatchNorm1d``.
        activation: "relu" (default), "silu", "gelu" or "identity".
        bias (keyword-only): learn the shift beta; ``bias=False`` keeps the scale only, with no
            ``bias`` in the state dict (as torch's batch norms). Default: True.

    Shape: input (N, C) or (N, C, L); residual (if given) and output the same. The residual must
    be a floating tensor of exactly the input's shape, on its device (nothing broadcasts); there
    is no mask argument.

    Example::

        >>> layer = BatchNormAct1d(16, activation="silu")
        >>> layer(torch.randn(32, 16)).shape
        torch.Size([32, 16])
    """

    _allowed_dims = (2, 3)


class BatchNormAct2d(_BatchNormAct):
    r"""Batch norm over (N, C, H, W), contiguous or channels_last, then an activation
    (optionally after adding a residual, as at the end of a ResNet block).

    Arguments as for :class:`BatchNormAct1d`. Shape: input (N, C, H, W); residual (if given)
    and output the same.

    Example::

        >>> layer = BatchNormAct2d(8)
        >>> x, shortcut = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
        >>> bool((layer(x, shortcut) >= 0).all())
        True
    """

    _allowed_dims = (4,)
