"""Command-line entry of the lab: ``batchnorm lab`` (run experiments, write the report) and
``batchnorm report DIR`` (render the report again from saved results, without training)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_SEEDS = 5
QUICK_SEEDS = 3


def add_commands(commands: argparse._SubParsersAction) -> None:
    from batchnorm.lab.data import DATA_SPECS

    lab = commands.add_parser(
        "lab",
        help="test batch norm's claims on real data and write a report",
        description="Run the lab's experiments (all by default) over several seeds and write "
        "report.html, report.md, results.json and the plots to the output folder.",
    )
    lab.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                     help="experiments to run (default: all; see --list)")
    lab.add_argument("--quick", action="store_true",
                     help="the whole suite at reduced size (about a minute on 2 cores, with the "
                     "kernels compiled: `batchnorm compile`)")
    lab.add_argument("--seeds", type=int, default=None,
                     help=f"evaluation seeds per setting (default {DEFAULT_SEEDS}, or "
                     f"{QUICK_SEEDS} with --quick; a verdict needs 3 distinct values)")
    lab.add_argument("--data", default=None,
                     help="run every experiment on this data instead of its own (see --list): "
                     + "; ".join(f"{name}: {text}" for name, text in DATA_SPECS.items()))
    lab.add_argument("--out", type=Path,
                     help="output folder (default runs/<timestamp>); finished runs are kept in "
                     "OUT/runs, or in runs/store without --out, and reused when run again")
    lab.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                     help="runs in parallel processes (default: the number of cores)")
    lab.add_argument("--threads", type=int, default=1,
                     help="torch threads per run (default 1: the models are tiny)")
    lab.add_argument("--device", default="cpu", help="torch device for training (default cpu)")
    lab.add_argument("--list", action="store_true", help="list experiments and their claims")
    lab.add_argument("--no-progress", action="store_true", help="no progress bar")
    lab.set_defaults(handler=_lab)

    report = commands.add_parser(
        "report", help="render the lab report again from a folder's results.json"
    )
    report.add_argument("folder", type=Path, help="the output folder of a `batchnorm lab` run")
    report.set_defaults(handler=_report)


def _error(message: str) -> int:
    print(f"batchnorm: error: {message}", file=sys.stderr)
    return 2


def _list() -> int:
    from batchnorm.lab.claims import CLAIMS
    from batchnorm.lab.experiments import EXPERIMENTS

    for name, experiment in EXPERIMENTS.items():
        print(f"{name:16s}{experiment.question} [data: {experiment.data}]")
        for claim in experiment.claims:
            print(f"{'':16s}  {claim}: {CLAIMS.get(claim, '')}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    from batchnorm.lab.data import DataError, largest_batch_size
    from batchnorm.lab.data.splits import load_splits
    from batchnorm.lab.experiments import EXPERIMENTS
    from batchnorm.lab.runner import data_spec

    unknown = [name for name in args.experiments if name not in EXPERIMENTS]
    if unknown:
        return _error(
            f"unknown experiment {', '.join(repr(n) for n in unknown)}: expected one of "
            f"{', '.join(EXPERIMENTS)}"
        )
    seeds = args.seeds if args.seeds is not None else QUICK_SEEDS if args.quick else DEFAULT_SEEDS
    if seeds < 1:
        return _error(f"--seeds must be at least 1, got {seeds}")
    if args.jobs < 1 or args.threads < 1:
        return _error(f"--jobs and --threads must be at least 1, got {args.jobs}, {args.threads}")
    try:
        import torch

        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as error:
        return _error(f"--device '{args.device}' is not usable here ({error})")
    names = args.experiments or list(EXPERIMENTS)
    configs = {name: EXPERIMENTS[name].config(args.quick) for name in names}
    try:
        # Read every data set once up front, so a bad folder fails before any run, and require
        # one full batch of the largest size the chosen experiments train on.
        min_train = largest_batch_size(configs.values())
        for spec in sorted({data_spec(name, args.data) for name in names}):
            load_splits(spec, min_train)
    except DataError as error:
        return _error(str(error))
    if seeds < 3:
        print("note: with fewer than 3 seeds every verdict is inconclusive (a verdict needs 3 "
              "distinct per-seed values)")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out if args.out is not None else Path("runs") / stamp
    store = out / "runs" if args.out is not None else Path("runs") / "store"
    return run_lab(configs, list(range(seeds)), args, out, store, min_train)


def run_lab(configs, seeds, args, out: Path, store: Path, min_train: int = 1) -> int:
    from batchnorm.lab.experiments import get_experiment
    from batchnorm.lab.report import summary_text
    from batchnorm.lab.runner import tuning_tasks
    from batchnorm.lab.suite import run_suite

    tuning = len(tuning_tasks(configs, args.data, args.device, store, args.quick))
    main = sum(len(get_experiment(name).plan(config, seeds)) for name, config in configs.items())
    print(f"batchnorm lab: {len(configs)} experiments, {tuning} tuning + {main} evaluation runs "
          f"over {len(seeds)} seeds; {args.jobs} process(es); report in {out}", flush=True)
    started = time.perf_counter()
    try:
        report = run_suite(
            configs,
            seeds,
            data=args.data,
            out=out,
            store=store,
            device=args.device,
            jobs=args.jobs,
            threads=args.threads,
            quick=args.quick,
            progress=not args.no_progress,
            command=command_line(args, len(seeds)),
            min_train=min_train,
        )
    except KeyboardInterrupt:
        again = "" if args.out is None else " (same --out)"
        print(f"\ninterrupted: finished runs are saved in {store}; run the same command "
              f"again{again} to resume.", file=sys.stderr)
        return 130
    outcome = report.outcome
    print(f"\n{outcome.ran} runs trained, {outcome.reused} reused, "
          f"{time.perf_counter() - started:.0f} s\n")
    print(summary_text(report.findings, out))
    return 0


def command_line(args: argparse.Namespace, seeds: int) -> str:
    """The command that reproduces this run, written out from the parsed arguments (so it is
    the same however the lab was started: the script, ``python -m batchnorm`` or a test)."""
    words = ["batchnorm", "lab", *args.experiments]
    if args.quick:
        words.append("--quick")
    words += ["--seeds", str(seeds)]
    if args.data is not None:
        words += ["--data", args.data]
    if args.out is not None:
        words += ["--out", str(args.out)]
    words += ["--jobs", str(args.jobs)]
    if args.threads != 1:
        words += ["--threads", str(args.threads)]
    if args.device != "cpu":
        words += ["--device", args.device]
    return shlex.join(words)


def _report(args: argparse.Namespace) -> int:
    from batchnorm.lab.report import render_report, summary_text
    from batchnorm.lab.report.results import ResultsError

    try:
        findings = render_report(args.folder)
    except ResultsError as error:
        return _error(str(error))
    print(summary_text(findings, args.folder))
    return 0
