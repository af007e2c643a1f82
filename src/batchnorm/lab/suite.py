"""A suite: run the chosen experiments' runs (reusing saved ones), save results.json, render.

This is what ``batchnorm lab`` does after parsing its arguments; tests call it with small configs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from batchnorm.lab.experiments.base import config_to_dict
from batchnorm.lab.report import render_report
from batchnorm.lab.report.results import FORMAT, write_results
from batchnorm.lab.runner import SuiteOutcome, plan_tasks, run_tasks
from batchnorm.lab.verdict import Finding


@dataclass
class SuiteReport:
    findings: list[Finding]
    outcome: SuiteOutcome
    out: Path


def run_suite(
    configs: dict[str, object],
    seeds: Sequence[int],
    *,
    data: str,
    data_description: str,
    out: Path,
    store: Path,
    device: str = "cpu",
    jobs: int = 1,
    threads: int = 1,
    quick: bool = False,
    progress: bool = True,
) -> SuiteReport:
    """Run (or reuse) every run of ``configs``; write results.json and the report into ``out``."""
    started = time.perf_counter()
    tasks = plan_tasks(configs, seeds, data, device, store)
    outcome = run_tasks(tasks, jobs=jobs, threads=threads, progress=progress)
    experiments = [
        {
            "name": name,
            "config": config_to_dict(config),
            "runs": [
                {"params": task.params, "result": outcome.results[task.key]}
                for task in tasks
                if task.experiment == name
            ],
        }
        for name, config in configs.items()
    ]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(
        out,
        {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": {"spec": data, "description": data_description},
            "device": device,
            "seeds": list(seeds),
            "quick": quick,
            "jobs": jobs,
            "run_count": len(tasks),
            "reused_runs": outcome.reused,
            "wall_seconds": time.perf_counter() - started,
            "experiments": experiments,
        },
    )
    return SuiteReport(render_report(out), outcome, out)
