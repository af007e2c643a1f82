"""``batchnorm bench --device cuda``: ours against torch's own batch norm (cuDNN or native) on a
GPU, interleaved, with each one's effective bandwidth as a share of the device's measured
device-to-device copy bandwidth.

Traffic, in multiples of the input's bytes, that a two-pass batch norm must move (ours and
torch's native kernels alike; the per-channel vectors are negligible):

- training forward, 3: read x for the statistics, read x again and write y;
- training backward, 5: read g and x for the two gradient sums, read them again and write dx;
- eval forward, 2: read x, write y;
- so a training step (forward + backward) moves 8, with or without the fused ReLU (torch's
  unfused ReLU moves 4 more: read and write y in the forward, read y and g in the backward).

Times are medians of CUDA-event timings over interleaved rounds (ours and torch alternate, order
shuffled), each round running a step ``inner`` times; a step is the module call (and its
backward) with the usual Python around it. "kernels" times our backend's entry points called
directly, without the module, autograd and argument checks: what the kernels themselves reach.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.dispatch import select_backend
from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.modules.norm_act import BatchNormAct1d, BatchNormAct2d

# multiples of the input's bytes that each mode must move (see the module docstring)
TRAFFIC = {"train": 8, "eval": 2, "train_relu": 8}
MODES = tuple(TRAFFIC)


@dataclass(frozen=True)
class Case:
    name: str
    size: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "contiguous" or "channels_last"
    mode: str  # "train" (forward + backward), "eval", "train_relu" (fused, against BN + ReLU)

    @property
    def traffic_bytes(self) -> int:
        count = 1
        for s in self.size:
            count *= s
        return TRAFFIC[self.mode] * count * torch.empty((), dtype=self.dtype).element_size()


def default_cases() -> list[Case]:
    """Large ResNet-like layers in float16 and float32, one very large float16 input, and a small
    C with a huge N*L (where torch runs one block per channel); each in both layouts where it
    has four dims, in every mode."""
    inputs = [
        ("resnet.56x56", (32, 256, 56, 56), torch.float16),
        ("resnet.56x56", (32, 256, 56, 56), torch.float32),
        ("large.1024x1024", (4, 128, 1024, 1024), torch.float16),
        ("small-c.65536", (20, 6, 65536), torch.float32),
        ("small-c.65536", (20, 6, 65536), torch.float16),
    ]
    return _cases(inputs)


def quick_cases() -> list[Case]:
    return _cases([("quick", (8, 64, 28, 28), torch.float16), ("quick-c", (4, 3, 4096),
                                                                torch.float32)])


def _cases(inputs) -> list[Case]:
    cases = []
    for name, size, dtype in inputs:
        layouts = ("contiguous", "channels_last") if len(size) == 4 else ("contiguous",)
        for layout in layouts:
            for mode in MODES:
                cases.append(Case(name, size, dtype, layout, mode))
    return cases


@dataclass(frozen=True)
class Row:
    case: Case
    backend: str
    ours_s: float
    torch_s: float
    kernels_s: float | None  # our backend's entry points called directly
    copy_bandwidth: float  # bytes per second, device to device

    @property
    def speedup(self) -> float:
        return self.torch_s / self.ours_s

    def share(self, seconds: float | None) -> float | None:
        """Effective bandwidth over the case's traffic, as a share of the copy bandwidth."""
        if seconds is None:
            return None
        return self.case.traffic_bytes / seconds / self.copy_bandwidth


# -- timing -----------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``inner`` calls: CUDA events on a GPU, else the clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - begin) / inner


def interleaved(functions: list[Callable[[], object]], device: torch.device, rounds: int,
                target_s: float = 0.02, seed: int = 0) -> list[float]:
    """Median seconds per call of each function, timed in alternation (order shuffled)."""
    for fn in functions:  # warm up: compilation, caches, allocator
        for _ in range(3):
            fn()
    _synchronize(device)
    once = min(time_calls(fn, 1, device) for fn in functions)
    inner = max(1, min(200, int(target_s / max(once, 1e-6))))
    order = random.Random(seed)
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(rounds):
        indices = list(range(len(functions)))
        order.shuffle(indices)
        for index in indices:
            samples[index].append(time_calls(functions[index], inner, device))
    return [statistics.median(times) for times in samples]


