r"""``BatchNormAct1d`` and ``BatchNormAct2d``: batch norm followed by an activation, optionally
adding a residual before it, in one pass over the data.

.. math::
    y = f\Big(\gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta
        \;[+\, r]\Big), \qquad f \in \{\mathrm{identity}, \mathrm{relu}, \mathrm{silu},
        \mathrm{gelu}, \mathrm{leaky\_relu}\}

The modules subclass our ``BatchNorm1d/2d`` base, so parameters, buffers and state-dict keys are
exactly those of a plain batch norm (a checkpoint moves between the two freely).

On the CPU kernels, ReLU is applied as the normalized value is written; silu and gelu are
applied in place on the kernel's output by torch's vectorized operators (computing exp or erf
one value at a time inside the kernel was 4-10x slower than that extra pass). Either way the
backward recomputes the pre-activation from the saved input instead of storing a second tensor.
Elsewhere (eager, reference, a forced backend, double backward, leaky ReLU) the same result is
composed from the plain batch norm and torch's activation.

The calls a model makes most take plain batch norm's shortest paths (``batchnorm.modules.
batchnorm``): an eval forward and a training step with running statistics are each accepted
whole by the backend and computed in one call (for a training step: output, batch statistics,
running statistics and the count of batches), and that step's backward, for identity and ReLU,
asks only about the incoming gradient before its kernel.

In-place activated batch norm (``inplace=True``, after Rota Bulo et al. 2018, "In-Place Activated
BatchNorm"): the output is written over the input and is the only full-size tensor kept for the
backward, with the per-channel :math:`1/\sqrt{\sigma^2+\epsilon}`, :math:`\gamma` and
:math:`\beta`. The backward recovers what it needs by inverting the two last steps:

.. math::
    z = f^{-1}(y), \qquad x - \mu = \frac{z - \beta}{\gamma / \sqrt{\sigma^2 + \epsilon}},

then runs the core's closed-form backward (``batchnorm.core.normalize``) on that centred input,
with :math:`\partial L/\partial z = f'(z)\,\partial L/\partial y`. Batch norm followed by an
activation keeps two full tensors for the backward (the batch norm's input and the
activation's); this keeps one. Only invertible activations qualify: identity, and leaky ReLU
with a slope > 0 (:math:`f^{-1}(y) = y` for :math:`y > 0`, :math:`y/a` otherwise). ReLU is not
invertible (every negative input gives 0, so the backward could not tell them apart), nor are
SiLU and GELU (not one-to-one); ``inplace=True`` refuses them.

A gain :math:`\gamma` of zero cannot be inverted, and one near zero amplifies the rounding of the
stored output (the recovered value is off by about :math:`u\,(|z| + |\beta|)/|\gamma|`, u the unit
roundoff of the output's dtype). The rule: a channel with
:math:`|\gamma| < t\,(1 + |\beta|)` (t = 1e-3 for float32 outputs, 1e-6 for float64, 0.1 for
float16 and bfloat16; :data:`RECOVERY_TOLERANCE`) keeps an exact copy of its centred input
instead, so gradients stay exact for every weight, zero included, and the forward is plain batch
norm's (unlike in-place ABN's :math:`|\gamma| + \epsilon`); only those channels cost memory.
Recovered channels are off by at most about :math:`2u/t` (1e-4 in float32) in the normalized
input. Finding those channels reads one bool per layer per step (a host synchronisation on an
accelerator).
"""

from __future__ import annotations

import functools
import math
import types

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from batchnorm.autograd import call_backward_directly
from batchnorm.core.checks import FLOATING_DTYPES, check_device
from batchnorm.core.context import is_functorch_wrapped, is_legacy_batched, transforms_active
from batchnorm.core.errors import BatchNormTypeError, BatchNormValueError
from batchnorm.core.layout import accumulation_dtype, as_channel, values_per_channel
from batchnorm.core.normalize import eval_backward, inverse_std, train_backward
from batchnorm.dispatch import running_stats_updater, select_backend
from batchnorm.functional import (
    NATIVE_ACTIVATIONS,
    batch_norm,
    common_step,
    native_step,
    normalize_common,
    normalize_with,
    normalize_with_batch_statistics,
    validate_arguments,
    wants_grad,
)
from batchnorm.modules.batchnorm import _SINGLE_SAMPLE_CHOICES, _BatchNorm
from batchnorm.tracing import is_proxy, record_as_leaf

