"""What an inference call costs when the caches are cold (an investigation, not a benchmark
suite): before every timed call a 16 MB copy evicts the input, the per-channel tensors and the
code's data from the caches, as a model's convolutions do between its batch norms.

For each shape of torchvision resnet50's batch norms at batch 8, 64x64 (and two larger ones),
four calls are timed in turn, each after its own eviction, and their medians printed in us:

- ``torch``: ``torch.nn.functional.batch_norm`` in eval (torch's whole inference call);
- ``ours``: ``batchnorm.backends.cpu.eval_common`` (our inference call from the dispatch point
  on: the checks, the output's allocation, the kernel);
- ``kernel``: the kernel's entry point alone, writing into an output allocated once (no checks,
  no allocation);
- ``empty``: ``torch.empty_like`` of the input alone;

with the minor page faults per call of ``torch`` and ``ours`` (a fresh output can fault on
first touch; then the difference is the allocator's, not the code's).

Usage: ``python scripts/eval_cold.py [rounds] [threads]`` (defaults: 101 rounds, 2 threads).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from batchnorm.backends import cpu
from batchnorm.backends.cpu import kernels

SHAPES = [
    (8, 64, 32, 32), (8, 64, 16, 16), (8, 256, 16, 16), (8, 128, 8, 8), (8, 512, 8, 8),
    (8, 256, 4, 4), (8, 1024, 4, 4), (8, 512, 2, 2), (8, 2048, 2, 2),
]
EPS = 1e-5


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _shape_times(shape, rounds, source, sink):
    """Median us and page faults per call of each of the four calls on ``shape``."""
    batch, channels = shape[:2]
    size = shape[2] * shape[3]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    mean = torch.randn(channels, generator=generator)
    var = torch.rand(channels, generator=generator) + 0.5
    out = torch.empty_like(x)
    arguments = (
        np.float32(0), batch, channels, size, True, x.data_ptr(), mean.data_ptr(),
        var.data_ptr(), weight.data_ptr(), channels, bias.data_ptr(), channels, EPS,
        kernels.ACTIVATIONS["identity"], x.data_ptr(), False, out.data_ptr(), 1,
    )
    calls = {
        "torch": lambda: F.batch_norm(x, mean, var, weight, bias, False, 0.1, EPS),
        "ours": lambda: cpu.eval_common(x, mean, var, weight, bias, EPS),
        "kernel": lambda: kernels.eval_forward_at(*arguments),
        "empty": lambda: torch.empty_like(x),
    }
    times = {name: [] for name in calls}
    faults = dict.fromkeys(calls, 0)
    with torch.no_grad():
        expected = calls["torch"]()
        torch.testing.assert_close(calls["ours"](), expected)
        calls["kernel"]()
        torch.testing.assert_close(out, expected)
        for _ in range(rounds):
            for name, call in calls.items():
                sink.copy_(source)
                before = _faults()
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
                faults[name] += _faults() - before
    us = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    return us, {name: count / rounds for name, count in faults.items()}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 101
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(threads)
    source, sink = torch.empty(4 << 20), torch.empty(4 << 20)
    print(f"cold inference calls, {threads} threads, {rounds} rounds, median us "
          "(page faults per call)")
    print(f"{'shape':>18} {'torch':>14} {'ours':>14} {'ours/torch':>10} {'kernel':>7} "
          f"{'empty':>6}")
    for shape in SHAPES:
        us, faults = _shape_times(shape, rounds, source, sink)
        print(f"{'x'.join(map(str, shape)):>18} "
              f"{us['torch']:7.1f} ({faults['torch']:4.0f}) "
              f"{us['ours']:7.1f} ({faults['ours']:4.0f}) "
              f"{us['ours'] / us['torch']:10.2f} {us['kernel']:7.1f} {us['empty']:6.1f}")


if __name__ == "__main__":
    main()
