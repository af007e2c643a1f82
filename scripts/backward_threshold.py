"""Where the CPU backward on planes should go parallel: the figures behind
``batchnorm.backends.cpu.BACKWARD_PLANES_SERIAL_BELOW``.

``python scripts/backward_threshold.py kernel [--busy MS] 4x128x6x6 4x416x6x6 ...``
    The backward kernel alone (float32, identity; NCHW planes, or rows for an (N, C) shape and
    for a shape ending in ``:cl``, channels_last), on one block and on two, beside
    torch's ``native_batch_norm_backward``, interleaved call by call. Before every timed call a
    torch matrix product (on torch's threads) and a 4 MB write run, as a model's convolutions run
    between its batch norms: the call finds its tensors out of cache, as it does in a model.
    Prints the median microseconds of each. ``--busy MS``: instead, keep torch's threads busy
    with matrix products for about MS milliseconds before each call, as a model's convolutions
    do; the kernels' own thread pool idles that long.

``python scripts/backward_threshold.py models --below N [--rounds R] MODEL ...``
    Inside each model of the models suite whose name contains MODEL, the backward of every
    batch norm in a training step, timed where it runs (hooks on the autograd nodes of each
    layer, as ``batchnorm bench --suite models --per-call`` times them), for torch's model and
    for two converted copies: one with the backward's cut on planes as loaded
    (``BACKWARD_PLANES_SERIAL_BELOW``), one with the cut set to N for its steps only. The three
    steps run interleaved in one process, the order shuffled every round, so that the two cuts
    meet the same state of the host. Prints, per plane size and size class of the input, the
    sums of the layers' median times and their ratios.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time

import torch

import batchnorm
from batchnorm.backends import cpu
from batchnorm.backends.cpu import kernels
from batchnorm.bench import models
from batchnorm.convert import convert


def kernel(shapes: list[str], busy_ms: float | None = None, rounds: int = 300) -> None:
    torch.set_num_threads(2)
    batchnorm.BatchNorm2d(4)(torch.randn(64, 4, 32, 32))  # starts the kernels' thread pool
    a, b = torch.randn(256, 1024), torch.randn(1024, 256)
    square = torch.randn(512, 512)
    scratch = torch.empty(1 << 20)

    def between() -> None:
        if busy_ms is None:
            torch.mm(a, b)
            scratch.fill_(1.0)
            return
        end = time.perf_counter() + busy_ms / 1e3
        while time.perf_counter() < end:
            torch.mm(square, square)

    print("| shape | values | one block (us) | two blocks (us) | torch (us) |")
    print("|---|---:|---:|---:|---:|")
    for text in shapes:
        numel, median = _time_shape(text, between, rounds)
        print(f"| {text} | {numel} | {median['one']:.1f} | {median['two']:.1f} | "
              f"{median['torch']:.1f} |", flush=True)


def _time_shape(text: str, between, rounds: int) -> tuple[int, dict[str, float]]:
    """The median microseconds of one block, two blocks and torch on the shape ``text``."""
    shape = tuple(int(v) for v in text.removesuffix(":cl").split("x"))
    batch, channels = shape[:2]
    x, grad = torch.randn(shape), torch.randn(shape)
    if text.endswith(":cl"):
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    size = x.numel() // (batch * channels)
    planes = size > 1 and x.is_contiguous()
    dims = (0, *range(2, len(shape)))
    weight, bias = torch.randn(channels), torch.randn(channels)
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    invstd = (var + 1e-5).rsqrt()
    grad_input, grad_weight, grad_bias = torch.empty_like(x), torch.empty(channels), \
        torch.empty(channels)
    xp = x.data_ptr()
    arguments = (
        cpu._LIKE[x.dtype], batch, channels, size, planes, grad.data_ptr(), xp, xp, False,
        mean.data_ptr(), var.data_ptr(), weight.data_ptr(), channels, bias.data_ptr(),
        channels, 1e-5, kernels.IDENTITY, True, True, grad_input.data_ptr(), xp, False,
        grad_weight.data_ptr(), grad_bias.data_ptr(),
    )
    calls = {
        "one": lambda: kernels.backward_at(*arguments, 1),
        "two": lambda: kernels.backward_at(*arguments, 2),
        "torch": lambda: torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True]),
    }
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            between()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return x.numel(), {name: 1e6 * statistics.median(t) for name, t in times.items()}


def models_side_by_side(names: list[str], below: int, rounds: int) -> None:
    torch.set_num_threads(2)
    for spec in models.MODELS:
        if any(name in spec.name for name in names):
            _model_side_by_side(spec, below, rounds)


def _model_side_by_side(spec: models.ModelSpec, below: int, rounds: int) -> None:
    model = models.build(spec)
    x = models.input_for(spec)
    labels = torch.randint(0, models.CLASSES, (x.shape[0],),
                           generator=torch.Generator().manual_seed(0))
    variants = {"torch": model, "loaded": convert(copy.deepcopy(model)),
                "other": convert(copy.deepcopy(model))}
    variants["loaded"](x).sum().backward()  # the first call loads the compiled path
    if cpu.compiled is None:
        raise SystemExit("the compiled call path is not loaded here: run `batchnorm compile`")
    loaded = cpu.BACKWARD_PLANES_SERIAL_BELOW
    spent, shapes, handles = models.time_each_call(variants)
    steps = {variant: models._training_step(m, x, labels) for variant, m in variants.items()}

    def other() -> None:  # both call paths follow the cut
        cpu.compiled.set_backward_planes_serial_below(below)
        cpu.BACKWARD_PLANES_SERIAL_BELOW = below
        try:
            steps["other"]()
        finally:
            cpu.compiled.set_backward_planes_serial_below(loaded)
            cpu.BACKWARD_PLANES_SERIAL_BELOW = loaded

    try:
        models.interleaved_times(
            {"torch": steps["torch"], "loaded": steps["loaded"], "other": other}, rounds, warmup=1)
    finally:
        for handle in handles:
            handle.remove()
    sums: dict[str, dict[str, float]] = {}
    for layer, shape in shapes.items():
        numel = math.prod(shape)
        cuts = [0, *sorted({below, loaded, cpu.SERIAL_BELOW})]
        band = next((f"{low}-{high - 1}" for low, high in zip(cuts, cuts[1:], strict=False)
                     if numel < high), f"{cuts[-1]} and more")
        for group in (f"{'x'.join(map(str, shape[2:]))}, {band} values", "every layer"):
            totals = sums.setdefault(group, {"layers": 0, "torch": 0.0, "loaded": 0.0,
                                             "other": 0.0})
            totals["layers"] += 1
            for variant in variants:
                totals[variant] += statistics.median(spent[variant, "backward", layer][1:])
    print(f"{spec.name}, backward, sums of the layers' median us; cut as loaded {loaded}, "
          f"other cut {below}, {rounds} rounds")
    print("| layers | count | torch | loaded | other | loaded/torch | other/torch | other/loaded |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for group, t in sorted(sums.items(), key=lambda item: item[0] == "every layer"):
        print(f"| {group} | {t['layers']} | {1e6 * t['torch']:.0f} | {1e6 * t['loaded']:.0f} | "
              f"{1e6 * t['other']:.0f} | {t['loaded'] / t['torch']:.2f} | "
              f"{t['other'] / t['torch']:.2f} | {t['other'] / t['loaded']:.2f} |", flush=True)


def main(argv: list[str]) -> int:
    if argv[:2] == ["kernel", "--busy"] and len(argv) > 3:
        kernel(argv[3:], busy_ms=float(argv[2]), rounds=40)
        return 0
    if argv[:1] == ["kernel"] and len(argv) > 1:
        kernel(argv[1:])
        return 0
    if argv[:2] == ["models", "--below"] and len(argv) > 3:
        rest = argv[3:]
        rounds = 15
        if rest[:1] == ["--rounds"] and len(rest) > 2:
            rounds, rest = int(rest[1]), rest[2:]
        models_side_by_side(rest, int(argv[2]), rounds)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
