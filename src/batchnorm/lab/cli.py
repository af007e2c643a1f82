"""Command-line entry of the lab: ``batchnorm lab`` (run experiments, write the report) and
``batchnorm report DIR`` (render the report again from saved results, without training)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_SEEDS = 3


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
                     help="the whole suite at reduced size (about a minute on 2 cores)")
    lab.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                     help=f"seeds per setting (default {DEFAULT_SEEDS}; a verdict needs 2)")
    lab.add_argument("--data", default="digits",
                     help="; ".join(f"{name}: {text}" for name, text in DATA_SPECS.items()))
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
        print(f"{name:16s}{experiment.question}")
        for claim in experiment.claims:
            print(f"{'':16s}  {claim}: {CLAIMS.get(claim, '')}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    from batchnorm.lab.data import DataError, describe_spec, load_data
    from batchnorm.lab.experiments import EXPERIMENTS

    unknown = [name for name in args.experiments if name not in EXPERIMENTS]
    if unknown:
        return _error(
            f"unknown experiment {', '.join(repr(n) for n in unknown)}: expected one of "
            f"{', '.join(EXPERIMENTS)}"
        )
    if args.seeds < 1:
        return _error(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1 or args.threads < 1:
        return _error(f"--jobs and --threads must be at least 1, got {args.jobs}, {args.threads}")
    try:
        import torch

        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as error:
        return _error(f"--device '{args.device}' is not usable here ({error})")
    try:
        describe_spec(args.data)
        dataset = load_data(args.data)  # read once up front, so a bad folder fails before any run
    except DataError as error:
        return _error(str(error))
    if args.seeds < 2:
        print("note: with one seed every verdict is inconclusive (a CI needs 2 seeds)")
    names = args.experiments or list(EXPERIMENTS)
    configs = {name: EXPERIMENTS[name].config(args.quick) for name in names}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out if args.out is not None else Path("runs") / stamp
    store = out / "runs" if args.out is not None else Path("runs") / "store"
    return run_lab(configs, list(range(args.seeds)), args, dataset.describe(), out, store)


def run_lab(configs, seeds, args, data_description, out: Path, store: Path) -> int:
    from batchnorm.lab.report import summary_text
    from batchnorm.lab.suite import run_suite

    runs = sum(len(get_plan(name, config, seeds)) for name, config in configs.items())
    print(f"batchnorm lab: {len(configs)} experiments, {runs} runs on {data_description}; "
          f"{args.jobs} process(es); report in {out}", flush=True)
    started = time.perf_counter()
    try:
        report = run_suite(
            configs,
            seeds,
            data=args.data,
            data_description=data_description,
            out=out,
            store=store,
            device=args.device,
            jobs=args.jobs,
            threads=args.threads,
            quick=args.quick,
            progress=not args.no_progress,
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


def get_plan(name: str, config, seeds) -> list[dict]:
    from batchnorm.lab.experiments import get_experiment

    return get_experiment(name).plan(config, seeds)


def _report(args: argparse.Namespace) -> int:
    from batchnorm.lab.report import render_report, summary_text
    from batchnorm.lab.report.results import ResultsError

    try:
        findings = render_report(args.folder)
    except ResultsError as error:
        return _error(str(error))
    print(summary_text(findings, args.folder))
    return 0
