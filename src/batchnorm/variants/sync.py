r"""Synchronized batch norm across processes on ``torch.distributed`` (gloo, NCCL, ...).

In training, the statistics span the global batch of every rank in the process group:

- forward: each rank computes the count, mean and M2 (sum of squared deviations) of its own
  batch; one ``all_gather`` shares them and every rank merges them exactly with Chan's formula
  (``batchnorm.core.moments.merge_many``), so uneven batch sizes, and empty batches, are right;
- backward: each rank computes the two gradient sums of the closed-form backward
  (``batchnorm.core.normalize.gradient_sums``); one ``all_reduce`` adds them; the input gradient
  then follows from the global sums (``batchnorm.core.normalize.input_gradient``).

Outputs, input gradients and running statistics equal single-process batch norm on the
concatenation of all ranks' batches. Weight and bias gradients stay per rank, as
DistributedDataParallel expects: it sums them (it averages, and the loss scaling is the
user's), and their sum over ranks is the whole-batch gradient.

Padded sequences: ``module(x, mask)`` with a bool ``mask`` (the input's shape without the channel
axis, as for the other batch norms) restricts the statistics to the valid positions of every rank:
the counts gathered are the valid counts, and the backward's sums follow the masked batch norm's
rule (``batchnorm.core.normalize``), so the result equals masked batch norm on the concatenated
batch, with ranks holding no valid position (or no sample) included.

In eval mode, without an initialized process group, or with a group of one process, it is plain
batch norm and runs no collective.

A global batch of one value per channel (one valid value with a mask, or none) is refused on
every rank, as plain batch norm refuses it; with ``single_sample = "running"`` every rank
normalizes it with its running statistics instead, unchanged (the total is the same everywhere,
so the ranks agree).

Why not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses any module that
is an instance of it on the CPU ("SyncBatchNorm layers only work with GPU modules", checked with
``isinstance`` when DDP wraps the model), and CPU training with gloo is a case this class serves
(``examples/ddp_digits.py``). It keeps torch's constructor (``process_group`` in the same
position, keyword-only ``bias``), attributes and state dict, so it is otherwise a drop-in;
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` accepts models holding our modules (it replaces
them with torch's own, as it does torch's), and ``batchnorm.convert(model, sync=True)`` converts to
this class.

Faults: each collective waits at most ``timeout`` seconds (default: the process group's own
timeout); a rank that died or stalled makes the others raise :class:`SyncTimeoutError` naming
the group and the wait, instead of hanging.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from batchnorm.core import checks
from batchnorm.core.errors import BatchNormValueError
from batchnorm.core.layout import accumulation_dtype, as_channel, valid_per_channel
from batchnorm.core.moments import batch_moments, merge_many, unbiased
from batchnorm.core.normalize import (
    gradient_sums,
    input_gradient,
    inverse_std,
    normalize_centred,
)
from batchnorm.core.running import updated_running_stats
from batchnorm.modules.batchnorm import _BatchNorm


class SyncTimeoutError(RuntimeError):
    """A collective of synchronized batch norm did not complete: a rank died or stalled."""


def _wait(work, timeout: float | None, what: str, group) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        world = dist.get_world_size(group)
        limit = f"{timeout:g} s" if timeout is not None else "the process group's timeout"
        raise SyncTimeoutError(
            f"SyncBatchNorm: rank {dist.get_rank()} gave up waiting for the {what} of the other "
            f"{world - 1} rank(s) after {limit}: a rank may have died or stalled ({error})"
        ) from error


def _all_gather(tensor: torch.Tensor, group, timeout: float | None) -> torch.Tensor:
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    work = dist.all_gather(gathered, tensor, group=group, async_op=True)
    _wait(work, timeout, "batch statistics", group)
    return torch.stack(gathered)


def _all_reduce(tensor: torch.Tensor, group, timeout: float | None) -> torch.Tensor:
    work = dist.all_reduce(tensor, group=group, async_op=True)
    _wait(work, timeout, "gradient sums", group)
    return tensor


def global_moments(
    x: torch.Tensor, group, timeout: float | None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(global mean, global biased variance, global count)`` of ``x`` over every rank (of the
    valid positions only, with a ``mask``); not differentiable."""
    channels = x.shape[1]
    count = float(valid_per_channel(x, mask))
    if count > 0:
        mean, variance = batch_moments(x.detach(), mask)
    else:  # an empty local batch (or one with nothing valid) contributes nothing, and no 0/0
        mean = variance = torch.zeros(channels, dtype=accumulation_dtype(x.dtype), device=x.device)
    local = torch.cat([mean.new_tensor([count]), mean, variance * count])
    gathered = _all_gather(local, group, timeout)
    counts, means, m2s = gathered[:, 0], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
    total, global_mean, m2 = merge_many(counts, means, m2s)
    total_count = total[0]
    return global_mean, m2 / torch.clamp(total_count, min=1), total_count


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with the global statistics; the backward all-reduces the gradient sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, variance, total, eps, group, timeout, mask):
        invstd = inverse_std(variance, eps)
        centred = x.to(mean.dtype) - as_channel(mean, x)
        output = normalize_centred(centred, invstd, weight, bias, x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, mask)
        ctx.total, ctx.group, ctx.timeout = total, group, timeout
        return output

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, mask = ctx.saved_tensors
        centred, sum_grad, sum_grad_centred = gradient_sums(grad_out, x, mean, mask)
        grad_weight = sum_grad_centred * invstd if weight is not None else None
        grad_bias = sum_grad.clone() if ctx.needs_input_grad[2] else None
        # Every rank joins the all-reduce, even one whose input needs no gradient, so that the
        # ranks always make the same collective calls.
        sums = _all_reduce(torch.cat([sum_grad, sum_grad_centred]), ctx.group, ctx.timeout)
        grad_input = None
        if ctx.needs_input_grad[0]:
            channels = x.shape[1]
            grad_input = input_gradient(
                grad_out, centred, invstd, weight, sums[:channels], sums[channels:], ctx.total,
                x.dtype, mask,
            )
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(weight.dtype if weight is not None else grad_bias.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm whose training statistics span every process of ``process_group``.

    Arguments as for ``torch.nn.SyncBatchNorm`` (``process_group``: default the whole world;
    keyword-only ``bias``), plus the keyword-only ``timeout`` (seconds each collective may wait;
    default: the group's own). Accepts any input of shape (N, C, *). State-dict keys are batch
    norm's.

    Example (launched with torchrun)::

        model = batchnorm.convert(model, sync=True)
        model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group
        self.timeout = timeout

    def _check_input_dim(self, input: torch.Tensor) -> None:
        checks.check_input(input, num_features=self.num_features, owner=type(self).__name__)

    def _synchronizing(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Batch norm over the global batch; ``mask`` (bool, the input's shape without the
        channel axis) restricts the statistics to the valid positions of every rank."""
        if not self._synchronizing():
            return super().forward(input, mask)
        parameters, buffers = self._parameters, self._buffers
        weight, bias = parameters["weight"], parameters["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        updating = self.track_running_stats and running_mean is not None
        # Every argument is checked before the collective (a local batch may hold 0 or 1 values:
        # the batch-size rule applies to the global batch, after the gather).
        self._validate(input, running_mean, running_var, False, mask)
        mean, variance, total = global_moments(input, self.process_group, self.timeout, mask)
        if int(total) <= 1:
            return self._global_batch_too_small(input, mask, int(total))
        momentum = self._momentum_now() if updating else 0.0
        output = _SyncBatchNormFunction.apply(
            input, weight, bias, mean, variance, total, self.eps, self.process_group,
            self.timeout, mask,
        )
        if updating:
            new_mean, new_var, finite = updated_running_stats(
                running_mean, running_var, mean, unbiased(variance, total), momentum
            )
            self._commit_running_stats(new_mean, new_var, finite)
        return output

    def _global_batch_too_small(self, input, mask, total: int) -> torch.Tensor:
        """Every rank sees the same total, so every rank takes the same way out: the running
        statistics (``single_sample = "running"``), or the batch-size refusal."""
        owner = type(self).__name__
        running_mean, running_var = self._buffers["running_mean"], self._buffers["running_var"]
        if self.single_sample == "running" and running_mean is not None:
            output, *_ = self._core(input, running_mean, running_var, training=False,
                                    momentum=0.0)
            return output
        what = "value" if mask is None else "valid (unmasked) value"
        raise BatchNormValueError(
            f"{owner}: expected more than 1 {what} per channel across all ranks to compute "
            f"batch statistics in training, got {total}. Ways out: call .eval(), use larger "
            "batches, or set single_sample = 'running'."
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", timeout={self.timeout}" if self.timeout else "")