try:  # the CPU kernels' backend: its compiled call path hands some backwards back here
    from batchnorm.backends import cpu as _cpu
except Exception:  # noqa: BLE001 - as batchnorm.dispatch: no kernels, the eager backend serves
    _cpu = None

ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,  # with the module's negative_slope (see activate)
}
# The activations an in-place layer can invert, to recover its input from its output.
INVERTIBLE = ("identity", "leaky_relu")
DEFAULT_NEGATIVE_SLOPE = 0.01  # torch.nn.LeakyReLU's
# Below t * (1 + |beta|), a channel's gain is not inverted (see the module docstring).
RECOVERY_TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 1e-1,
    torch.bfloat16: 1e-1,
}


def activate(t: torch.Tensor, activation: str, negative_slope: float | None) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(t, negative_slope)
    return ACTIVATIONS[activation](t)


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
    """The unfused form: plain batch norm, residual add, activation (differentiable). Only the
    backends' activations come here, which take no slope."""
    y = batch_norm(x, mean, variance, weight, bias, training=mean is None, eps=eps)
    if residual is not None:
        y = y + residual
    return ACTIVATIONS[activation](y)


def check_activation(activation: str, negative_slope: float | None, inplace: bool,
                     owner: str) -> None:
    """The activation is known; a slope goes with leaky ReLU only, and is a finite number (> 0
    when the layer must invert it); ``inplace=True`` takes invertible activations only."""
    if activation not in ACTIVATIONS:
        raise BatchNormValueError(
            f"{owner}: unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    if not isinstance(inplace, bool):
        raise BatchNormTypeError(f"{owner}: expected inplace as a bool, got {inplace!r}")
    if negative_slope is not None:
        if activation != "leaky_relu":
            raise BatchNormValueError(
                f"{owner}: negative_slope applies to activation='leaky_relu' only, got "
                f"negative_slope={negative_slope!r} with activation={activation!r}"
            )
        if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
            raise BatchNormTypeError(
                f"{owner}: expected negative_slope as a number, got "
                f"{type(negative_slope).__name__}"
            )
        if not math.isfinite(negative_slope):
            raise BatchNormValueError(
                f"{owner}: expected a finite negative_slope, got {negative_slope!r}"
            )
    if not inplace:
        return
    if activation not in INVERTIBLE:
        raise BatchNormValueError(
            f"{owner}: inplace=True needs an invertible activation (the backward recovers the "
            f"input from the output), got {activation!r}, which is not: "
            + (
                "ReLU maps every negative value to 0, so they cannot be told apart. "
                if activation == "relu"
                else f"{activation} is not one-to-one. "
            )
            + "Use activation='leaky_relu' (negative_slope > 0) or 'identity', or inplace=False"
        )
    slope = DEFAULT_NEGATIVE_SLOPE if negative_slope is None else negative_slope
    if activation == "leaky_relu" and not slope > 0:
        raise BatchNormValueError(
            f"{owner}: inplace=True needs negative_slope > 0 (leaky ReLU is invertible only "
            f"then; a slope of 0 is ReLU), got {negative_slope!r}"
        )


def _unrecoverable_channels(
    weight: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Indices of the channels whose gain is too small to invert (see the module docstring),
    or None when there are none."""
    if weight is None:  # no affine: the gain is 1/std, never small
        return None
    bound = RECOVERY_TOLERANCE[dtype]
    magnitude = weight.detach().abs()
    if bias is not None:
        small = magnitude < bound * (1 + bias.detach().abs())
    else:
        small = magnitude < bound
    if not bool(small.any()):
        return None
    return small.nonzero().flatten()


def _in_place_forward(x, weight, bias, mean, variance, eps, negative_slope, for_backward=True):
    """``f(BN(x))`` written into ``x``. Returns ``(x, batch mean, batch variance, inverse std,
    kept channels, their centred input)``; the batch statistics are empty with given ones, and
    the last three None unless ``for_backward``."""
    train = mean is None
    if train:
        output, mean, variance = normalize_with_batch_statistics(x, weight, bias, eps)
        batch_mean, batch_var = mean, variance
    else:
        output = normalize_with(x, mean, variance, weight, bias, eps)
        batch_mean = batch_var = x.new_empty(0)
    invstd = kept_channels = kept = None
    if for_backward:
        acc = accumulation_dtype(x.dtype)
        invstd = inverse_std(variance.to(acc), eps)
        kept_channels = _unrecoverable_channels(weight, bias, x.dtype)
    if kept_channels is not None:  # their centred input, before x is overwritten
        kept = x.index_select(1, kept_channels).to(acc)
        kept -= as_channel(mean.to(acc).index_select(0, kept_channels), kept)
    if negative_slope is not None:
        output = F.leaky_relu_(output, negative_slope)
    x.copy_(output)
    return x, batch_mean, batch_var, invstd, kept_channels, kept


class _InPlaceBatchNormAct(torch.autograd.Function):
    """``f(BN(x))`` over ``x``, saving only the output and per-channel tensors; the backward
    inverts f and the affine map to recover ``x - mean`` (see the module docstring).

    First-order only: double backward (a gradient penalty) needs ``inplace=False``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, variance, eps, negative_slope):
        ctx.train = mean is None
        y, batch_mean, batch_var, invstd, kept_channels, kept = _in_place_forward(
            x, weight, bias, mean, variance, eps, negative_slope
        )
        ctx.mark_dirty(x)
        ctx.mark_non_differentiable(batch_mean, batch_var)
        ctx.save_for_backward(y, invstd, weight, bias, kept_channels, kept)
        ctx.negative_slope = negative_slope
        return y, batch_mean, batch_var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        y, invstd, weight, bias, kept_channels, kept = ctx.saved_tensors
        slope = ctx.negative_slope
        acc = invstd.dtype
        pre_activation = y.to(acc)
        if slope is not None:  # leaky ReLU: y > 0 exactly where its input was
            negative = y <= 0
            pre_activation = torch.where(negative, pre_activation / slope, pre_activation)
            grad_out = torch.where(negative, grad_out * slope, grad_out)
        gain = invstd if weight is None else invstd * weight.to(acc)
        if kept_channels is not None:  # never divide by a gain held below the tolerance
            gain = gain.index_fill(0, kept_channels, 1.0)
        offset = 0.0 if bias is None else as_channel(bias.to(acc), y)
        # a new tensor (never the saved output itself), divided in place
        centred = torch.sub(pre_activation, offset).div_(as_channel(gain, y))
        if kept_channels is not None:
            centred.index_copy_(1, kept_channels, kept)
        # The core's closed-form backward, given the input with its mean already taken out:
        # it reads x only through x - mean.
        zero_mean = invstd.new_zeros(invstd.shape)
        needs = tuple(ctx.needs_input_grad[:3])
        backward = train_backward if ctx.train else eval_backward
        grad_input, grad_weight, grad_bias = backward(
            grad_out, centred, zero_mean, invstd, weight, needs
        )
        grads = tuple(
            None if g is None or t is None else g.to(t.dtype)
            for g, t in zip((grad_input, grad_weight, grad_bias), (y, weight, bias), strict=True)
        )
        return (*grads, None, None, None, None)


class _FusedBatchNormAct(torch.autograd.Function):
    """Fused forward and backward on a backend with ``forward``/``backward`` entry points.

    With batch statistics and an ``update`` (running mean, running variance, momentum, count,
    checked, count of batches), the forward also writes the running statistics in place, as
    plain batch norm's training step does (``batchnorm.autograd.apply_train_update``): in the
    same backend call where the backend offers ``train_forward_update``. ``checked``: the
    backend accepted the call as its common one (``batchnorm.functional.common_step``), so it
    asks nothing again, forward or backward, and counts the batch itself. Outputs ``(y,
    finite)``, ``finite`` the backend's flag for that update (None without one). Saves only the
    inputs: the backward recomputes the pre-activation from them.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, mean, variance, eps, activation, backend,
                update):
        ctx.train = mean is None
        y, mean, variance, finite, ctx.checked = _fused_forward(
            x, residual, weight, bias, mean, variance, eps, activation, backend, update
        )
        if isinstance(finite, torch.Tensor):
            ctx.mark_non_differentiable(finite)
        ctx.save_for_backward(x, residual, weight, bias, mean, variance)
        ctx.eps, ctx.activation, ctx.backend = eps, activation, backend
        ctx.set_materialize_grads(False)
        return y, finite

    @staticmethod
    def backward(ctx, grad_out, _grad_finite):
        if grad_out is None:  # no gradient reached the output
            return (None,) * 10
        x, residual, weight, bias, mean, variance = ctx.saved_tensors
        need_x, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        # Asked once, inline (a frame less on every backward, as plain batch norm's common
        # step asks them in ``batchnorm.autograd._BatchNormTrainUpdate``): a double backward,
        # and a batched incoming gradient (a vmapped backward: autograd.grad(...,
        # is_grads_batched=True), vectorized Jacobians, gradcheck's batched check), which has
        # no memory a kernel could read.
        double = torch.is_grad_enabled()
        batched = transforms_active() or is_functorch_wrapped(grad_out) or is_legacy_batched(
            grad_out)
        if ctx.checked and not (double or batched):
            # a common step's (no residual; its tensors of x's dtype): the backend's shortest
            # backward, for the activations its kernels fuse
            grads = ctx.backend.backward_common(
                grad_out, x, mean, variance, weight, bias, ctx.eps,
                (need_x, need_weight, need_bias), ctx.activation,
            )
            if grads is not None:
                return (grads[0], None, grads[1], grads[2], None, None, None, None, None, None)
        if double:  # differentiate the composed form
            grads = _composed_gradients(ctx, grad_out, x, residual, weight, bias, mean, variance)
        elif batched:
            # the composed form's gradients, as plain batch norm's general path takes them
            # (batchnorm.autograd._run_backward): its graph is built, its gradients' is not (no
            # double backward was asked for)
            with torch.enable_grad():
                grads = _composed_gradients(ctx, grad_out, x, residual, weight, bias, mean,
                                            variance, create_graph=False)
        else:
            dx, dw, db, dres = ctx.backend.backward(
                grad_out, x, mean, variance, weight, bias, ctx.eps,
                (need_x, need_weight, need_bias), train=ctx.train, activation=ctx.activation,
                residual=residual, need_residual=need_residual,
                # (the statistics and parameters a common step's backend accepted, saved)
                **({"checked": True} if ctx.checked else {}),
            )
            grads = (dx, dres, dw, db)
        grads = tuple(
            None if g is None else g.to(t.dtype)
            for g, t in zip(grads, (x, residual, weight, bias), strict=True)
        )
        return (*grads, None, None, None, None, None, None)


def _fused_forward(x, residual, weight, bias, mean, variance, eps, activation, backend, update):
    """The forward of :class:`_FusedBatchNormAct` (its arguments), with or without autograd:
    ``(y, mean, variance, finite, checked)``, the statistics the backward reads (the batch's,
    or the given ones), ``finite`` the update's flag (None without an update) and ``checked``
    whether the backend took the call as its common one."""
    one_call = getattr(backend, "train_forward_update", None) if update is not None else None
    if one_call is not None:  # the output and both statistics in one backend call
        running_mean, running_var, momentum, count, checked, tracked = update
        y, mean, variance, finite = one_call(
            x, weight, bias, eps, running_mean, running_var, momentum, count,
            **({"checked": True, "tracked": tracked} if checked else {}),
            activation=activation, residual=residual,
        )
        return y, mean, variance, finite, checked
    y, batch_mean, batch_var = backend.forward(
        x, weight, bias, eps, mean=mean, variance=variance, activation=activation,
        residual=residual,
    )
    finite = None
    if mean is None:
        mean, variance = batch_mean, batch_var
        if update is not None:
            running_mean, running_var, momentum, count = update[:4]
            _, _, finite = backend.updated_running_stats(
                running_mean, running_var, mean, variance, momentum, count, in_place=True
            )
    return y, mean, variance, finite, False


call_backward_directly(_FusedBatchNormAct)

# The common training step applies the Function with torch's own apply, without
# ``Function.apply``'s Python wrapper (as ``batchnorm.autograd`` does for plain batch norm's).
try:
    _apply_fused_step = super(torch.autograd.Function, _FusedBatchNormAct).apply
except AttributeError:  # a torch whose Function has no C apply below it
    _apply_fused_step = _FusedBatchNormAct.apply


def _native_step_grads(grad_out, x, weight, bias, mean, variance, eps, needs,
                       activation="relu"):
    """(dx, dweight, dbias) of a fused common step taken by the compiled call path
    (``batchnorm.backends.cpu.native``), for what its autograd node hands back (a double
    backward, a batched or opaque gradient, a transform active, a gradient of another layout):
    what :class:`_FusedBatchNormAct`'s backward answers for the same step, which saved the
    same tensors."""
    need_x, need_weight, need_bias = needs
    ctx = types.SimpleNamespace(
        saved_tensors=(x, None, weight, bias, mean, variance),
        needs_input_grad=(need_x, False, need_weight, need_bias), checked=True,
        backend=_cpu, eps=eps, activation=activation, train=True,
    )
    grads = _FusedBatchNormAct.backward(ctx, grad_out, None)
    return grads[0], grads[2], grads[3]


if _cpu is not None:
    for _activation in ("relu", "silu", "gelu"):
        _cpu.native_path.register_backward_fallback(
            NATIVE_ACTIVATIONS[_activation],
            functools.partial(_native_step_grads, activation=_activation),
        )


def _composed_gradients(ctx, grad_out, x, residual, weight, bias, mean, variance,
                        create_graph=True):
    inputs = (x, residual, weight, bias)
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[:4]) if need]
    stats = (None, None) if ctx.train else (mean, variance)
    if not create_graph and transforms_active():
        # a backward vmapped by torch.func (vmap over autograd.grad): autograd.grad of a graph
        # rebuilt under the vmap has no batching rule, torch.func's vjp of the same form has
        def form(*wanted_inputs):
            given = list(inputs)
            for i, value in zip(wanted, wanted_inputs, strict=True):
                given[i] = value
            return _composed(*given, *stats, ctx.eps, ctx.activation)

        _, pullback = torch.func.vjp(form, *(inputs[i].detach() for i in wanted))
        found = pullback(grad_out)
    else:
        out = _composed(x, residual, weight, bias, *stats, ctx.eps, ctx.activation)
        found = torch.autograd.grad(
            out, [inputs[i] for i in wanted], grad_out, create_graph=create_graph,
            allow_unused=True,
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
        negative_slope: float | None = None,
        inplace: bool = False,
    ) -> None:
        check_activation(activation, negative_slope, inplace, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.activation = activation
        if activation == "leaky_relu" and negative_slope is None:
            negative_slope = DEFAULT_NEGATIVE_SLOPE
        self.negative_slope = None if negative_slope is None else float(negative_slope)
        self.inplace = inplace

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation}"
        if self.negative_slope is not None:
            text += f", negative_slope={self.negative_slope}"
        return text + (", inplace=True" if self.inplace else "")

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return activate(y, self.activation, self.negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(BN(input) + residual)``; ``residual`` has the input's shape, or is None.

        Everything is checked before the running statistics are touched."""
        if is_proxy(input):  # torch.fx: one call_module node, as torch's batch norms
            return record_as_leaf(self, input, *(() if residual is None else (residual,)))
        if (
            # the common inference call, checked and computed in one functional call (see
            # batchnorm.modules.batchnorm); any other is validated in full below
            not self.training
            and residual is None
            and not self.inplace
            and self._common_input(input)
        ):
            buffers, parameters = self._buffers, self._parameters
            running_mean = buffers["running_mean"]
            if running_mean is not None:
                output = normalize_common(
                    input, running_mean, buffers["running_var"], parameters["weight"],
                    parameters["bias"], self.eps, self.activation,
                )
                if output is not None:
                    return output
        if (
            # the common training step: checked by the backend that computes it, in one call
            self.training
            and residual is None
            and not self.inplace
            and self._plain_core
            and self.track_running_stats
            and self.single_sample in _SINGLE_SAMPLE_CHOICES  # (else named on the path below)
            and self._common_input(input)
        ):
            output = self._common_step(input)
            if output is not None:
                return output
        owner = type(self).__name__
        self._check_input_dim(input)
        check_residual(residual, input, owner)
        if self.inplace:
            return self._forward_in_place(input, residual)
        backend = select_backend(input)
        # A residual of another floating dtype is added as torch would (promoting), unfused.
        fusable = self.activation in getattr(backend, "ACTIVATIONS", ()) and (
            residual is None or residual.dtype == input.dtype
        )
        if not fusable:
            y = super().forward(input)  # plain batch norm validates its own arguments
            if residual is not None:
                y = y + residual
            return self._activate(y)
        weight, bias, stats, momentum = self._plan(input)
        arguments = (input, residual, weight, bias, *stats, self.eps, self.activation)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in arguments[:4]
        )
        update = None
        if momentum is not None:  # the running statistics are updated by the same forward
            buffers = self._buffers
            update = (buffers["running_mean"], buffers["running_var"], momentum,
                      values_per_channel(input), False, None)
        if needs_grad:
            y, finite = _FusedBatchNormAct.apply(*arguments, backend, update)
        else:
            y, _, _, finite, _ = _fused_forward(*arguments, backend, update)
        if update is not None:
            self._commit_running_stats(update[0], update[1], finite)
        return y

    def _common_step(self, input: torch.Tensor) -> torch.Tensor | None:
        """The output of a common training step (``batchnorm.functional.common_step``; the
        backend's one call computes the output and updates the running statistics and the
        count of batches), or None for the general path."""
        buffers, parameters = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        if running_mean is None:
            return None
        weight, bias, tracked = parameters["weight"], parameters["bias"], buffers[
            "num_batches_tracked"]
        done = native_step(input, running_mean, running_var, weight, bias, self.eps,
                           self.momentum, tracked, self.activation)
        if done is not None:  # (the compiled call path took it)
            if done[1] is not True:  # (a finite batch is counted by the same call)
                self._commit_running_stats(running_mean, running_var, done[1])
            return done[0]
        step = common_step(input, weight, bias, running_mean, running_var, self.eps,
                           self.momentum, tracked, self.activation)
        if step is None:
            return None
        backend, count = step
        arguments = (input, None, weight, bias, None, None, self.eps, self.activation, backend,
                     (running_mean, running_var, self.momentum, count, True, tracked))
        if wants_grad(input, weight, bias):
            y, finite = _apply_fused_step(*arguments)
        else:
            y, _, _, finite, _ = _fused_forward(*arguments)
        if finite is not True:  # (a finite batch is counted by the same call)
            self._commit_running_stats(running_mean, running_var, finite)
        return y

    def _plan(self, input: torch.Tensor):
        """What a fused or in-place call uses, every argument validated once (the input's own
        rule has run): ``(weight, bias, (mean, variance) given or (None, None) for batch
        statistics, momentum or None when the running statistics are not updated)``."""
        parameters, buffers = self._parameters, self._buffers
        weight, bias = parameters["weight"], parameters["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        updating = self.training and self.track_running_stats and running_mean is not None
        use_batch_stats = self.training or running_mean is None
        if use_batch_stats and self._single_sample_uses_running(input, None, running_mean):
            updating = use_batch_stats = False
        momentum = self._momentum_now() if updating else 0.0
        validate_arguments(
            input, running_mean, running_var, weight, bias, use_batch_stats, momentum, self.eps,
            type(self).__name__, None, input_checked=True,
        )
        stats = (None, None) if use_batch_stats else (running_mean, running_var)
        return weight, bias, stats, momentum if updating else None

    def _update_running_stats(self, input, mean, variance, momentum) -> None:
        if momentum is None:
            return
        buffers = self._buffers
        new_mean, new_var, finite = running_stats_updater(input)(
            buffers["running_mean"], buffers["running_var"], mean, variance, momentum,
            values_per_channel(input), in_place=True,
        )
        self._commit_running_stats(new_mean, new_var, finite)

    def _forward_in_place(self, input: torch.Tensor, residual: torch.Tensor | None):
        """``inplace=True``: the output is written over ``input`` (see the module docstring)."""
        owner = type(self).__name__
        if residual is not None:
            raise BatchNormValueError(
                f"{owner}: inplace=True takes no residual: recovering the normalized input in "
                "the backward would need the residual kept, which is the memory in-place saves; "
                "add it after an activation='identity' layer, or use inplace=False"
            )
        if input.numel() == 0:  # nothing to overwrite; counted as plain batch norm counts it
            return self._activate(super().forward(input))
        weight, bias, stats, momentum = self._plan(input)
        if torch.is_grad_enabled() and input.requires_grad:
            base = input if input._base is None else input._base
            if base.is_leaf:
                raise BatchNormValueError(
                    f"{owner}: inplace=True overwrites its input, which here is a leaf tensor that "
                    "requires grad (or a view of one); autograd cannot differentiate it after "
                    "that. Pass the output of a layer (or input.clone()), or use inplace=False"
                )
        slope = self.negative_slope if self.activation == "leaky_relu" else None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, weight, bias)
        )
        if needs_grad:
            y, mean, variance = _InPlaceBatchNormAct.apply(
                input, weight, bias, *stats, self.eps, slope
            )
        else:
            y, mean, variance, *_ = _in_place_forward(
                input, weight, bias, *stats, self.eps, slope, for_backward=False
            )
        self._update_running_stats(input, mean, variance, momentum)
        return y