def copy_bandwidth(device: torch.device, megabytes: int = 1024, rounds: int = 5) -> float:
    """Bytes per second of a device-to-device copy (read + write counted) of a large buffer."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = interleaved([lambda: target.copy_(source)], device, rounds)[0]
    return 2 * source.numel() / seconds


# -- one case ---------------------------------------------------------------------------------


def _input(case: Case, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.size, generator=generator, device=device, dtype=case.dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _modules(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module]:
    channels, four_dims = case.size[1], len(case.size) == 4
    if case.mode == "train_relu":
        ours = (BatchNormAct2d if four_dims else BatchNormAct1d)(channels, activation="relu")
        torch_norm = (nn.BatchNorm2d if four_dims else nn.BatchNorm1d)(channels)
        theirs = nn.Sequential(torch_norm, nn.ReLU())
    else:
        ours = (BatchNorm2d if four_dims else BatchNorm1d)(channels)
        theirs = (nn.BatchNorm2d if four_dims else nn.BatchNorm1d)(channels)
    # the non-finite check would cost a host synchronization per step (torch has none); the
    # protection of the running statistics stays
    ours.warn_on_nonfinite = False
    return ours.to(device), theirs.to(device)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str):
    parameters = [p for p in module.parameters()]
    if mode == "eval":
        module.eval()

        def eval_step():
            with torch.no_grad():
                module(x)

        return eval_step
    module.train()

    def train_step():
        x_req = x.detach().requires_grad_(True)
        torch.autograd.grad(module(x_req), [x_req, *parameters], grad)

    return train_step


def _kernels_step(x: torch.Tensor, grad: torch.Tensor, mode: str):
    """Our backend's entry points called directly (None where the backend has none)."""
    backend = select_backend(x)
    if not hasattr(backend, "forward"):
        return None
    channels = x.shape[1]
    weight = torch.ones(channels, device=x.device)
    bias = torch.zeros(channels, device=x.device)
    activation = "relu" if mode == "train_relu" else "identity"
    if mode == "eval":
        return lambda: backend.forward(x, weight, bias, 1e-5, mean=bias, variance=weight)

    def step():
        _, mean, variance = backend.forward(x, weight, bias, 1e-5, activation=activation)
        backend.backward(grad, x, mean, variance, weight, bias, 1e-5, (True, True, True),
                         train=True, activation=activation)

    return step


def run_case(case: Case, device: torch.device, bandwidth: float, rounds: int = 15) -> Row:
    x, grad = _input(case, device, seed=0), _input(case, device, seed=1)
    ours, theirs = _modules(case, device)
    steps = [_step(ours, x, grad, case.mode), _step(theirs, x, grad, case.mode)]
    kernels = _kernels_step(x, grad, case.mode)
    if kernels is not None:
        steps.append(kernels)
    times = interleaved(steps, device, rounds)
    return Row(case, select_backend(x).name, times[0], times[1],
               times[2] if kernels is not None else None, bandwidth)


# -- report -----------------------------------------------------------------------------------


def describe(device: torch.device, bandwidth: float) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"{name}, torch {torch.__version__}, triton {triton_version}; device-to-device copy "
            f"{bandwidth / 1e9:.0f} GB/s")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def format_table(rows: list[Row]) -> str:
    header = (
        "| case | size | dtype | layout | mode | backend | ours (ms) | torch (ms) | torch/ours "
        "| ours % copy BW | torch % copy BW | kernels (ms) | kernels % copy BW |\n"
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        case = row.case
        kernels = "n/a" if row.kernels_s is None else f"{row.kernels_s * 1e3:.3f}"
        lines.append(
            f"| {case.name} | {'x'.join(map(str, case.size))} | "
            f"{str(case.dtype).removeprefix('torch.')} | {case.layout} | {case.mode} | "
            f"{row.backend} | {row.ours_s * 1e3:.3f} | {row.torch_s * 1e3:.3f} | "
            f"{row.speedup:.2f} | {_percent(row.share(row.ours_s))} | "
            f"{_percent(row.share(row.torch_s))} | {kernels} | "
            f"{_percent(row.share(row.kernels_s))} |"
        )
    return "\n".join(lines)


def run(cases: list[Case], device: torch.device, rounds: int = 15,
        progress: Callable[[Row], None] | None = None) -> tuple[str, list[Row]]:
    """Time every case; returns the description line and the rows."""
    bandwidth = copy_bandwidth(device, megabytes=1024 if device.type == "cuda" else 16,
                               rounds=rounds)
    rows = []
    for case in cases:
        row = run_case(case, device, bandwidth, rounds)
        rows.append(row)
        if progress is not None:
            progress(row)
        del row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return describe(device, bandwidth), rows
