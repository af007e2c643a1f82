"""Where a small batch norm's backward spends its time inside a model (an investigation, not a
benchmark suite: it replaces parts of our path to see what each costs, so its gradients are not
meant to be right).

A stack of six conv 3x3 + batch norm layers (128 channels, input 4x128x6x6, the size of
densenet121's most frequent batch norm at batch 4, 96x96) runs training steps, torch's copy and
ours (converted) interleaved; autograd node hooks time each batch norm's backward where it runs,
between convolutions, as ``batchnorm bench --suite models --per-call`` does. Each mode swaps one
part of our backward:

- ``full``: our backward as it is;
- ``no-kernel``: everything but the kernel (its entry point replaced by a no-op);
- ``no-work``: the autograd Function's backward returns at once (autograd's own cost of a
  Python Function's backward: the floor of any backward written in Python);
- ``stages``: our common backward with a clock read between its steps;
- ``lean``: the shortest backward a Python Function could have: no question asked of the
  incoming gradient or the context, the kernel's arguments taken at forward time (a
  per-layer table filled then), dx the only allocation (dweight and dbias written into
  buffers made once), then the kernel; ``lean-no-kernel``: the same without the kernel. What
  remains over torch is the Function and the kernel call themselves.

Usage: ``python scripts/backward_floor.py [full|no-kernel|no-work|stages|lean|lean-no-kernel]
[rounds] [channels] [side]`` (defaults: full, 60 rounds, 128 channels of 6x6).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

import batchnorm
import batchnorm.autograd as autograd_module
from batchnorm.backends import cpu
from batchnorm.backends.cpu import kernels
from batchnorm.bench.models import _backward_span

CHANNELS, SIDE, LAYERS = 128, 6, 6


def _model(channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)]
    return nn.Sequential(*layers)


def _instrument(model: nn.Module, name: str, spent: dict) -> None:
    started: list[float] = [0.0]

    def after(module, args, output):
        first, last = _backward_span(output, args[0])
        first.register_prehook(lambda grads: started.__setitem__(0, time.perf_counter()))
        last.register_hook(lambda grads_in, grads_out: spent.setdefault(name, []).append(
            time.perf_counter() - started[0]))

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(after)


def _staged(stages: dict):
    """cpu.backward_common with a clock read between its steps (identity activation)."""
    clock = time.perf_counter

    def backward_common(grad_out, x, mean, variance, weight, bias, eps, needs,
                        activation="identity"):
        marks = [clock()]
        need_input, need_weight, need_bias = needs
        shape = x.shape
        batch, channels = shape[0], shape[1]
        numel = x.numel()
        size = numel // (batch * channels)
        planes = size > 1 and x.is_contiguous()
        marks.append(clock())
        if not (grad_out.dtype is x.dtype and grad_out.shape == shape
                and grad_out.stride() == x.stride() and grad_out.is_cpu
                and not grad_out.is_neg()):
            grad_out = cpu._conformed(grad_out, x, cpu._layout(x))
        marks.append(clock())
        grad_input = torch.empty_like(x)
        marks.append(clock())
        grad_weight = torch.empty(channels, dtype=x.dtype)
        grad_bias = torch.empty(channels, dtype=x.dtype)
        marks.append(clock())
        xp = x.data_ptr()
        arguments = (
            cpu._LIKE[x.dtype], batch, channels, size, planes, grad_out.data_ptr(), xp, xp,
            False, mean.data_ptr(), variance.data_ptr(), weight.data_ptr(), channels, 0, 0, eps,
            0, True, need_input, grad_input.data_ptr(), xp, False, grad_weight.data_ptr(),
            grad_bias.data_ptr(),
        )
        marks.append(clock())
        cpu._run(kernels.backward_at, numel, channels if planes else batch * size, *arguments)
        marks.append(clock())
        names = ("geometry", "incoming gradient's check", "empty_like (dx)",
                 "two empty (dweight, dbias)", "the kernel's arguments", "kernel call")
        for name, start, stop in zip(names, marks, marks[1:], strict=False):
            stages.setdefault(name, []).append(stop - start)
        return grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None

    return backward_common


def _lean(kernel: bool) -> None:
    """Mode ``lean``: the Function's forward records the kernel's arguments for its backward,
    which asks nothing and calls the kernel (the incoming gradient made contiguous only where
    it is not, as the sum's expanded gradient is for the last layer)."""
    function = autograd_module._BatchNormTrainUpdate
    forward = function.forward
    grad_weight: dict[int, torch.Tensor] = {}

    def lean_forward(ctx, x, weight, bias, rest):
        saved: list[torch.Tensor] = []
        save = ctx.save_for_backward
        ctx.save_for_backward = lambda *tensors: (saved.extend(tensors), save(*tensors))
        output = forward(ctx, x, weight, bias, rest)
        _, _, mean, variance = saved
        batch, channels = x.shape[0], x.shape[1]
        numel = x.numel()
        size = numel // (batch * channels)
        planes = size > 1 and x.is_contiguous()
        buffers = grad_weight.setdefault(channels, torch.empty(2, channels, dtype=x.dtype))
        xp = x.data_ptr()
        ctx.lean = (
            numel, channels if planes else batch * size,
            (cpu._LIKE[x.dtype], batch, channels, size, planes),
            (xp, xp, False, mean.data_ptr(), variance.data_ptr(), weight.data_ptr(), channels,
             0, 0, ctx.eps, 0, True, True),
            (xp, False, buffers[0].data_ptr(), buffers[1].data_ptr()),
            (buffers[0], buffers[1]),
        )
        return output

    def lean_backward(ctx, grad_out, _finite):
        numel, units, head, middle, tail, (dweight, dbias) = ctx.lean
        if not grad_out.is_contiguous():
            grad_out = grad_out.contiguous()
        dx = torch.empty_like(grad_out)
        if kernel:
            cpu._run(kernels.backward_at, numel, units, *head, grad_out.data_ptr(), *middle,
                     dx.data_ptr(), *tail)
        return dx, dweight, dbias, None

    function.forward = staticmethod(lean_forward)
    function.backward = staticmethod(lean_backward)
    autograd_module.call_backward_directly(function)  # the node runs the backward it has now


def main(mode: str = "full", rounds: int = 60, channels: int = CHANNELS, side: int = SIDE) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    theirs, ours = _model(channels), batchnorm.convert(_model(channels))
    spent: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {}
    _instrument(theirs, "torch", spent)
    _instrument(ours, "ours", spent)
    if mode == "no-kernel":
        kernels.backward_at = lambda *arguments: None
    elif mode == "no-work":
        autograd_module._BatchNormTrainUpdate.backward = staticmethod(
            lambda ctx, grad_out, _finite: (grad_out, None, None, None))
        autograd_module.call_backward_directly(autograd_module._BatchNormTrainUpdate)
    elif mode == "stages":
        cpu.backward_common = _staged(stages)
    elif mode in ("lean", "lean-no-kernel"):
        _lean(kernel=mode == "lean")
    elif mode != "full":
        raise SystemExit(f"unknown mode {mode!r}: full, no-kernel, no-work, stages, lean or "
                         "lean-no-kernel")
    x = torch.randn(4, channels, side, side)
    for r in range(rounds):
        for model in ((theirs, ours) if r % 2 else (ours, theirs)):
            model(x).sum().backward()
    half = LAYERS * rounds // 2  # the first half of the rounds is warm-up
    print(f"{mode}: median us per batch norm backward of 4x{channels}x{side}x{side}, {LAYERS} "
          f"layers x {rounds} steps (second half)")
    for name in ("torch", "ours"):
        print(f"  {name:5s} {statistics.median(spent[name][half:]) * 1e6:7.1f}")
    for name, values in stages.items():
        print(f"  ours: {name:28s} {statistics.median(values[len(values) // 2:]) * 1e6:6.1f}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(arguments[0] if arguments else "full", *(int(a) for a in arguments[1:4]))