class BatchNormAct1d(_BatchNormAct):
    r"""Batch norm over (N, C) or (N, C, L), then an activation (optionally after adding a
    residual).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as for ``BatchNorm1d``.
        activation: "relu" (default), "silu", "gelu", "leaky_relu" or "identity".
        bias (keyword-only): learn the shift beta; ``bias=False`` keeps the scale only, with no
            ``bias`` in the state dict (as torch's batch norms). Default: True.
        negative_slope (keyword-only): leaky ReLU's slope for negative inputs (only with
            ``activation="leaky_relu"``). Default: 0.01, torch's.
        inplace (keyword-only): write the output over the input and keep only the output for
            the backward, about half the memory of batch norm followed by the activation
            (identity or leaky ReLU with a slope > 0 only; no residual; first-order gradients
            only). The input must not be a leaf that requires grad, nor be needed by another
            layer's backward (autograd then reports the overwrite). Default: False.

    Shape: input (N, C) or (N, C, L); residual (if given) and output the same. The residual must
    be a floating tensor of exactly the input's shape, on its device (nothing broadcasts); there
    is no mask argument.

    Example::

        >>> layer = BatchNormAct1d(16, activation="silu")
        >>> layer(torch.randn(32, 16)).shape
        torch.Size([32, 16])
        >>> saving = BatchNormAct1d(16, activation="leaky_relu", inplace=True)
        >>> x = torch.randn(32, 16)
        >>> saving(x) is x
        True
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
