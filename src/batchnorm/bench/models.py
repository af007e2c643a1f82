"""Whole models: a training step and an eval forward with our batch norm against torch's.

For each architecture (torchvision's and timm's, random weights, no download) four copies of
one model are timed, interleaved in a shuffled order every round:

- ``torch``: the model as the zoo builds it;
- ``torch (copy)``: an identical second copy, the A/A control: its ratio to ``torch`` shows how
  far two runs of the same work differ on this machine (a whole-step ratio within that spread
  of 1 is noise);
- ``ours``: the same model after ``batchnorm.convert`` (timm's ``BatchNormAct2d`` included,
  into our fused layer);
- ``no batch norm``: the same model with every batch norm replaced by ``nn.Identity`` (timm's
  fused layers by their drop and activation, which stay), so that ``step - step without batch
  norm`` is batch norm's own time in the step, for torch's and for ours.

A training step is forward, cross-entropy loss, backward and an SGD step; the eval forward runs
under ``torch.no_grad``. Every ratio is the median of per-round ratios (both sides of a ratio
come from the same round), with a 95% interval for it from ranks (it assumes nothing of the
ratios' distribution, whose tails a burst of load on the host makes heavy) and the smallest and
largest per-round value as its spread. Each ratio of ours to torch gets a verdict by a rule
written before any run (:func:`verdict`): slower, faster or level by its interval, once the A/A
control's interval holds 1.

The model zoos are imported through ``batchnorm.bench.zoo`` (see there why torchvision needs
help beside the CPU build of torch); :func:`measure` takes any model, so the tests use a small
one of their own.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.bench.timing import median_interval
from batchnorm.convert import convert

VARIANTS = ("torch", "torch (copy)", "ours", "no batch norm")


@dataclass(frozen=True)
class ModelSpec:
    """An architecture and the input it is timed on (``batch`` images of ``size`` x ``size``),
    chosen so that torch's training step takes 0.1 to 2 s on 2 cores."""

    name: str  # "<zoo>.<architecture>"
    batch: int
    size: int

    @property
    def zoo(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def architecture(self) -> str:
        return self.name.split(".", 1)[1]


# Sizes from single-threaded steps measured under other processes' load (thread CPU time):
# resnet18 8x96 0.21 s, resnet50 4x64 0.25 s, mobilenet_v3_small 8x128 0.10 s, efficientnet_b0
# 4x96 0.15 s, densenet121 4x64 0.14 s, timm's mobilenetv3 8x128 0.07 s; scaled up so that two
# threads on an idle machine stay above 0.1 s.
MODELS = [
    ModelSpec("torchvision.resnet18", 8, 128),
    ModelSpec("torchvision.resnet50", 8, 64),
    ModelSpec("torchvision.mobilenet_v3_small", 16, 160),
    ModelSpec("torchvision.efficientnet_b0", 8, 96),
    ModelSpec("torchvision.densenet121", 4, 96),
    ModelSpec("timm.resnet18", 8, 128),
    ModelSpec("timm.efficientnet_b0", 8, 96),
    ModelSpec("timm.mobilenetv3_small_100", 16, 160),
]
# --quick: one small model on a small input, for a smoke run.
QUICK = [ModelSpec("torchvision.resnet18", 2, 32)]
CLASSES = 10


def build(spec: ModelSpec) -> nn.Module:
    """The zoo's model with random weights (seeded; nothing downloaded), in training mode."""
    from batchnorm.bench import zoo

    torch.manual_seed(0)
    if spec.zoo == "torchvision":
        return getattr(zoo.load_torchvision().models, spec.architecture)(num_classes=CLASSES)
    if spec.zoo == "timm":
        return zoo.load_timm().create_model(spec.architecture, num_classes=CLASSES)
    raise ValueError(f"unknown model zoo {spec.zoo!r} in {spec.name!r}")


def without_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with every batch norm replaced by ``nn.Identity``; a batch
    norm that holds its drop layer and activation as children (timm's ``BatchNormAct2d``) by
    those two, which then still run."""
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            modules = child._modules
            if "act" in modules and "drop" in modules:
                replacement: nn.Module = nn.Sequential(modules["drop"], modules["act"])
            else:
                replacement = nn.Identity()
            setattr(model, name, replacement)
        else:
            without_batch_norm(child)
    return model


@dataclass(frozen=True)
class BatchNormCall:
    """One batch norm call of a model's forward: where, on what, and in which layout."""

    name: str  # the layer's qualified name in the model
    size: tuple[int, ...]
    channels_last: bool


def batch_norm_calls(model: nn.Module, x: torch.Tensor) -> list[BatchNormCall]:
    """Every batch norm call of one training forward of ``model`` on ``x``, in order (the
    model's running statistics move by that one step, as in training)."""
    calls: list[BatchNormCall] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):

            def record(module, args, name=name):
                input = args[0]
                channels_last = input.dim() == 4 and not input.is_contiguous() and (
                    input.is_contiguous(memory_format=torch.channels_last)
                )
                calls.append(BatchNormCall(name, tuple(input.shape), channels_last))

            handles.append(module.register_forward_pre_hook(record))
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    return step


def _eval_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return forward


def interleaved_times(
    functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of one call of each function, ``rounds`` times, the order shuffled each round
    (so that load on the machine falls on every function alike). ``clock``: wall time, or
    ``time.thread_time`` for single-threaded runs on a loaded machine (see
    ``batchnorm.bench.timing.compare``)."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    order = random.Random(seed)
    names = list(functions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            start = clock()
            functions[name]()
            times[name].append(clock() - start)
    return times


@dataclass(frozen=True)
class Ratio:
    """The median of per-round ratios, its 95% interval (``batchnorm.bench.timing.
    median_interval``: nan with fewer than six rounds) and the smallest and largest per-round
    value."""

    median: float
    low: float
    high: float
    interval_low: float = math.nan
    interval_high: float = math.nan

    @classmethod
    def of(cls, values: list[float]) -> Ratio:
        return cls(statistics.median(values), min(values), max(values),
                   *median_interval(values))

    def __str__(self) -> str:
        if math.isnan(self.interval_low):
            return f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f})"
        return (f"{self.median:.2f} [{self.interval_low:.2f}, {self.interval_high:.2f}] "
                f"({self.low:.2f}-{self.high:.2f})")


# The verdict on a whole-model ratio, fixed before any run: the A/A control first (two identical
# models must time alike, or the run's order or the host favoured one position, and no ratio of
# that run is judged), then our model against torch's by the 95% interval of the median ratio.
SLOWER, FASTER, LEVEL, NOT_JUDGED = "slower", "faster", "level", "not judged"


def verdict(ours_vs_torch: Ratio, control: Ratio) -> str:
    """``slower`` where the interval of ours/torch lies above 1, ``faster`` where below,
    ``level`` where it holds 1; ``not judged`` where the A/A control's interval excludes 1 or
    either has no interval (too few rounds)."""
    if any(math.isnan(v) for v in (ours_vs_torch.interval_low, control.interval_low)):
        return NOT_JUDGED
    if not control.interval_low <= 1.0 <= control.interval_high:
        return NOT_JUDGED
    if ours_vs_torch.interval_low > 1.0:
        return SLOWER
    if ours_vs_torch.interval_high < 1.0:
        return FASTER
    return LEVEL


@dataclass(frozen=True)
class ModeResult:
    """One mode (training step or eval forward) of one model."""

    torch_s: float  # median seconds of torch's step
    ours_s: float
    no_batch_norm_s: float
    ours_vs_torch: Ratio
    control: Ratio  # torch (copy) / torch: the A/A control
    torch_share: Ratio  # batch norm's share of torch's step
    ours_share: Ratio  # batch norm's share of our step
    batch_norm_time: Ratio  # ours / torch, batch norm's own time (step minus no batch norm)


def summarize(times: dict[str, list[float]]) -> ModeResult:
    """Ratios per round from the interleaved times of the four variants."""
    torch_t, copy_t = times["torch"], times["torch (copy)"]
    ours_t, bare_t = times["ours"], times["no batch norm"]
    rounds = range(len(torch_t))

    def per_round(formula) -> Ratio:
        return Ratio.of([formula(i) for i in rounds])

    return ModeResult(
        torch_s=statistics.median(torch_t),
        ours_s=statistics.median(ours_t),
        no_batch_norm_s=statistics.median(bare_t),
        ours_vs_torch=per_round(lambda i: ours_t[i] / torch_t[i]),
        control=per_round(lambda i: copy_t[i] / torch_t[i]),
        torch_share=per_round(lambda i: (torch_t[i] - bare_t[i]) / torch_t[i]),
        ours_share=per_round(lambda i: (ours_t[i] - bare_t[i]) / ours_t[i]),
        # a round whose torch batch norm time is not positive (noise larger than the time
        # itself) has no ratio; with none left the figure is NaN
        batch_norm_time=_bn_ratio(torch_t, ours_t, bare_t),
    )


def _bn_ratio(torch_t: list[float], ours_t: list[float], bare_t: list[float]) -> Ratio:
    values = [
        (ours - bare) / (theirs - bare)
        for theirs, ours, bare in zip(torch_t, ours_t, bare_t, strict=True)
        if theirs > bare
    ]
    return Ratio.of(values) if values else Ratio(float("nan"), float("nan"), float("nan"))


@dataclass(frozen=True)
class ModelRow:
    name: str
    input_size: tuple[int, ...]
    batch_norms: int  # batch norm layers in the model as built
    converted: int  # of those, now ours
    train: ModeResult
    eval: ModeResult


def measure(
    name: str, model: nn.Module, x: torch.Tensor, rounds: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> ModelRow:
    """Time ``model``'s training step and eval forward on ``x``: as built, an identical copy,
    converted to ours, and without batch norm (interleaved; see the module docstring)."""
    model.train()
    variants = {
        "torch": model,
        "torch (copy)": copy.deepcopy(model),
        "ours": convert(copy.deepcopy(model)),
        "no batch norm": without_batch_norm(copy.deepcopy(model)),
    }
    ours_modules = sum(
        1 for m in variants["ours"].modules()
        if isinstance(m, _BatchNorm) and type(m).__module__.startswith("batchnorm.")
    )
    labels = torch.randint(0, CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    steps = {n: _training_step(m, x, labels) for n, m in variants.items()}
    forwards = {n: _eval_forward(m, x) for n, m in variants.items()}
    together = {**{("train", n): f for n, f in steps.items()},
                **{("eval", n): f for n, f in forwards.items()}}
    times = interleaved_times(together, rounds, clock=clock)  # type: ignore[arg-type]
    return ModelRow(
        name,
        tuple(x.shape),
        sum(1 for m in model.modules() if isinstance(m, _BatchNorm)),
        ours_modules,
        summarize({n: times[("train", n)] for n in VARIANTS}),
        summarize({n: times[("eval", n)] for n in VARIANTS}),
    )


def input_for(spec: ModelSpec) -> torch.Tensor:
    return torch.randn(spec.batch, 3, spec.size, spec.size,
                       generator=torch.Generator().manual_seed(0))


def run_models(
    specs: list[ModelSpec], rounds: int = 7, progress=None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[ModelRow]:
    rows = []
    for spec in specs:
        row = measure(spec.name, build(spec), input_for(spec), rounds=rounds, clock=clock)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def format_rows(rows: list[ModelRow]) -> str:
    lines = [
        "Ratios: median of per-round ratios [its 95% interval, from ranks] (smallest-largest "
        "round). A/A: a second copy of torch's model over the first. BN time: step minus the "
        "step with every batch norm replaced by Identity. Verdict (rule fixed before the run): "
        "not judged where the A/A interval excludes 1 or there are fewer than six rounds; else "
        "slower or faster where the ours/torch interval lies above or below 1, level where it "
        "holds 1.",
        "",
        "| model | input | BNs (ours) | mode | torch (ms) | ours (ms) | no BN (ms) "
        "| ours/torch | A/A control | verdict | BN share torch | BN share ours "
        "| BN time ours/torch |",
        "|---|---|---|---|---:|---:|---:|---|---|---|---|---|---|",
    ]
    for row in rows:
        for mode, result in (("train", row.train), ("eval", row.eval)):
            lines.append(
                f"| {row.name} | {'x'.join(map(str, row.input_size))} | "
                f"{row.batch_norms} ({row.converted}) | {mode} | {result.torch_s * 1e3:.1f} | "
                f"{result.ours_s * 1e3:.1f} | {result.no_batch_norm_s * 1e3:.1f} | "
                f"{result.ours_vs_torch} | {result.control} | "
                f"{verdict(result.ours_vs_torch, result.control)} | "
                f"{result.torch_share.median:.0%} | {result.ours_share.median:.0%} | "
                f"{result.batch_norm_time} |"
            )
    return "\n".join(lines)


def step_time_warnings(rows: list[ModelRow]) -> list[str]:
    """Models whose torch training step fell outside 0.1-2 s (the input sizes were chosen for
    that on an idle 2-core machine)."""
    return [
        f"{row.name}: torch's training step took {row.train.torch_s:.2f} s, outside 0.1-2 s"
        for row in rows
        if not 0.1 <= row.train.torch_s <= 2.0
    ]


@dataclass(frozen=True)
class CallTimes:
    """One model's batch norm calls of one input size in one mode, timed inside the model: the
    median over rounds of each call's time, averaged over the layers of that size."""

    model: str
    mode: str  # "train" (the forward of a training step), "backward" (its backward) or "eval"
    size: tuple[int, ...]
    layers: int  # calls of this size per forward
    torch_us: float
    ours_us: float


def per_call_times(
    name: str, model: nn.Module, x: torch.Tensor, rounds: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> list[CallTimes]:
    """Each batch norm's forward, and its backward in a training step, timed where it runs,
    inside the model (torch's as built, ours converted; training steps and eval forwards
    interleaved as in :func:`measure`): hooks read ``clock`` before and after each batch norm
    module's forward, and before the first and after the last of the autograd nodes that
    forward recorded (:func:`_backward_span`), so the backward rows (mode "backward") time
    what autograd's engine runs for that layer. In a model every call runs with caches the
    convolutions before it filled, which a layer timed alone never sees (see BENCHMARKS.md on
    what that does to each call)."""
    model.train()
    variants = {"torch": model, "ours": convert(copy.deepcopy(model))}
    spent, sizes, handles = time_each_call(variants, clock)
    labels = torch.randint(0, CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    together = {
        **{("train", n): _training_step(m, x, labels) for n, m in variants.items()},
        **{("eval", n): _eval_forward(m, x) for n, m in variants.items()},
    }
    try:
        interleaved_times(together, rounds, warmup=1, clock=clock)  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for mode in ("train", "backward", "eval"):
        by_size: dict[tuple[int, ...], list[tuple[float, float]]] = {}
        for layer, size in sizes.items():
            theirs, ours = spent.get(("torch", mode, layer)), spent.get(("ours", mode, layer))
            if theirs and ours:  # (the warm-up round is left out)
                by_size.setdefault(size, []).append(
                    (statistics.median(theirs[1:] or theirs), statistics.median(ours[1:] or ours))
                )
        for size, pairs in by_size.items():
            rows.append(CallTimes(
                name, mode, size, len(pairs),
                1e6 * statistics.fmean(p[0] for p in pairs),
                1e6 * statistics.fmean(p[1] for p in pairs),
            ))
    return rows


def time_each_call(
    variants: dict[str, nn.Module], clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[tuple[str, str, str], list[float]], dict[str, tuple[int, ...]], list]:
    """Hooks on every batch norm of each model in ``variants`` that time its calls where they
    run: ``spent[(variant, mode, layer)]`` receives the seconds of each forward (mode "train" or
    "eval") and of each training call's backward (mode "backward": from the first to the last
    autograd node the forward recorded, :func:`_backward_span`); ``sizes[layer]`` the input's
    shape. Returns (spent, sizes, handles); remove the handles when done."""
    started: dict[object, float] = {}
    spent: dict[tuple[str, str, str], list[float]] = {}
    sizes: dict[str, tuple[int, ...]] = {}
    handles = []
    for variant, module_tree in variants.items():
        for layer, module in module_tree.named_modules():
            if not isinstance(module, _BatchNorm):
                continue

            def before(module, args, layer=layer):
                sizes.setdefault(layer, tuple(args[0].shape))
                started[id(module)] = clock()

            def after(module, args, output, variant=variant, layer=layer):
                mode = "train" if module.training else "eval"
                spent.setdefault((variant, mode, layer), []).append(clock() - started[id(module)])
                span = _backward_span(output, args[0]) if module.training else None
                if span is not None:
                    key = (variant, "backward", layer)

                    def entered(grad_outputs, key=key):
                        started[key] = clock()

                    def left(grad_inputs, grad_outputs, key=key):
                        spent.setdefault(key, []).append(clock() - started[key])

                    span[0].register_prehook(entered)
                    span[1].register_hook(left)

            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    return spent, sizes, handles


def _backward_span(output: torch.Tensor, input: torch.Tensor):
    """The first and the last autograd node that a module's backward runs: the node of its
    output, and of the nodes its forward recorded (those reached from there before the input's
    node or a parameter's gradient accumulator) the earliest recorded, which autograd's engine
    runs last. None where the output records no gradient. (One node for a batch norm that is
    one autograd Function; a batch norm followed by its activation records two or more.)"""
    first = output.grad_fn if isinstance(output, torch.Tensor) else None
    if first is None:
        return None
    stop = input.grad_fn
    last, seen, pending = first, {first}, [first]
    while pending:
        node = pending.pop()
        for successor, _ in node.next_functions:
            if successor is None or successor is stop or successor in seen or (
                type(successor).__name__ == "AccumulateGrad"
            ):
                continue
            seen.add(successor)
            pending.append(successor)
            if successor._sequence_nr() < last._sequence_nr():
                last = successor
    return first, last


def format_call_times(rows: list[CallTimes]) -> str:
    """Per model and mode, a line per input size (the most time first) and the sum over every
    call of one forward."""
    lines = [
        "Median us of one batch norm call inside the model (hooks around each call; train: "
        "the forward of a training step; backward: its backward, from the first to the last "
        "autograd node the layer's forward recorded), averaged over the layers of each size.",
        "",
        "| model | mode | input size | layers | torch (us) | ours (us) | ours/torch |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[CallTimes]] = {}
    for row in rows:
        groups.setdefault((row.model, row.mode), []).append(row)
    for (model, mode), group in groups.items():
        group = sorted(group, key=lambda r: -r.layers * max(r.torch_us, r.ours_us))
        for row in group:
            lines.append(
                f"| {model} | {mode} | {'x'.join(map(str, row.size))} | {row.layers} | "
                f"{row.torch_us:.1f} | {row.ours_us:.1f} | {row.ours_us / row.torch_us:.2f} |"
            )
        lines.append(_total_line(model, mode, "all calls of a forward", group,
                                 sum(r.layers for r in group)))
    for model in dict.fromkeys(row.model for row in rows):
        step = [r for r in rows if r.model == model and r.mode in ("train", "backward")]
        if {r.mode for r in step} == {"train", "backward"}:
            lines.append(_total_line(model, "train+backward", "all calls of a training step",
                                     step, sum(r.layers for r in step if r.mode == "train")))
    return "\n".join(lines)


def _total_line(model: str, mode: str, label: str, rows: list[CallTimes], layers: int) -> str:
    """A table line summing ``rows``' time over all their calls, ours/torch in bold."""
    theirs = sum(r.layers * r.torch_us for r in rows)
    ours = sum(r.layers * r.ours_us for r in rows)
    return (f"| {model} | {mode} | **{label}** | {layers} | {theirs:.0f} | {ours:.0f} | "
            f"**{ours / theirs:.2f}** |")


def distinct_shapes(specs: list[ModelSpec]) -> list:
    """Every distinct batch-norm input size of the models' training forwards, in the order
    first met, as ``batchnorm.bench.shapes.Shape`` named after the first layer that has it and
    counting the calls of that size across the models."""
    from batchnorm.bench.shapes import Shape

    first: dict[tuple[int, ...], str] = {}
    counts: dict[tuple[int, ...], int] = {}
    for spec in specs:
        for call in batch_norm_calls(build(spec), input_for(spec)):
            first.setdefault(call.size, f"{spec.name}.{call.name}")
            counts[call.size] = counts.get(call.size, 0) + 1
    return [Shape(name, size, counts[size]) for size, name in first.items()]


def main(argv: list[str] | None = None) -> int:
    """``python -m batchnorm.bench.models --record-shapes``: print ``shapes.MODEL_SHAPES``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--record-shapes", action="store_true", required=True)
    parser.parse_args(argv)
    for shape in distinct_shapes(MODELS):
        print(f'    Shape("{shape.name}", {shape.size}, {shape.calls}),')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
