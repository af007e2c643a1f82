r"""Functional batch norm.

:func:`batch_norm` has the semantics of ``torch.nn.functional.batch_norm``; :func:`batch_norm_pure`
computes the same thing without modifying anything and returns the new running statistics, so it
works under ``torch.func`` transforms (vmap, grad, functional_call) where an in-place update of a
buffer cannot.

.. math::
    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta
"""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad

from batchnorm.autograd import apply_eval, apply_train, apply_train_update
from batchnorm.backends import traceable
from batchnorm.core import checks, running
from batchnorm.core.errors import BatchNormValueError
from batchnorm.core.layout import as_channel, valid_per_channel
from batchnorm.dispatch import Backend, common_backend, select_backend

Momentum = float | torch.Tensor


def validate_arguments(
    input, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps, owner, mask,
    input_checked: bool = False,
) -> None:
    """The checks every batch norm runs, once per call, before computing or modifying anything:
    the input (unless ``input_checked``: a module has applied its own rule), running statistics
    that the call updates in place (not inference tensors outside inference mode), every
    per-channel tensor (shape, floating dtype, the input's device), the mask, momentum, eps, and
    the batch-size rule where batch statistics are used."""
    if not input_checked:
        checks.check_input(input, owner=owner)
    if use_batch_stats and running_mean is not None:  # (updated in place by this call)
        checks.check_running_stats_writable(running_mean, running_var, owner)
    if (
        mask is None
        and forward_ad._current_level < 0  # (else a tangent on the statistics is refused)
        and checks.accepts_common_call(
            input, running_mean, running_var, weight, bias, momentum, eps, use_batch_stats
        )
    ):
        return  # everything below would pass (the common call, answered in one function)
    channels, device = input.shape[1], input.device
    checks.check_mask(mask, input, owner)
    if (running_mean is None) != (running_var is None):
        raise BatchNormValueError(
            f"{owner}: expected running_mean and running_var both given or both None, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    checks.check_per_channel(running_mean, channels, "running_mean", owner, device)
    checks.check_per_channel(running_var, channels, "running_var", owner, device)
    checks.check_per_channel(weight, channels, "weight", owner, device)
    checks.check_per_channel(bias, channels, "bias", owner, device)
    checks.check_momentum(momentum, owner, device)
    checks.check_eps(eps, owner, use_batch_stats)
    checks.check_no_statistics_tangent(input, running_mean, running_var, owner)
    if use_batch_stats:
        checks.check_batch_statistics_possible(input, owner, mask)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether the autograd Functions must run: a gradient to compute, or forward-mode AD (a
    dual tensor carries its tangent invisibly: a kernel reading memory would drop it).

    Without either, the backend is called directly: autograd.Function costs tens of
    microseconds per call, which dominates small inputs in inference. (Under torch.func
    transforms the eager path runs, whose operations the transforms differentiate.)

    Never while a graph is captured (``torch.export``, ``torch.jit.trace``): the traceable
    backend's operations are recorded instead, and autograd differentiates the recorded graph
    (``torch.export`` would inline a Function's forward and drop its backward)."""
    return not traceable.capturing() and _grads_wanted(*tensors)


def _grads_wanted(*tensors: torch.Tensor | None) -> bool:
    """:func:`_needs_grad` without its capture check, for a caller whose dispatch has asked."""
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def wants_grad(input: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> bool:
    """Whether a common call (forward-mode AD asked apart) computes a gradient: the question of
    :func:`_grads_wanted` for exactly these three tensors, without building a sequence."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def _empty_batch_output(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The output for an input with no values: empty, in the input's dtype, and connected to
    the parameters so their gradients are zeros (as torch gives)."""
    output = input.clone()
    if weight is not None:
        output = output * as_channel(weight.to(output.dtype), output)
    if bias is not None:
        output = output + as_channel(bias.to(output.dtype), output)
    return output


def normalize_with_batch_statistics(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None = None,
    backend=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize with the batch's own statistics (no checks, no running statistics).

    Returns ``(output, mean, biased variance)``; the building block of every batch norm variant.
    ``backend``: the one the caller's dispatch chose for ``input`` (chosen here when None).
    """
    if _needs_grad(input, weight, bias):
        return apply_train(input, weight, bias, eps, mask)
    backend = select_backend(input, mask) if backend is None else backend
    if mask is None:
        return backend.train_forward(input, weight, bias, eps)
    return backend.train_forward(input, weight, bias, eps, mask)


def normalize_with(
    input: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    backend=None,
) -> torch.Tensor:
    """Normalize with given statistics (no checks); they receive no gradient."""
    if _needs_grad(input, weight, bias):
        return apply_eval(input, mean, variance, weight, bias, eps)
    backend = select_backend(input) if backend is None else backend
    return backend.eval_forward(input, mean, variance, weight, bias, eps)


def normalize_common(
    input: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str = "identity",
) -> torch.Tensor | None:
    """:func:`normalize_with` (then ``activation``, for the fused layers of
    ``batchnorm.modules.norm_act``) for a module's common inference call, checked, or None when
    the call is not the common one (then :func:`validate_arguments` and :func:`normalize_with`
    answer it). The caller has applied its input rule (dimensions and channels).

    The common call: no gradient to compute (``torch.no_grad``, or nothing that requires one),
    no forward-mode AD, outside torch.compile, eps a finite float >= 0, and a backend that takes
    the call whole (``batchnorm.dispatch.common_backend``; its ``eval_common`` accepts the
    input and the four per-channel tensors only in the form its kernels read, which passes
    every check of :func:`validate_arguments`). The questions are asked once each and in one
    place: see ``batchnorm.backends.cpu.eval_common`` for what each costs inside a model."""
    if (
        torch.compiler.is_compiling()  # first: the tracer must not see the questions below
        or forward_ad._current_level >= 0
        or not (type(eps) is float and 0.0 <= eps < math.inf)
        # (wants_grad's question, asked here: a frame less on every inference call)
        or (
            torch.is_grad_enabled()
            and (
                input.requires_grad
                or (weight is not None and weight.requires_grad)
                or (bias is not None and bias.requires_grad)
            )
        )
    ):
        return None
    backend = common_backend(input)
    if backend is None:
        return None
    native = backend.compiled  # (the compiled call path, where loaded: it declines with None)
    if native is not None:
        act = NATIVE_ACTIVATIONS.get(activation)
        if act is not None:
            output = native.eval(input, mean, variance, weight, bias, eps, act)
            if output is not None:
                return output
    return backend.eval_common(input, mean, variance, weight, bias, eps, activation)


def common_step(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    momentum: float,
    tracked: torch.Tensor | None = None,
    activation: str = "identity",
) -> tuple[Backend, int] | None:
    """``(backend, values per channel)`` where a module's training call is the common one
    (see :func:`train_common`, which then computes it; the fused layers of
    ``batchnorm.modules.norm_act`` compute theirs, ``activation`` included, with the same
    backend call), else None."""
    backend = _training_backend(input, eps, momentum)
    if backend is None or not (
        activation == "identity" or activation in getattr(backend, "ACTIVATIONS", ())
    ):
        return None
    count = backend.train_common(input, weight, bias, running_mean, running_var, tracked)
    return (backend, count) if count else None


def _training_backend(input: torch.Tensor, eps: float, momentum: float) -> Backend | None:
    """The backend of a common training call, where the context and eps and momentum allow
    one (see :func:`train_common`), else None."""
    if (
        torch.compiler.is_compiling()  # first: the tracer must not see the questions below
        or forward_ad._current_level >= 0
        or not (type(eps) is float and 0.0 < eps < math.inf)
        or not (type(momentum) is float and 0.0 <= momentum <= 1.0)
    ):
        return None
    return common_backend(input)


# The activations the compiled call path takes, by its code for them: the kernels' own for those
# they fuse (``batchnorm.backends.cpu.kernels.ACTIVATIONS``), then those it applies with torch's
# operators around them (``batchnorm.backends.smooth``).
NATIVE_ACTIVATIONS = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3}


def native_step(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    momentum: float,
    tracked: torch.Tensor | None,
    activation: str,
) -> tuple[torch.Tensor, bool] | None:
    """A fused layer's common training step (``activation(BN(input))``) on the compiled call
    path, as :func:`train_common` takes plain batch norm's: ``(output, finite)``, or None where
    the call is not one it takes (then ``batchnorm.modules.norm_act`` takes its own path)."""
    act = NATIVE_ACTIVATIONS.get(activation)
    if act is None:
        return None
    backend = _training_backend(input, eps, momentum)
    native = None if backend is None else backend.compiled
    if native is None:
        return None
    return native.train(input, weight, bias, running_mean, running_var, tracked, eps, momentum,
                        act)


def train_common(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    momentum: float,
    tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool | torch.Tensor] | None:
    """A module's common training call, checked and computed: ``(output, finite)`` with the
    running statistics updated in place (``finite`` as :func:`batch_norm_core` returns it), or
    None when the call is not the common one (then the general path validates and computes it).
    The caller has applied its input rule (dimensions and channels). ``tracked``: a module's
    count of batches, which the same backend call then counts (adds 1 to, when ``finite``).

    The common call: outside torch.compile, graph capture, torch.func transforms and
    forward-mode AD, eps a finite float > 0, momentum a float in [0, 1], and a backend that
    accepts the tensors whole (``batchnorm.dispatch.common_backend`` and its ``train_common``;
    what it accepts passes every check of :func:`validate_arguments`). See
    :func:`normalize_common` for why the questions are asked in one place. The backend's
    compiled call path (``batchnorm.backends.cpu.native``), where loaded, is offered the call
    first: it computes it whole or declines it, having changed nothing."""
    backend = _training_backend(input, eps, momentum)
    if backend is None:
        return None
    native = backend.compiled  # (the compiled call path, where loaded: it declines with None)
    if native is not None:
        done = native.train(input, weight, bias, running_mean, running_var, tracked, eps,
                            momentum, 0)
        if done is not None:
            return done
    count = backend.train_common(input, weight, bias, running_mean, running_var, tracked)
    if not count:
        return None
    if wants_grad(input, weight, bias):
        return apply_train_update(
            input, weight, bias, eps, None, backend, running_mean, running_var, momentum, count,
            checked=True, tracked=tracked,
        )
    output, _, _, finite = backend.train_forward_update(
        input, weight, bias, eps, running_mean, running_var, momentum, count, checked=True,
        tracked=tracked,
    )
    return output, finite


def batch_norm_core(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
    owner: str = "batch_norm",
    mask: torch.Tensor | None = None,
    input_checked: bool = False,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | bool | None]:
    """Validate, normalize, and compute the running-statistics update.

    Returns ``(output, new_running_mean, new_running_var, finite)``. The last three are None
    when no running statistics are updated; ``finite`` (a bool, or a 0-dim bool tensor where
    reading it would synchronise with a device) tells whether the batch statistics were finite
    (if not, the "new" statistics equal the old ones). Nothing is modified unless
    ``in_place``, which lets the backend write the update straight into the running tensors
    (then returned as the new ones); :func:`commit_running_stats` completes either form.
    ``mask`` restricts the batch statistics to valid positions (see :func:`batch_norm`).

    ``input_checked``: the caller has run :func:`validate_arguments` on these arguments; nothing
    is checked again (a module or variant validates once per call).

    An empty input (no values per channel) gives an empty output, and in training leaves the
    running statistics unchanged while counting as a tracked batch, as torch does.
    """
    use_batch_stats = training or running_mean is None
    if not input_checked:
        validate_arguments(
            input, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
            owner, mask,
        )
    if use_batch_stats and input.numel() == 0:
        output = _empty_batch_output(input, weight, bias)
        if not training or running_mean is None:
            return output, None, None, None
        return output, running_mean, running_var, True
    backend = select_backend(input, mask)  # the one dispatch of this call
    # (the dispatch has asked whether a graph is captured: it chose traceable if so)
    needs_grad = backend is not traceable and _grads_wanted(input, weight, bias)
    if not use_batch_stats:
        # (normalize_with, in place: one call less on every eval call)
        if needs_grad:
            output = apply_eval(input, running_mean, running_var, weight, bias, eps)
        else:
            output = backend.eval_forward(input, running_mean, running_var, weight, bias, eps)
        return output, None, None, None
    updating = training and running_mean is not None
    if updating and in_place and needs_grad:
        # a training step: output, statistics and the running update in one Function
        done = apply_train_update(
            input, weight, bias, eps, mask, backend, running_mean, running_var, momentum,
            valid_per_channel(input, mask),
        )
        if done is not None:
            return done[0], running_mean, running_var, done[1]
    one_call = getattr(backend, "train_forward_update", None) if mask is None else None
    if updating and in_place and not needs_grad and one_call is not None:
        # the same step without gradients: one backend call as well
        output, _, _, finite = one_call(
            input, weight, bias, eps, running_mean, running_var, momentum,
            valid_per_channel(input, mask),
        )
        return output, running_mean, running_var, finite
    output, mean, variance = normalize_with_batch_statistics(
        input, weight, bias, eps, mask, backend
    )
    if not updating:
        return output, None, None, None
    new_mean, new_var, finite = backend.updated_running_stats(
        running_mean, running_var, mean, variance, momentum, valid_per_channel(input, mask),
        in_place=in_place,
    )
    return output, new_mean, new_var, finite


def commit_running_stats(running_mean, running_var, new_mean, new_var, finite, owner) -> None:
    """Write an update computed by a ``*_core`` function into the caller's buffers, in place."""
    if new_mean is None:
        return
    running.commit_running_stats(running_mean, running_var, new_mean, new_var)
    # (a captured graph keeps the protection, a torch.where; reading the flag would freeze one
    # batch's answer into it)
    if not torch.compiler.is_compiling() and not traceable.capturing() and not bool(finite):
        running.warn_nonfinite(owner)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch norm with the semantics of ``torch.nn.functional.batch_norm``.

    In training, normalizes with the batch's mean and biased variance and, when running
    statistics are given, updates them in place with the unbiased variance:
    ``running = (1 - momentum) * running + momentum * batch``. Outside training it uses the
    running statistics, or the batch's own when none are given.

    Unlike torch, a training batch whose statistics are not finite leaves the running
    statistics unchanged (with a :class:`NonFiniteStatisticsWarning`).

    ``mask`` (bool, shape (N, L) for input (N, C, L); in general the input's shape without the
    channel axis) marks the valid positions of padded sequences: the batch statistics and the
    running statistics come from valid positions only. Padded positions are still normalized
    with those statistics (their output is the normalization of whatever values they hold), so
    mask or ignore them downstream as usual.

    Example::

        >>> x = torch.randn(8, 3, 4, 4)
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, mean, var, training=True)
        >>> bool(mean.abs().sum() > 0)
        True
    """
    output, new_mean, new_var, finite = batch_norm_core(
        input, running_mean, running_var, weight, bias, training, momentum, eps, mask=mask,
        in_place=True,
    )
    commit_running_stats(running_mean, running_var, new_mean, new_var, finite, "batch_norm")
    return output


def batch_norm_pure(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Like :func:`batch_norm`, but modifies nothing: returns
    ``(output, new_running_mean, new_running_var)``.

    Outside training, or without running statistics, the returned statistics are the ones
    passed in. Suited to ``torch.func``::

        >>> x = torch.randn(5, 8, 3)              # vmap over 5 independent batches
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y, new_rm, new_rv = torch.func.vmap(
        ...     lambda xb: batch_norm_pure(xb, rm, rv, training=True))(x)
        >>> tuple(new_rm.shape)
        (5, 3)
    """
    output, new_mean, new_var, _ = batch_norm_core(
        input, running_mean, running_var, weight, bias, training, momentum, eps, mask=mask
    )
    if new_mean is None:
        return output, running_mean, running_var
    return output, new_mean, new_var


__all__ = [
    "batch_norm",
    "batch_norm_pure",
    "normalize_with",
    "normalize_with_batch_statistics",
]
