"""The benchmark cases: ours against torch.nn, per shape, mode and layout."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.bench.shapes import Shape
from batchnorm.bench.timing import Comparison, compare
from batchnorm.dispatch import select_backend
from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

MODES = ("train", "eval")
LAYOUTS = ("contiguous", "channels_last")

_OURS = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
_TORCH = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclass(frozen=True)
class Row:
    shape: Shape
    mode: str
    layout: str
    backend: str
    comparison: Comparison


def _make_input(shape: Shape, layout: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.size, generator=generator, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "train":
        module.train()
        params = [module.weight, module.bias]

        def train_step() -> None:
            x_req = x.detach().requires_grad_(True)
            out = module(x_req)
            torch.autograd.grad(out, [x_req, *params], grad)

        return train_step
    module.eval()

    def eval_step() -> None:
        with torch.no_grad():
            module(x)

    return eval_step


def applicable_layouts(shape: Shape) -> tuple[str, ...]:
    return LAYOUTS if len(shape.size) == 4 else ("contiguous",)


def run_case(
    shape: Shape, mode: str, layout: str, dtype: torch.dtype = torch.float32, rounds: int = 15
) -> Row:
    x = _make_input(shape, layout, dtype, seed=0)
    grad = _make_input(shape, layout, dtype, seed=1)
    channels = shape.size[1]
    ours = _OURS[len(shape.size)](channels, dtype=dtype)
    theirs = _TORCH[len(shape.size)](channels, dtype=dtype)
    comparison = compare(_step(ours, x, grad, mode), _step(theirs, x, grad, mode), rounds=rounds)
    return Row(shape, mode, layout, select_backend(x).name, comparison)


def machine_description() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def format_table(rows: list[Row]) -> str:
    header = (
        "| shape | size | mode | layout | backend | ours (ms) | torch (ms) | ours/torch (median) |\n"
        "|---|---|---|---|---|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        c = row.comparison
        lines.append(
            f"| {row.shape.name} | {'x'.join(map(str, row.shape.size))} | {row.mode} | "
            f"{row.layout} | {row.backend} | {c.candidate_median_s * 1e3:.3f} | "
            f"{c.baseline_median_s * 1e3:.3f} | {c.median_ratio:.2f} |"
        )
    return "\n".join(lines)
