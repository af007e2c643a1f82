"""Whole models with our batch norm on the compiled call path and on the Python path, beside
torch's, in one interleaved run (an investigation, not a benchmark suite; ``batchnorm bench
--suite models`` is the judged comparison).

For each model of the models suite whose name contains one of the given strings, five copies
are timed, a training step and an eval forward each, in a shuffled order every round
(``batchnorm.bench.models.interleaved_times``):

- ``torch``: the model as the zoo builds it; ``copy``: a second copy of it (the A/A control);
- ``compiled``: the model converted by ``batchnorm.convert``, on the compiled call path;
- ``python``: the same, every call inside ``batchnorm.backends.cpu.native.disabled()``.

Printed per model and mode: torch's median time and each copy's median of per-round ratios to
torch's, with its 95% interval from ranks.

Usage: ``python scripts/compiled_ab.py ROUNDS NAME...`` (e.g. ``21 torchvision timm``).
"""

from __future__ import annotations

import copy
import statistics
import sys

import torch

from batchnorm.backends.cpu import native
from batchnorm.bench import models
from batchnorm.bench.timing import median_interval
from batchnorm.convert import convert


def _python_path(function):
    def run():
        with native.disabled():
            function()

    return run


def main(rounds: int, names: list[str]) -> None:
    torch.set_num_threads(2)
    for spec in models.MODELS:
        if not any(name in spec.name for name in names):
            continue
        model = models.build(spec)
        x = models.input_for(spec)
        labels = torch.randint(0, models.CLASSES, (x.shape[0],),
                               generator=torch.Generator().manual_seed(0))
        copies = {
            "torch": model, "copy": copy.deepcopy(model),
            "compiled": convert(copy.deepcopy(model)), "python": convert(copy.deepcopy(model)),
        }
        functions = {}
        for name, module in copies.items():
            for mode, function in (("train", models._training_step(module, x, labels)),
                                   ("eval", models._eval_forward(module, x))):
                functions[(mode, name)] = _python_path(function) if name == "python" else function
        times = models.interleaved_times(functions, rounds, warmup=2)
        for mode in ("train", "eval"):
            base = times[(mode, "torch")]
            line = [f"{spec.name} {mode}: torch {1e3 * statistics.median(base):.1f} ms"]
            for name in ("copy", "compiled", "python"):
                ratios = [a / b for a, b in zip(times[(mode, name)], base, strict=True)]
                low, high = median_interval(ratios)
                line.append(f"{name} {statistics.median(ratios):.3f} [{low:.3f}, {high:.3f}]")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
