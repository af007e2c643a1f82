r"""The running-statistics update, as a pure function.

With momentum :math:`m` (torch's convention: the weight of the new batch),

.. math::
    \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
    \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\frac{n}{n-1}\sigma_B^2 .

``momentum=None`` in the modules means a cumulative moving average: :math:`m = 1/k` for the
k-th tracked batch, so the running statistics are the plain mean of every batch's statistics.

Protection: a batch whose mean or variance is not finite (a NaN or inf in the input, an
overflow in half precision) leaves the running statistics unchanged. The choice is made with
``torch.where`` rather than a Python branch, so it costs no host synchronisation and traces
under ``torch.compile(fullgraph=True)``; the caller receives the flag to warn or count.
"""

from __future__ import annotations

import warnings

import torch

from batchnorm.core.context import is_batched
from batchnorm.core.errors import BatchNormValueError
from batchnorm.core.moments import unbiased


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had non-finite statistics; the running statistics were left unchanged."""


def updated_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    momentum: float | torch.Tensor,
    count: int | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New running mean and variance, and a 0-dim bool tensor: were the batch statistics finite.

    ``batch_var`` is the unbiased batch variance, or, when the number of values ``count`` is
    given, the biased one, which then receives Bessel's factor n / (n - 1) here. Nothing is
    modified unless ``in_place``: then the update is written into ``running_mean`` and
    ``running_var``, which are returned as the new statistics (:func:`commit_running_stats`
    completes either form). Backends may provide a faster twin with the same signature and
    results (``batchnorm.backends.cpu.updated_running_stats``, whose ``finite`` is a bool).
    """
    # Mean and variance travel stacked as one (2, C) tensor: a handful of operations per step
    # instead of two of each, which shows on small layers.
    if count is not None:
        batch_var = unbiased(batch_var, count)
    batch = torch.stack([batch_mean.detach(), batch_var.detach()])
    if batch.dtype != running_mean.dtype:
        batch = batch.to(running_mean.dtype)
    original_var, var_dtype = running_var, running_var.dtype
    if var_dtype != running_mean.dtype:
        running_var = running_var.to(running_mean.dtype)
    running = torch.stack([running_mean, running_var])
    finite = torch.isfinite(batch).all()
    if not torch.compiler.is_compiling():
        finite = _value_of(finite)  # a flag, never a transform's wrapper
    updated = torch.where(finite, running.lerp(batch, momentum), running)
    new_mean, new_var = updated[0], updated[1]
    if new_var.dtype != var_dtype:
        new_var = new_var.to(var_dtype)
    if in_place:
        commit_running_stats(running_mean, original_var, new_mean, new_var)
        return running_mean, original_var, finite
    return new_mean, new_var, finite


