r"""Precise population statistics (as in detectron2/fvcore's "precise BN"): replace the running
averages of every batch norm in a model by exact statistics over many batches.

The exponential moving average weights recent batches most and lags behind weights that are
still changing; at the end of training, re-estimating the population statistics with the final
weights often helps, especially with small batches.

For each layer, the moments of its input over each batch are merged exactly (Chan's formula,
``batchnorm.core.moments.merge_many``): the mean is the count-weighted mean of the batch means,
and the variance follows the law of total variance (within-batch M2 plus the spread of the batch
means). The running variance receives the unbiased variance of all the values seen, which is
what batch norm would have recorded had the whole data been one batch.

The model runs in training mode, so each layer normalizes with batch statistics exactly as in
training, and the statistics of later layers see their inputs as in training. Momentum, training
mode and ``num_batches_tracked`` are restored afterwards.

Under ``torch.distributed`` (initialized, more than one process in the group), every rank
passes its own batches, then one ``all_gather`` shares each rank's count, mean and M2 per layer
and every rank merges them in the same order: all ranks end with identical statistics, those of
one process that saw every rank's batches. Every rank must call ``precise_bn`` (a rank with no
batches too: it receives the others' statistics).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from batchnorm.core.layout import valid_per_channel
from batchnorm.core.moments import batch_moments, merge_many, unbiased
from batchnorm.core.running import NonFiniteStatisticsWarning

Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # count, mean, M2 (float64)


def _first_input(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _layer_moments(args: tuple, kwargs: dict) -> Moments:
    """Count, mean and M2 of a layer's input in float64; a padded-sequence ``mask`` (a bool
    tensor, second argument or keyword) restricts them to the valid positions, as the layer's
    own statistics are."""
    x = args[0].detach()
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
        mask = None  # absent, or another argument (a residual)
    mean, variance = batch_moments(x, mask)
    count = torch.as_tensor(valid_per_channel(x, mask), dtype=torch.float64, device=x.device)
    # no values (an empty batch, or nothing valid): neutral in the merge, not 0/0
    mean = torch.where(count > 0, mean.to(torch.float64), 0.0)
    m2 = torch.where(count > 0, variance.to(torch.float64) * count, 0.0)
    return count, mean, m2


def _finite(moments: Moments) -> bool:
    _, mean, m2 = moments
    return bool(torch.isfinite(mean).all()) and bool(torch.isfinite(m2).all())


class _Accumulator:
    """Per-layer running sums: the count, mean and M2 of every value seen so far."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, moments: Moments) -> None:
        count, mean, m2 = moments
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        merged = merge_many(torch.stack([self.count, count]), torch.stack([self.mean, mean]),
                            torch.stack([self.m2, m2]))
        self.count, self.mean, self.m2 = merged[0][0], merged[1], merged[2]

    def flat(self, channels: int, device: torch.device) -> torch.Tensor:
        """``[count, mean..., M2...]`` in float64; zeros (neutral in a merge) when empty."""
        if self.count is None:
            return torch.zeros(1 + 2 * channels, dtype=torch.float64, device=device)
        return torch.cat([self.count.reshape(1), self.mean, self.m2]).to(device)


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _merge_across_ranks(
    accumulators: dict[nn.Module, _Accumulator], drawn: int, used: int, group
) -> tuple[int, int]:
    """Replace every layer's accumulated moments by those of all ranks together (one
    all_gather, merged identically on every rank); returns the batches drawn and used by all
    ranks."""
    layers = list(accumulators)
    device = layers[0].running_mean.device
    counters = torch.tensor([float(drawn), float(used)], dtype=torch.float64, device=device)
    local = torch.cat([counters] + [
        accumulators[layer].flat(layer.running_mean.numel(), device) for layer in layers
    ])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (ranks, 2 + sum over layers of 1 + 2C)
    start = 2
    for layer in layers:
        channels = layer.running_mean.numel()
        counts = table[:, start]
        means = table[:, start + 1 : start + 1 + channels]
        m2s = table[:, start + 1 + channels : start + 1 + 2 * channels]
        start += 1 + 2 * channels
        accumulator = accumulators[layer]
        if counts.sum() > 0:
            total, mean, m2 = merge_many(counts, means, m2s)
            accumulator.count, accumulator.mean, accumulator.m2 = total[0], mean, m2
    totals = table[:, :2].sum(dim=0)
    return int(totals[0]), int(totals[1])


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    *,
    process_group=None,
) -> int:
    """Recompute the running statistics of every batch norm in ``model`` (torch.nn's and ours)
    as exact population statistics over ``batches``.

    Args:
        model: the model; it is called as ``model(input)``.
        batches: an iterable of model inputs, or of tuples/lists whose first item is the input
            (a DataLoader of (input, target) works as is).
        num_batches: draw at most this many batches (default: all of them); a loader that gives
            fewer makes a ``UserWarning`` saying how many were used.
        progress: show a progress bar.
        process_group (keyword-only): under ``torch.distributed``, the ranks whose statistics
            are merged (default: the whole world). Each rank's own batches are passed; every
            rank of the group must call this.

    A batch whose statistics are not finite at some layer (a NaN or inf in the data, an
    overflow) is skipped as a whole, with a :class:`NonFiniteStatisticsWarning` naming its
    index (0-based, in the order drawn) and the layer; the layers' own warnings are held back
    meanwhile.

    Returns the number of batches used (by all ranks together, under ``torch.distributed``).
    Raises ``ValueError`` when no batch was given, or none was finite (on any rank); in that case
    nothing is changed.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and m.running_mean is not None]
    if not layers:
        return 0
    if num_batches is not None and (
        not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1
    ):
        raise ValueError(f"precise_bn: expected num_batches >= 1 or None, got {num_batches!r}")
    names = {module: name or "<root>" for name, module in model.named_modules()}
    accumulators = {layer: _Accumulator() for layer in layers}
    pending: dict[nn.Module, list[Moments]] = {}
    saved = {
        layer: (layer.momentum, layer.num_batches_tracked.clone(), layer.running_mean.clone(),
                layer.running_var.clone(), layer.__dict__.get("warn_on_nonfinite"))
        for layer in layers
    }
    was_training = {m: m.training for m in model.modules()}

    def record(layer, args, kwargs):
        pending.setdefault(layer, []).append(_layer_moments(args, kwargs))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    drawn = used = 0
    try:
        model.train()
        for layer in layers:
            layer.momentum = 0.0  # the moving averages stay put while the batches run
            layer.warn_on_nonfinite = False  # a skipped batch is reported here, once
        bar = _progress(num_batches, progress)
        for index, batch in enumerate(itertools.islice(batches, num_batches)):
            pending.clear()
            model(_first_input(batch))
            drawn += 1
            if bar is not None:
                bar.update(1)
            bad = next((layer for layer, seen in pending.items()
                        if not all(map(_finite, seen))), None)
            if bad is not None:
                warnings.warn(
                    f"precise_bn: batch {index} (0-based) gives non-finite statistics at "
                    f"{names[bad]} ({type(bad).__name__}): a NaN or inf in the data or an "
                    "overflow; the batch is skipped and the population statistics come from the "
                    "other batches",
                    NonFiniteStatisticsWarning,
                    stacklevel=3,
                )
                continue
            for layer, seen in pending.items():
                for moments in seen:
                    accumulators[layer].add(moments)
            used += 1
        if bar is not None:
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        # Everything the run touched goes back (torch's layers let a NaN batch into their running
        # statistics even with momentum 0); the new statistics are written below.
        for layer, (momentum, tracked, mean, var, warn) in saved.items():
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(tracked)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            if warn is None:
                del layer.warn_on_nonfinite
            else:
                layer.warn_on_nonfinite = warn
        for module, mode in was_training.items():
            module.train(mode)
    local_drawn = drawn
    if _distributed(process_group):  # every rank reaches this, whatever its batches were
        drawn, used = _merge_across_ranks(accumulators, drawn, used, process_group)
    if drawn == 0:
        raise ValueError("precise_bn: expected at least one batch, got an empty iterable")
    if used == 0:
        raise ValueError(
            f"precise_bn: expected at least one batch with finite statistics, got {drawn} "
            "batch(es), all skipped; the running statistics are unchanged"
        )
    if num_batches is not None and local_drawn < num_batches:
        skipped = f" ({drawn - used} skipped as non-finite)" if used < drawn else ""
        warnings.warn(
            f"precise_bn: asked for num_batches={num_batches}, but the loader gave only "
            f"{local_drawn} batch(es); the statistics come from {used} batch(es){skipped}",
            UserWarning,
            stacklevel=3,
        )
    for layer, acc in accumulators.items():
        if acc.count is None or not acc.count > 0:
            continue  # a layer the model did not call on these inputs, or saw no values of
        count = int(acc.count)
        layer.running_mean.copy_(acc.mean.to(layer.running_mean.dtype))
        variance = acc.m2 / acc.count
        layer.running_var.copy_(unbiased(variance, count).to(layer.running_var.dtype))
    return used


def _progress(total: int | None, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="precise batch-norm statistics", unit="batch", leave=False)
