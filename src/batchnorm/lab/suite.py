"""A suite: tune, run the chosen experiments' runs (reusing saved ones), save results.json, render.

This is what ``batchnorm lab`` does after parsing its arguments; tests call it with small configs.
Stage one runs every tuning run (on the tuning seeds, scored on validation); each experiment's
choice is then a pure function of those saved runs, so a resumed suite makes the same choice and
finds the same main runs already saved.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from batchnorm.lab.data.splits import load_splits
from batchnorm.lab.experiments import get_experiment
from batchnorm.lab.experiments.base import config_to_dict
from batchnorm.lab.report import render_report
from batchnorm.lab.report.results import FORMAT, write_results
from batchnorm.lab.runner import (
    Progress,
    SuiteOutcome,
    Workers,
    choices,
    data_spec,
    main_cost,
    plan_tasks,
    run_tasks,
    tuning_tasks,
)
from batchnorm.lab.verdict import Finding


@dataclass
class SuiteReport:
    findings: list[Finding]
    outcome: SuiteOutcome
    out: Path


def versions() -> dict[str, str]:
    """The versions that decide the numbers, for the end of the report."""
    from importlib import metadata

    import numpy
    import torch

    import batchnorm

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "numpy": numpy.__version__, "batchnorm": batchnorm.__version__}
    for package in ("mnist1d", "scipy", "scikit-learn", "matplotlib"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_suite(
    configs: dict[str, object],
    seeds: Sequence[int],
    *,
    data: str | None = None,
    out: Path,
    store: Path,
    device: str = "cpu",
    jobs: int = 1,
    threads: int = 1,
    quick: bool = False,
    progress: bool = True,
    command: str | None = None,
    min_train: int = 1,
) -> SuiteReport:
    """Run (or reuse) every run of ``configs``; write results.json and the report into ``out``.

    ``data`` overrides every experiment's own data set (``--data``); ``command`` is recorded as
    the command that made the report.
    """
    started = time.perf_counter()
    specs = sorted({data_spec(name, data) for name in configs})
    datasets = {spec: load_splits(spec, min_train) for spec in specs}
    tuning = tuning_tasks(configs, data, device, store, quick)
    bar = Progress(sum(task.cost for task in tuning) + main_cost(configs, seeds), progress)
    try:
        with Workers(jobs, threads, datasets) as workers:
            options = {"jobs": jobs, "threads": threads, "progress": bar, "datasets": datasets,
                       "workers": workers}
            tuned = run_tasks(tuning, **options)
            chosen = choices(configs, tuning, tuned.results)
            tasks = plan_tasks(configs, seeds, data, device, store, chosen)
            outcome = run_tasks(tasks, **options)
    finally:
        bar.close()
    experiments = []
    for name, config in configs.items():
        spec = data_spec(name, data)
        entry = {
            "name": name,
            "config": config_to_dict(config),
            "data": {"spec": spec, "description": datasets[spec].describe(),
                     "sizes": datasets[spec].sizes()},
            "runs": [{"params": task.params, "result": outcome.results[task.key]}
                     for task in tasks if task.experiment == name],
        }
        if get_experiment(name).tuning is not None:
            entry["tuning"] = {
                "runs": [{"params": task.params, "result": tuned.results[task.key]}
                         for task in tuning if task.experiment == name],
                "chosen": chosen[name],
            }
        experiments.append(entry)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    combined = SuiteOutcome(
        {**tuned.results, **outcome.results},
        tuned.reused + outcome.reused,
        tuned.ran + outcome.ran,
        time.perf_counter() - started,
    )
    write_results(
        out,
        {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command or " ".join(["batchnorm", *sys.argv[1:]]),
            "versions": versions(),
            "device": device,
            "seeds": list(seeds),
            "quick": quick,
            "jobs": jobs,
            "run_count": len(tuning) + len(tasks),
            "reused_runs": combined.reused,
            "wall_seconds": combined.seconds,
            "experiments": experiments,
        },
    )
    return SuiteReport(render_report(out), combined, out)
