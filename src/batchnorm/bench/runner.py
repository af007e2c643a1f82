"""The benchmark cases: ours against torch.nn, per shape, mode and layout."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from batchnorm.bench.shapes import Shape
from batchnorm.bench.timing import Comparison, compare
from batchnorm.dispatch import select_backend
from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.modules.norm_act import BatchNormAct1d, BatchNormAct2d

# train: forward + backward; eval: forward without gradients; train_<activation>: forward +
# backward of our BatchNormAct with that activation against torch's batch norm followed by it.
# The default run covers MODES; the smooth activations run when asked for (--mode).
ACTIVATION_MODES = {"train_relu": torch.relu, "train_silu": F.silu, "train_gelu": F.gelu}
MODES = ("train", "eval", "train_relu")
ALL_MODES = (*MODES, "train_silu", "train_gelu")
LAYOUTS = ("contiguous", "channels_last")

_OURS = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
_OURS_FUSED = {2: BatchNormAct1d, 3: BatchNormAct1d, 4: BatchNormAct2d}
_TORCH = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class _ThenActivation(nn.Module):
    """torch's unfused baseline: batch norm, then the activation."""

    def __init__(self, norm: nn.Module, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.norm, self.activation = norm, activation
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(x))


class _NoArithmetic(torch.autograd.Function):
    """A batch norm with the arithmetic taken out: the forward allocates the output and the
    backward the gradients, as any layer must, and nothing is computed."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


class NoOpLayer(nn.Module):
    """The cost that any batch norm written in Python on top of torch pays before its first
    operation: a module call, an autograd Function with a backward (in training), and the
    allocation of the output and input gradient (never written, so their first-touch page
    faults are not counted). Timed against torch's layer (the bench's ``no-op/torch`` column) it
    bounds from below the ratio that faster kernels behind such a Function can reach on a
    shape: on 60x100 the no-op alone takes about 0.6 of torch's whole training step."""

    def __init__(self, num_features: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _NoArithmetic.apply(x, self.weight, self.bias)
        return torch.empty_like(x)


@dataclass(frozen=True)
class Row:
    shape: Shape
    mode: str
    layout: str
    backend: str
    comparison: Comparison
    floor: Comparison  # ours against the memory floor (memory_floor) on the same tensors
    torch_floor: Comparison  # torch's layer against the same floor
    noop: Comparison  # NoOpLayer against torch's layer: the floor of any layer built like ours


def _make_input(shape: Shape, layout: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.size, generator=generator, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode.startswith("train"):
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


def memory_floor(x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], None]:
    """The traffic a batch norm must move, as the fastest torch operations move it.

    Training (forward and backward) reads the input and the output gradient and writes the
    output and the input gradient, and its statistics need a pass over each of the two before
    the writes: 8 tensors of the input's size, 4 times one copy. Two of the writes go to new
    tensors (the output and the input gradient), whose first touch costs page faults on a
    freshly mapped allocation; the floor is therefore 2 clones (new tensors) plus 2 copies into
    tensors that exist. Eval reads the input once and writes a new output: 1 clone."""
    if not mode.startswith("train"):
        return x.clone
    first, second = torch.empty_like(x), torch.empty_like(x)
    first.copy_(x)  # touched once: their pages stay mapped
    second.copy_(grad)

    def floor() -> None:
        x.clone()
        grad.clone()
        first.copy_(x)
        second.copy_(grad)

    return floor


def applicable_layouts(shape: Shape) -> tuple[str, ...]:
    return LAYOUTS if len(shape.size) == 4 else ("contiguous",)


def run_case(
    shape: Shape, mode: str, layout: str, dtype: torch.dtype = torch.float32, rounds: int = 15
) -> Row:
    x = _make_input(shape, layout, dtype, seed=0)
    grad = _make_input(shape, layout, dtype, seed=1)
    channels, ndim = shape.size[1], len(shape.size)
    if mode in ACTIVATION_MODES:
        activation = mode.removeprefix("train_")
        ours = _OURS_FUSED[ndim](channels, activation=activation, dtype=dtype)
        theirs = _ThenActivation(_TORCH[ndim](channels, dtype=dtype), ACTIVATION_MODES[mode])
    else:
        ours = _OURS[ndim](channels, dtype=dtype)
        theirs = _TORCH[ndim](channels, dtype=dtype)
    ours_step, theirs_step = _step(ours, x, grad, mode), _step(theirs, x, grad, mode)
    comparison = compare(ours_step, theirs_step, rounds=rounds)
    floor = memory_floor(x, grad, mode)
    ours_floor = compare(ours_step, floor, rounds=rounds)
    torch_floor = compare(theirs_step, floor, rounds=rounds)
    noop_step = _step(NoOpLayer(channels, dtype=dtype), x, grad, mode)
    noop = compare(noop_step, theirs_step, rounds=rounds)
    return Row(
        shape, mode, layout, select_backend(x).name, comparison, ours_floor, torch_floor, noop
    )


_FIRST_CALL = """
import time
start = time.perf_counter()
import torch, batchnorm
imported = time.perf_counter()
module = batchnorm.BatchNorm2d(8)
x = torch.randn(4, 8, 16, 16, requires_grad=True)
def step():
    module(x).sum().backward()
begin = time.perf_counter(); step(); first = time.perf_counter() - begin
begin = time.perf_counter(); step(); second = time.perf_counter() - begin
print(batchnorm.select_backend(x).name, imported - start, first, second)
"""


@dataclass(frozen=True)
class FirstCall:
    backend: str
    import_s: float
    first_s: float  # first training step in the process: loads (or compiles) the kernels
    second_s: float


def first_call_latency() -> FirstCall:
    """The first training step in a new process, with the disk cache as it is now."""
    import subprocess
    import sys

    output = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL], check=True, capture_output=True, text=True
    ).stdout.split()
    return FirstCall(output[0], *map(float, output[1:]))


def machine_description() -> str:
    """Machine, torch version and threads; plus the C allocator's tunables when set, since they
    decide whether freed tensors return to the OS and page-fault back in (see BENCHMARKS.md)."""
    description = (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    tunables = os.environ.get("GLIBC_TUNABLES")
    return description + (f", GLIBC_TUNABLES={tunables}" if tunables else "")


def format_faults(comparison: Comparison) -> str:
    """``ours / torch`` minor page faults per call during the timed samples ("n/a" where the
    platform does not count them)."""
    if comparison.candidate_faults is None or comparison.baseline_faults is None:
        return "n/a"
    return f"{comparison.candidate_faults:.0f} / {comparison.baseline_faults:.0f}"


def format_table(rows: list[Row]) -> str:
    header = (
        "| shape | size | mode | layout | backend | ours (ms) | torch (ms) | ours/torch (median) "
        "| ours/floor (median) | torch/floor (median) | no-op/torch (median) "
        "| page faults per call (ours / torch) |\n"
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        c = row.comparison
        lines.append(
            f"| {row.shape.name} | {'x'.join(map(str, row.shape.size))} | {row.mode} | "
            f"{row.layout} | {row.backend} | {c.candidate_median_s * 1e3:.3f} | "
            f"{c.baseline_median_s * 1e3:.3f} | {c.median_ratio:.2f} | "
            f"{row.floor.median_ratio:.2f} | {row.torch_floor.median_ratio:.2f} | "
            f"{row.noop.median_ratio:.2f} | "
            f"{format_faults(c)} |"
        )
    return "\n".join(lines)
