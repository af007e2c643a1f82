"""Scheduling: which runs a suite needs, which are already saved, and running the rest.

Each run trains a tiny model, where torch's intra-op threads only add synchronisation (on a
busy 2-core machine a 2-thread run was measured 13x slower than a 1-thread one), so every run
uses ``threads`` torch threads (1 by default) and parallelism comes from ``jobs`` processes.
A run is executed, and its result saved, inside the worker; killing the lab loses only the runs
in flight.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

import batchnorm
from batchnorm.lab.data import describe_spec, load_data
from batchnorm.lab.experiments import get_experiment
from batchnorm.lab.experiments.base import config_to_dict
from batchnorm.lab.store import ResultStore, run_key


@dataclass(frozen=True)
class Task:
    """One run: everything that determines its numbers, and where its result goes."""

    experiment: str
    config: dict
    params: dict
    data: str
    device: str
    store: str

    @property
    def identity(self) -> dict:
        return {
            "experiment": self.experiment,
            "config": self.config,
            "params": self.params,
            "data": describe_spec(self.data),
            "device": self.device,
            # Another torch or batchnorm version may give other numbers: do not reuse across them.
            "versions": {"torch": torch.__version__, "batchnorm": batchnorm.__version__},
        }

    @property
    def key(self) -> str:
        return run_key(self.identity)


def plan_tasks(
    configs: dict[str, object], seeds: Sequence[int], data: str, device: str, store: Path
) -> list[Task]:
    """All runs of the chosen experiments (name -> config), in suite order."""
    tasks = []
    for name, config in configs.items():
        experiment = get_experiment(name)
        for params in experiment.plan(config, seeds):
            tasks.append(
                Task(name, config_to_dict(config), params, data, device, str(store))
            )
    return tasks


@lru_cache(maxsize=2)
def _dataset(spec: str):
    return load_data(spec)


def execute(task: Task) -> dict:
    """Train one run and save its result (runs in a worker process or in the caller)."""
    experiment = get_experiment(task.experiment)
    config = experiment.config_from_dict(task.config)
    result = experiment.run(config, task.params, _dataset(task.data), task.device)
    ResultStore(Path(task.store)).save(task.key, task.identity, result)
    return result


def limit_threads(threads: int) -> None:
    """Use ``threads`` threads per run: the models are tiny, and two processes that each run two
    threads on two cores slow each other down several times over. Our CPU kernels follow
    torch's thread count."""
    torch.set_num_threads(threads)


@dataclass
class SuiteOutcome:
    results: dict[str, dict]  # key -> result
    reused: int
    ran: int
    seconds: float


def run_tasks(
    tasks: list[Task], *, jobs: int = 1, threads: int = 1, progress: bool = True
) -> SuiteOutcome:
    """Run every task whose result is not saved yet; return all results by key."""
    start = time.perf_counter()
    results: dict[str, dict] = {}
    pending: list[Task] = []
    for task in tasks:
        saved = ResultStore(Path(task.store)).load(task.key)
        if saved is None:
            pending.append(task)
        else:
            results[task.key] = saved
    reused = len(results)
    bar = _progress_bar(len(tasks), reused, progress)
    try:
        if jobs <= 1 or len(pending) <= 1:
            previous = torch.get_num_threads()
            limit_threads(threads)
            try:
                for task in pending:
                    bar.set_postfix_str(task.experiment, refresh=False)
                    results[task.key] = execute(task)
                    bar.update()
            finally:
                limit_threads(previous)
        else:
            _run_in_processes(pending, results, jobs, threads, bar)
    finally:
        bar.close()
    return SuiteOutcome(results, reused, len(pending), time.perf_counter() - start)


def _execute_keyed(task: Task) -> tuple[str, str, dict]:
    return task.key, task.experiment, execute(task)


def _run_in_processes(pending, results, jobs, threads, bar) -> None:
    # spawn, not fork: a forked child of a process that already used torch's thread pool can hang.
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(min(jobs, len(pending)), initializer=limit_threads, initargs=(threads,))
    try:
        for key, experiment, result in pool.imap_unordered(_execute_keyed, pending):
            results[key] = result
            bar.set_postfix_str(experiment, refresh=False)
            bar.update()
        pool.close()
    except BaseException:
        pool.terminate()  # on Ctrl-C or an error, stop the runs in flight (their files are unsaved)
        raise
    finally:
        pool.join()


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=done,
        unit="run",
        desc="lab",
        disable=not enabled,
        dynamic_ncols=True,
        bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}<{remaining} {postfix}",
    )
