"""Two versions of the CPU kernels side by side, kernel alone (an investigation, not a
benchmark suite: ``batchnorm bench`` is the judged comparison).

Both ``kernels.py`` files are loaded into one process under their own module names (each keeps
its own Numba cache next to its file), and the training forward and the backward of each are
called directly on NumPy arrays (float32, no residual), alternating old and new call by call, so
that both versions meet the same load on the host; which of the two goes first alternates
round by round. Before timing, it checks that both give the
same bits (output, statistics and the three gradients) and says where they do not.

For each shape and activation (identity, relu) it prints the median time per call of the old
version and the new/old ratio of medians, forward and backward. A shape ``RxC`` is a rows input
(channels_last or (N, C)); ``NxCxS`` is planes (NCHW with S values per plane).

Usage: ``python scripts/kernels_ab.py OLD_KERNELS_PY NEW_KERNELS_PY THREADS SHAPE...``; e.g.,
with the old version checked out by ``git worktree add /tmp/before <commit>``:
``python scripts/kernels_ab.py /tmp/before/src/batchnorm/backends/cpu/kernels.py
src/batchnorm/backends/cpu/kernels.py 1 100352x64 4x128x36``.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import numba
import numpy as np


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _calls(kernels, arrays, act: int, blocks: int):
    """(forward, backward, results): the two calls on fresh outputs, and those outputs."""
    x, grad, weight, bias = arrays
    channels = x.shape[1]
    out = np.empty_like(x)
    mean, var = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
    grad_input = np.empty_like(x)
    grad_weight, grad_bias = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
    rows = x.ndim == 2
    train = kernels.train_forward_rows if rows else kernels.train_forward_planes
    backward = kernels.backward_rows if rows else kernels.backward_planes

    def forward() -> None:
        train(x, weight, bias, 1e-5, act, x, False, out, mean, var, blocks)

    def gradients() -> None:
        backward(grad, x, x, False, mean, var, weight, bias, 1e-5, act, True, True, grad_input,
                 grad_input, False, grad_weight, grad_bias, blocks)

    forward()
    gradients()
    return forward, gradients, (out, mean, var, grad_input, grad_weight, grad_bias)


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    old = _load("kernels_old", argv[0])
    new = _load("kernels_new", argv[1])
    numba.set_num_threads(int(argv[2]))
    blocks = numba.get_num_threads()
    rng = np.random.default_rng(0)
    print("| shape | act | forward, old (us) | forward new/old | backward, old (us) | "
          "backward new/old | same bits |")
    print("|---|---|---:|---:|---:|---:|---|")
    for text in argv[3:]:
        shape = tuple(int(v) for v in text.split("x"))
        channels = shape[1]
        arrays = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1,
                  rng.standard_normal(shape, dtype=np.float32),
                  rng.random(channels, dtype=np.float32) + 0.5,
                  rng.standard_normal(channels, dtype=np.float32))
        for act, name in ((old.IDENTITY, "identity"), (old.RELU, "relu")):
            old_forward, old_backward, old_results = _calls(old, arrays, act, blocks)
            new_forward, new_backward, new_results = _calls(new, arrays, act, blocks)
            same = all(np.array_equal(a, b, equal_nan=True)
                       for a, b in zip(old_results, new_results, strict=True))
            repeats = max(1, int(3e6 // np.prod(shape)))
            times: dict[str, list[float]] = {key: [] for key in ("fo", "fn", "bo", "bn")}
            order = [("fo", old_forward), ("fn", new_forward), ("bo", old_backward),
                     ("bn", new_backward)]
            for round_ in range(32):
                # old first in even rounds, new first in odd ones: a call finds in the cache
                # what the call before it left there, so neither version always goes second
                swap = round_ % 2
                for key, call in (order[swap], order[1 - swap], order[2 + swap], order[3 - swap]):
                    start = time.perf_counter()
                    for _ in range(repeats):
                        call()
                    times[key].append((time.perf_counter() - start) / repeats)
            m = {key: 1e6 * statistics.median(values) for key, values in times.items()}
            print(f"| {text} | {name} | {m['fo']:.1f} | {m['fn'] / m['fo']:.2f} | "
                  f"{m['bo']:.1f} | {m['bn'] / m['bo']:.2f} | {'yes' if same else 'NO'} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
