"""Measure what ``batchnorm.fold`` buys in eval on the real architectures of
tests/zoo_models/models.py (the BENCHMARKS.md section "Folding whole models").

    .venv/bin/python -m tests.zoo_models.fold_speed --rounds 15 [--size 224] [--batch 8]

Models come through tests/zoo.py (torchvision's wheel needs help to import beside the CPU
build of torch; that help stays in the test tooling). Timing is ``batchnorm.bench``'s
interleaved comparison: medians of per-round ratios, so other load on the machine moves both
sides of each ratio alike.
"""

from __future__ import annotations

import argparse
import sys

import torch

from batchnorm.bench.fold_models import format_rows, measure
from tests.zoo_models.models import MODELS, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator()
                        .manual_seed(0))
        rows.append(measure(name, build(name, in_test=False), x, rounds=args.rounds))
        print(f"{name}: {rows[-1].folded_vs_zoo.median_ratio:.2f}", file=sys.stderr)
    print(format_rows(rows))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
