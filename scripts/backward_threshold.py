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

``python scripts/backward_threshold.py models --below N [batchnorm bench arguments]``
    ``batchnorm bench --suite models ...`` with the threshold set to N before the first call,
    so that one checkout times the model's calls with another threshold (``--per-call`` gives
    the backward of each layer inside the model).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import batchnorm
from batchnorm.backends import cpu
from batchnorm.backends.cpu import kernels


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


def main(argv: list[str]) -> int:
    if argv[:2] == ["kernel", "--busy"] and len(argv) > 3:
        kernel(argv[3:], busy_ms=float(argv[2]), rounds=40)
        return 0
    if argv[:1] == ["kernel"] and len(argv) > 1:
        kernel(argv[1:])
        return 0
    if argv[:2] == ["models", "--below"] and len(argv) > 2:
        cpu.BACKWARD_PLANES_SERIAL_BELOW = int(argv[2])  # before the first call loads it
        from batchnorm import cli

        return cli.main(["bench", "--suite", "models", *argv[3:]])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
