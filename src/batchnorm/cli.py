"""The ``batchnorm`` command: ``batchnorm bench``, ``batchnorm compile``, ``batchnorm lab`` and
``batchnorm report``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _bench(args: argparse.Namespace) -> int:
    import torch

    from batchnorm.bench import runner, shapes

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        return _bench_cuda(args)
    if args.suite == "fold":
        from batchnorm.bench.fold import format_fold, run_fold

        return _emit(format_fold(run_fold(rounds=args.rounds)), args.markdown)
    if args.suite == "sync":
        from batchnorm.bench.sync import format_sync, run_sync

        return _emit(format_sync(run_sync(rounds=args.rounds)), args.markdown)
    if args.suite == "memory":
        from batchnorm.bench.memory import format_memory, run_memory

        return _emit(format_memory(run_memory()), args.markdown)
    if args.suite == "models":
        return _bench_models(args)
    if args.suite == "overhead":
        import time

        from batchnorm.bench.overhead import format_overhead, run_overhead

        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        shape_list = shapes.SMALL
        if args.shapes:
            shape_list = [s for s in shape_list if any(part in s.name for part in args.shapes)]
        print(f"# batchnorm bench --suite overhead on {runner.machine_description()}, "
              f"{args.clock} clock", flush=True)
        return _emit(format_overhead(run_overhead(shape_list, args.rounds, clock)), args.markdown)
    shape_list = shapes.QUICK if args.quick else shapes.SHAPE_SETS[args.shape_set]
    modes = [args.mode] if args.mode else list(runner.MODES)
    if args.shapes:
        shape_list = [s for s in shape_list if any(part in s.name for part in args.shapes)]
    rows = []
    print(f"# batchnorm bench: ours vs torch.nn on {runner.machine_description()}", flush=True)
    first = runner.first_call_latency()
    first_line = (
        f"first training step in a new process ({first.backend} backend, 4x8x16x16): "
        f"{first.first_s * 1e3:.0f} ms, then {first.second_s * 1e3:.2f} ms; "
        f"import {first.import_s * 1e3:.0f} ms"
    )
    print(first_line, flush=True)
    for shape in shape_list:
        for layout in runner.applicable_layouts(shape):
            if args.layout and layout != args.layout:
                continue
            for mode in modes:
                row = runner.run_case(shape, mode, layout, rounds=args.rounds)
                rows.append(row)
                print(
                    f"{shape.name:24s} {mode:5s} {layout:13s} "
                    f"ours/torch {row.comparison.median_ratio:.2f} "
                    f"ours/floor {row.floor.median_ratio:.2f} "
                    f"torch/floor {row.torch_floor.median_ratio:.2f} "
                    f"no-op/torch {row.noop.median_ratio:.2f} "
                    f"faults {runner.format_faults(row.comparison)}",
                    flush=True,
                )
    print()
    return _emit(first_line + "\n\n" + runner.format_table(rows), args.markdown)


def _bench_models(args: argparse.Namespace) -> int:
    """Whole models (torchvision's and timm's): training step and eval forward, ours vs torch."""
    from batchnorm.bench import models, runner

    specs = models.QUICK if args.quick else models.MODELS
    if args.models:
        specs = [s for s in specs if any(part in s.name for part in args.models)]
    print(f"# batchnorm bench --suite models on {runner.machine_description()}, {args.clock} "
          "clock", flush=True)

    def progress(row) -> None:
        print(f"{row.name:32s} {'x'.join(map(str, row.input_size)):12s} "
              f"train ours/torch {row.train.ours_vs_torch} A/A {row.train.control} "
              f"({models.verdict(row.train.ours_vs_torch, row.train.control)}) "
              f"BN time {row.train.batch_norm_time}; eval ours/torch {row.eval.ours_vs_torch} "
              f"({models.verdict(row.eval.ours_vs_torch, row.eval.control)}) "
              f"torch step {row.train.torch_s:.3f} s", flush=True)

    import time

    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.per_call:
        calls = []
        for spec in specs:
            found = models.per_call_times(spec.name, models.build(spec), models.input_for(spec),
                                          rounds=args.rounds, clock=clock)
            calls.extend(found)
            print(models.format_call_times(found).splitlines()[-1], flush=True)
        print()
        return _emit(models.format_call_times(calls), args.markdown)
    rows = models.run_models(specs, rounds=args.rounds, progress=progress, clock=clock)
    print()
    notes = "".join(f"\nnote: {line}" for line in models.step_time_warnings(rows))
    return _emit(models.format_rows(rows) + notes, args.markdown)


def _bench_cuda(args: argparse.Namespace) -> int:
    """Ours against torch's batch norm on the GPU, with shares of the copy bandwidth."""
    import torch

    if not torch.cuda.is_available():
        print(f"batchnorm bench --device cuda: no CUDA device here (torch {torch.__version__}, "
              "torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    from batchnorm.bench import cuda

    cases = cuda.quick_cases() if args.quick else cuda.default_cases()
    if args.mode:
        cases = [case for case in cases if case.mode == args.mode]
    if args.layout:
        cases = [case for case in cases if case.layout == args.layout]
    if args.shapes:
        cases = [case for case in cases if any(part in case.name for part in args.shapes)]

    def progress(row) -> None:
        case = row.case
        print(f"{case.name:18s} {str(case.dtype):14s} {case.layout:13s} {case.mode:10s} "
              f"torch/ours {row.speedup:.2f} ours {row.share(row.ours_s):.0%} of copy",
              flush=True)

    device = torch.device("cuda", torch.cuda.current_device())
    description, rows = cuda.run(cases, device, rounds=args.rounds, progress=progress)
    print()
    return _emit(f"# batchnorm bench --device cuda on {description}\n\n"
                 + cuda.format_table(rows), args.markdown)


def _compile(args: argparse.Namespace) -> int:
    """Compile the CPU kernels' float32 specialisations (with ``--all``, float64's too) now and
    cache them on disk, so that no later process waits for them (the first call otherwise
    compiles what it needs); then build the compiled call path and compile the C entry points it
    calls (``batchnorm.backends.cpu.native``), which no call ever compiles itself."""
    import time

    try:
        from batchnorm.backends import cpu
    except ImportError:
        print("batchnorm compile: Numba does not import here; the eager torch backend needs "
              "no compiling")
        return 0
    import torch

    dtypes = (torch.float32, torch.float64) if args.all else (torch.float32,)
    started = time.perf_counter()
    cpu.warm_up(dtypes)
    names = " and ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
    print(f"batchnorm compile: CPU kernels ready ({names}, both layouts) in "
          f"{time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    try:
        path = cpu.native_path.build()
    except RuntimeError as error:  # (the Python path serves every call without it)
        print(f"batchnorm compile: {error}")
        return 0
    for dtype in ("float32", "float64"):
        cpu.kernels.c_entry_points(dtype)
    print(f"batchnorm compile: the compiled call path ready in "
          f"{time.perf_counter() - started:.0f} s ({path})")
    return 0


def _emit(table: str, markdown: str | None) -> int:
    print(table)
    if markdown:
        from pathlib import Path

        Path(markdown).write_text(table + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time ours against torch.nn (interleaved)")
    bench.add_argument(
        "--suite",
        choices=["layer", "models", "overhead", "fold", "sync", "memory"],
        default="layer",
        help="layer: ours vs torch.nn per shape (default); models: torchvision's and timm's "
        "models, training step and eval forward, ours vs torch with an A/A control and batch "
        "norm's own time; overhead: the fixed cost of a call on tiny layers, our module and "
        "each hop of its path against torch's module call; fold: eval latency folded vs "
        "unfolded; sync: SyncBatchNorm vs local batch norm per step with 2 processes; memory: "
        "bytes kept for backward, in-place BN+activation vs torch's",
    )
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="cuda: the GPU table (ours vs torch, %% of copy bandwidth); exits 1 without CUDA",
    )
    bench.add_argument("--quick", action="store_true", help="two small shapes, for a smoke run")
    bench.add_argument(
        "--mode", choices=["train", "eval", "train_relu", "train_silu", "train_gelu"],
        help="only this mode (train_silu and train_gelu run only when named here)",
    )
    bench.add_argument("--layout", choices=["contiguous", "channels_last"], help="only this layout")
    bench.add_argument(
        "--shapes", nargs="+", help="only shapes whose name contains one of these strings"
    )
    bench.add_argument(
        "--shape-set", choices=["default", "models", "small", "all"], default="default",
        help="layer suite: default (ResNet-50 and MLP layers), models (every distinct batch-norm "
        "input of the models suite's models), small (tiny layers, per-call cost), all",
    )
    bench.add_argument(
        "--models", nargs="+",
        help="--suite models: only models whose name contains one of these strings",
    )
    bench.add_argument(
        "--per-call", action="store_true",
        help="--suite models: time each batch norm call inside the models instead (ours vs "
        "torch per input size, forward only), where caches are cold as in real use",
    )
    bench.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    bench.add_argument(
        "--clock", choices=["wall", "thread"], default="wall",
        help="--suite overhead and models: wall time (default) or the calling thread's CPU "
        "time, which keeps other processes' load out of the figures (with --threads 1 only)",
    )
    bench.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    bench.add_argument("--markdown", help="also write the table to this file")
    bench.set_defaults(handler=_bench)

    compile_kernels = commands.add_parser(
        "compile",
        help="compile the CPU kernels now and cache them on disk (once), so the first training "
        "call of a later process does not wait for it, and build the compiled call path to them "
        "(a C++ extension; without a C++ compiler the Python path serves every call)",
    )
    compile_kernels.add_argument(
        "--all", action="store_true",
        help="float64 too (about a minute in all on 2 cores; the default, float32, which "
        "float16 and bfloat16 also use, about half of that)",
    )
    compile_kernels.set_defaults(handler=_compile)

    from batchnorm.lab.cli import add_commands as add_lab_commands

    add_lab_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
