"""Eval latency of whole models with their batch norms folded (``batchnorm.fold``), against the
same models unfolded: as built (torch's or a model zoo's batch norms) and converted to ours.

The models are given by the caller: this module imports no model zoo. The measurement script
for torchvision's and timm's architectures is ``tests/zoo_models/fold_speed.py``, which imports
them through the test tooling (see ``tests/zoo.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.bench.timing import Comparison, compare
from batchnorm.convert import convert
from batchnorm.variants.fold import fold


@dataclass(frozen=True)
class FoldModelRow:
    name: str
    input_size: tuple[int, ...]
    batch_norms: int  # folded + left as per-channel affine + kept
    folded: int
    folded_vs_zoo: Comparison  # folded / the model as built
    folded_vs_ours: Comparison  # folded / the model converted to our batch norm


def _eval_call(model: nn.Module, x: torch.Tensor):
    def call() -> None:
        with torch.inference_mode():
            model(x)

    return call


def measure(name: str, model: nn.Module, x: torch.Tensor, rounds: int = 15) -> FoldModelRow:
    """Time ``model`` (eval mode) folded against itself unfolded, as built and converted to
    ours, interleaved (``batchnorm.bench.timing.compare``)."""
    zoo = model.eval()
    ours = convert(copy.deepcopy(model)).eval()
    folded, report = fold(zoo, return_report=True)
    with torch.inference_mode():
        expected = zoo(x)
        error = float((folded(x) - expected).abs().max() / expected.abs().max())
    if error > 1e-4:
        raise AssertionError(f"{name}: the folded model's outputs moved by {error:.1e}")
    count = len(report.folded) + len(report.left) + len(report.kept)
    return FoldModelRow(
        name, tuple(x.shape), count, len(report.folded),
        compare(_eval_call(folded, x), _eval_call(zoo, x), rounds=rounds),
        compare(_eval_call(folded, x), _eval_call(ours, x), rounds=rounds),
    )


def format_rows(rows: list[FoldModelRow]) -> str:
    lines = [
        "| model | input | batch norms | folded | as built (ms) | ours (ms) | folded (ms) "
        "| folded/as built | folded/ours |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        zoo, ours = row.folded_vs_zoo, row.folded_vs_ours
        lines.append(
            f"| {row.name} | {'x'.join(map(str, row.input_size))} | {row.batch_norms} | "
            f"{row.folded} | {zoo.baseline_median_s * 1e3:.1f} | "
            f"{ours.baseline_median_s * 1e3:.1f} | {zoo.candidate_median_s * 1e3:.1f} | "
            f"{zoo.median_ratio:.2f} | {ours.median_ratio:.2f} |"
        )
    return "\n".join(lines)
