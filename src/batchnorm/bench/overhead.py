"""The fixed cost of one call on tiny layers: our module against torch's, and each hop of ours.

On layers of a few thousand values the arithmetic takes microseconds and the Python around it
decides. Two tables per shape:

- the module call, ours against ``torch.nn``'s (interleaved, median of per-round ratios): a
  training forward (parameters and input requiring grad, as inside a model), the same with
  its backward, and an eval forward under ``torch.no_grad``;
- the hops of our training forward, each timed alone (median microseconds per call), beside
  torch's: the module call, the validation (``_validate``: input, parameters, buffers,
  momentum, eps), the dispatch with its capture check (``select_backend``), an autograd
  Function that does nothing (the fixed cost of any Function), the backend's forward alone
  (output and batch statistics), its running-statistics update, torch's operator
  (``torch.batch_norm``) and the ``num_batches_tracked`` increment both modules make; and our
  module call with a backend that does no work: the whole fixed cost of our Python path.

The hops do not add up to the module call exactly (each is timed on its own, with its own
cache and branch-predictor state), but they show where the time goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.bench.shapes import SMALL, Shape
from batchnorm.bench.timing import Comparison, compare, per_call
from batchnorm.dispatch import register_backend, select_backend, unregister_backend, use_backend
from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

_OURS = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
_TORCH = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
MODES = ("train forward", "train forward+backward", "eval forward")


class _Empty(torch.autograd.Function):
    """An autograd Function that computes nothing: the fixed cost of any Function."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _NoWork:
    """A backend that computes nothing: its entries hand back tensors made once. A module call
    under it costs exactly our Python path (module, validation, dispatch, autograd Function,
    the running-statistics commit) and the backend's absence of work."""

    name = "no-work"

    def __init__(self, x: torch.Tensor) -> None:
        channels = x.shape[1]
        self.output, self.grad = torch.empty_like(x), torch.empty_like(x)
        self.mean, self.variance = torch.zeros(channels), torch.ones(channels)
        self.parameter_grad = torch.zeros(channels)

    def supports(self, x: torch.Tensor) -> bool:
        return True

    def train_forward(self, x, weight, bias, eps):
        return self.output, self.mean, self.variance

    def eval_forward(self, x, mean, variance, weight, bias, eps):
        return self.output

    def train_backward(self, grad_out, x, mean, variance, weight, eps, needs):
        return self.grad, self.parameter_grad, self.parameter_grad

    eval_backward = train_backward

    def updated_running_stats(self, running_mean, running_var, batch_mean, batch_var, momentum,
                              count=None, in_place=False):
        return running_mean, running_var, True


@dataclass(frozen=True)
class OverheadRow:
    shape: Shape
    modules: dict[str, Comparison]  # per mode: our module call / torch's
    hops: dict[str, float]  # seconds per call of each hop


def _modules(shape: Shape, dtype: torch.dtype = torch.float32):
    channels, ndim = shape.size[1], len(shape.size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape.size, generator=generator, dtype=dtype)
    grad = torch.randn(shape.size, generator=generator, dtype=dtype)
    return _OURS[ndim](channels, dtype=dtype), _TORCH[ndim](channels, dtype=dtype), x, grad


def _calls(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x_req = x.detach().requires_grad_(True)
    params = [module.weight, module.bias]

    def train_forward() -> None:
        module.train()
        module(x_req)

    def train_step() -> None:
        module.train()
        torch.autograd.grad(module(x_req), [x_req, *params], grad)

    def eval_forward() -> None:
        module.eval()
        with torch.no_grad():
            module(x)

    return dict(zip(MODES, (train_forward, train_step, eval_forward), strict=True))


def run_shape(shape: Shape, rounds: int = 15, clock=time.perf_counter) -> OverheadRow:
    ours, theirs, x, grad = _modules(shape)
    ours_calls, theirs_calls = _calls(ours, x, grad), _calls(theirs, x, grad)
    modules = {
        mode: compare(ours_calls[mode], theirs_calls[mode], rounds=rounds, clock=clock)
        for mode in MODES
    }
    ours.train()
    theirs.train()
    backend = select_backend(x)
    weight, bias = ours.weight.detach(), ours.bias.detach()
    running_mean, running_var = ours.running_mean.clone(), ours.running_var.clone()
    _, mean, variance = backend.train_forward(x, weight, bias, ours.eps)
    count = x.numel() // x.shape[1]
    tracked = ours.num_batches_tracked.clone()
    x_req = x.detach().requires_grad_(True)
    hops = {
        "torch module call": lambda: theirs(x_req),
        "ours module call": lambda: ours(x_req),
        "validation (_validate)": lambda: ours._validate(
            x, ours.running_mean, ours.running_var, True, None
        ),
        "dispatch + capture check (select_backend)": lambda: select_backend(x),
        "empty autograd Function": lambda: _Empty.apply(x_req, ours.weight, ours.bias),
        f"backend forward ({backend.name}.train_forward)": lambda: backend.train_forward(
            x, weight, bias, ours.eps
        ),
        f"running update ({backend.name}.updated_running_stats)": lambda: (
            backend.updated_running_stats(
                running_mean, running_var, mean, variance, 0.1, count, in_place=True
            )
        ),
        "torch operator (torch.batch_norm)": lambda: torch.batch_norm(
            x, weight, bias, running_mean, running_var, True, 0.1, 1e-5, False
        ),
        "num_batches_tracked.add_(1)": lambda: tracked.add_(1),
    }
    no_work = _NoWork(x)
    register_backend(no_work)
    try:
        with use_backend(no_work.name):
            hops["ours module call, backend doing no work"] = per_call(
                lambda: ours(x_req), rounds, clock=clock
            )
    finally:
        unregister_backend(no_work.name)
    timed = {name: fn if isinstance(fn, float) else per_call(fn, rounds, clock=clock)
             for name, fn in hops.items()}
    return OverheadRow(shape, modules, timed)


def run_overhead(
    shapes: list[Shape] | None = None, rounds: int = 15, clock=time.perf_counter
) -> list[OverheadRow]:
    return [run_shape(shape, rounds, clock) for shape in (SMALL if shapes is None else shapes)]


def format_overhead(rows: list[OverheadRow]) -> str:
    lines = [
        "| shape | size | mode | ours (us) | torch (us) | ours/torch (median) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        size = "x".join(map(str, row.shape.size))
        for mode, c in row.modules.items():
            lines.append(
                f"| {row.shape.name} | {size} | {mode} | {c.candidate_median_s * 1e6:.1f} | "
                f"{c.baseline_median_s * 1e6:.1f} | {c.median_ratio:.2f} |"
            )
    hop_names = list(rows[0].hops) if rows else []
    lines += [
        "",
        "Hops of a training forward, each timed alone (median us per call):",
        "",
        "| hop | " + " | ".join(f"{row.shape.name} {'x'.join(map(str, row.shape.size))}"
                               for row in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for name in hop_names:
        lines.append(
            f"| {name} | " + " | ".join(f"{row.hops[name] * 1e6:.2f}" for row in rows) + " |"
        )
    return "\n".join(lines)
