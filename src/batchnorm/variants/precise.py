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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from batchnorm.core.layout import values_per_channel
from batchnorm.core.moments import batch_moments, merge_many, unbiased


def _first_input(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


class _Accumulator:
    """Per-layer running sums: the count, mean and M2 of every value seen so far."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        mean, variance = batch_moments(x.detach())
        mean, variance = mean.to(torch.float64), variance.to(torch.float64)
        count = torch.tensor(float(values_per_channel(x)), dtype=torch.float64, device=x.device)
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, variance * count
            return
        counts = torch.stack([self.count, count])
        merged = merge_many(counts, torch.stack([self.mean, mean]),
                            torch.stack([self.m2, variance * count]))
        self.count, self.mean, self.m2 = merged[0][0], merged[1], merged[2]


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
) -> int:
    """Recompute the running statistics of every batch norm in ``model`` (torch.nn's and ours)
    as exact population statistics over ``batches``.

    Args:
        model: the model; it is called as ``model(input)``.
        batches: an iterable of model inputs, or of tuples/lists whose first item is the input
            (a DataLoader of (input, target) works as is).
        num_batches: use at most this many batches (default: all of them).
        progress: show a progress bar.

    Returns the number of batches used. Raises ``ValueError`` when no batch was given; in that
    case nothing is changed.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and m.running_mean is not None]
    if not layers:
        return 0
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"precise_bn: expected num_batches >= 1 or None, got {num_batches}")
    accumulators = {layer: _Accumulator() for layer in layers}
    saved = {layer: (layer.momentum, layer.num_batches_tracked.clone()) for layer in layers}
    was_training = {m: m.training for m in model.modules()}

    def record(layer, args):
        accumulators[layer].add(args[0])

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    used = 0
    try:
        model.train()
        for layer in layers:
            layer.momentum = 0.0  # the moving averages stay put while the batches run
        iterator = iter(batches)
        bar = _progress(num_batches, progress)
        for batch in iterator:
            if num_batches is not None and used >= num_batches:
                break
            model(_first_input(batch))
            used += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        for layer, (momentum, tracked) in saved.items():
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(tracked)
        for module, mode in was_training.items():
            module.train(mode)
    if used == 0:
        raise ValueError("precise_bn: expected at least one batch, got an empty iterable")
    for layer, acc in accumulators.items():
        if acc.count is None:
            continue  # a layer the model did not call on these inputs
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