def commit_running_stats(running_mean, running_var, new_mean, new_var) -> None:
    """Write an update into the running tensors in place, unless it already lives there.

    Under a differentiating torch.func transform (``jvp``, ``grad``) the new statistics arrive
    wrapped for that transform while the buffers are plain: the update is not differentiable,
    so its value is written, as torch's own batch norm does under the same transforms."""
    if new_mean is running_mean:
        return
    compiling = torch.compiler.is_compiling()
    # the values inside the gradient-tracking wrappers of differentiating transforms
    mean_value = new_mean if compiling else _value_of(new_mean)
    var_value = new_var if compiling else _value_of(new_var)
    if not compiling and is_batched(mean_value):
        # (the buffers too are wrapped by a differentiating transform inside the vmap)
        wrapped = _is_grad_tracking(running_mean) or _is_grad_tracking(running_var)
        running_mean, running_var = _value_of(running_mean), _value_of(running_var)
        if not (is_batched(running_mean) and is_batched(running_var)):
            # a vmapped input with running statistics shared by every member: one buffer
            # cannot hold one update per member (torch's batch norm refuses the same call)
            raise BatchNormValueError(
                "batch norm under vmap: expected running statistics batched as the input is "
                "(or none: track_running_stats=False, or eval mode), got unbatched running_mean "
                "and running_var that a training call would update in place once per vmapped "
                "member"
            )
        # vmapped members with buffers of their own (an ensemble's stacked state): each
        # member's update into its own
        if wrapped:
            # inside a differentiating transform, which refuses an in-place change of a tensor
            # from outside its level: the members' memory is written below every transform
            # (both pairs asked about before either is written)
            pairs = (_members(running_mean, mean_value), _members(running_var, var_value))
            with torch.no_grad(), torch._C._DisableFuncTorch():
                for memory, update in pairs:
                    memory.copy_(update)
            return
        if (_functorch.maybe_get_level(mean_value) != _functorch.maybe_get_level(running_mean)
                or _functorch.maybe_get_level(var_value)
                != _functorch.maybe_get_level(running_var)):
            # statistics stacked for an outer vmap, updated under an inner one: one buffer
            # per outer member cannot take one update per inner member (torch's in-place
            # write refuses it too, unnamed)
            raise BatchNormValueError(
                "batch norm under nested vmaps: expected running statistics batched by the "
                "innermost vmap, the input's, got them batched by an outer one; use "
                "track_running_stats=False or eval mode there"
            )
        with torch.no_grad():
            running_mean.copy_(mean_value)
            running_var.copy_(var_value)
        return
    if mean_value is not new_mean:
        # below the transform's layer: the buffers belong to no transform level
        with torch.no_grad(), torch._C._DisableFuncTorch():
            running_mean.copy_(mean_value)
            running_var.copy_(var_value)
        return
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def count_under_transform(tracked: torch.Tensor, finite) -> None:
    """Add one to the count of batches ``tracked`` under a torch.func transform where the
    batch statistics were ``finite`` (a flag, one per vmapped member or one for all).

    Vmapped members with counts of their own (an ensemble's stacked state) each move by their
    flag, unread: by their own where their inputs differ, by the one shared flag where the
    members share the layer's input (a batch norm first in each member), whose statistics are
    then the same for all. Otherwise a differentiating transform (``jvp``, ``grad``) refuses any
    in-place change of a buffer it captured: the count is no part of what it differentiates, so
    it is counted below the transform (where torch's module raises)."""
    flag_batched = isinstance(finite, torch.Tensor) and is_batched(finite)
    if flag_batched or is_batched(_value_of(tracked)):
        tracked.add_(torch.as_tensor(finite).to(tracked.dtype))
        return
    with torch._C._DisableFuncTorch():
        tracked.add_(int(bool(finite)))


def _members(running: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``running.copy_(value)`` on two tensors batched by the same single vmap: the memory
    that holds every member of each (its batch dimension first), to be written below every
    torch.func transform; statistics batched at another level, or by nested vmaps, are refused
    by name rather than guessed at."""
    level = _functorch.maybe_get_level(running)
    inner, inner_value = _functorch.get_unwrapped(running), _functorch.get_unwrapped(value)
    if (
        _functorch.maybe_get_level(value) != level
        or is_batched(inner) or _is_grad_tracking(inner)
        or is_batched(inner_value) or _is_grad_tracking(inner_value)
    ):
        raise BatchNormValueError(
            "batch norm under vmap and a differentiating transform: expected running "
            "statistics batched by one vmap, the input's, got them batched at another level or "
            "by nested vmaps; use track_running_stats=False or eval mode there"
        )
    return (inner.movedim(_functorch.maybe_get_bdim(running), 0),
            inner_value.movedim(_functorch.maybe_get_bdim(value), 0))


def _value_of(tensor: torch.Tensor) -> torch.Tensor:
    """The plain value inside the gradient-tracking wrappers of torch.func transforms."""
    while _is_grad_tracking(tensor):
        tensor = _unwrapped(tensor)
    return tensor


_functorch = torch._C._functorch
_is_grad_tracking = _functorch.is_gradtrackingtensor
_unwrapped = torch._C._functorch.get_unwrapped


def warn_nonfinite(owner: str) -> None:
    warnings.warn(
        f"{owner}: the batch statistics are not finite (NaN or inf in the input or an overflow); "
        "the running statistics and num_batches_tracked were left unchanged. The output of this "
        "batch is returned as computed, so the non-finite values stay visible.",
        NonFiniteStatisticsWarning,
        stacklevel=3,
    )
