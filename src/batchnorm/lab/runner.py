"""Scheduling: which runs a suite needs, which are already saved, and running the rest.

Each run trains a tiny model, where torch's intra-op threads only add synchronisation (on a
busy 2-core machine a 2-thread run was measured 13x slower than a 1-thread one), so every run
uses ``threads`` torch threads (1 by default) and parallelism comes from ``jobs`` processes.
A run is executed, and its result saved, inside the worker; killing the lab loses only the runs
in flight. The data sets are loaded once, in the parent, and handed to the workers.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import batchnorm
from batchnorm.lab.data import describe_spec
from batchnorm.lab.data.splits import Splits, load_splits
from batchnorm.lab.experiments import get_experiment
from batchnorm.lab.experiments.base import config_to_dict
from batchnorm.lab.store import ResultStore, run_key

TUNING, MAIN = "tuning", "main"


@dataclass(frozen=True)
class Task:
    """One run: everything that determines its numbers, and where its result goes."""

    experiment: str
    config: dict
    params: dict
    data: str
    device: str
    store: str
    stage: str = MAIN
    cost: int = 1  # relative work (at least 1), for the progress bar's estimate of the time left

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


def data_spec(name: str, data: str | None) -> str:
    """The data an experiment runs on: ``data`` when given (``--data``), else its own."""
    return data if data is not None else get_experiment(name).data


def tuning_tasks(
    configs: dict[str, object], data: str | None, device: str, store: Path, quick: bool
) -> list[Task]:
    """The tuning runs of every experiment that tunes, in suite order."""
    tasks = []
    for name, config in configs.items():
        experiment = get_experiment(name)
        if experiment.tuning is None:
            continue
        for params in experiment.tuning.plan(config, quick):
            cost = _cost(experiment.run_cost(config, params))
            tasks.append(Task(name, config_to_dict(config), params, data_spec(name, data),
                              device, str(store), TUNING, cost))
    return tasks


def choices(configs: dict[str, object], tasks: list[Task], results: dict[str, dict]) -> dict:
    """Each tuning experiment's choice, from its tuning runs' saved results (a pure function)."""
    chosen = {}
    for name, config in configs.items():
        experiment = get_experiment(name)
        if experiment.tuning is None:
            continue
        runs = [{"params": task.params, "result": results[task.key]}
                for task in tasks if task.experiment == name]
        chosen[name] = experiment.tuning.choose(config, runs)
    return chosen


def plan_tasks(
    configs: dict[str, object],
    seeds: Sequence[int],
    data: str | None,
    device: str,
    store: Path,
    chosen: dict | None = None,
) -> list[Task]:
    """The main runs of the chosen experiments (name -> config), in suite order, with each
    tuning experiment's choice (``chosen[name]``) in their parameters."""
    tasks = []
    for name, config in configs.items():
        experiment = get_experiment(name)
        for params in experiment.plan(config, seeds):
            if experiment.tuning is not None:
                if chosen is None or name not in chosen:
                    raise ValueError(f"{name}: its main runs need the tuning stage's choice")
                params = experiment.tuning.apply(chosen[name], params)
            cost = _cost(experiment.run_cost(config, params))
            tasks.append(Task(name, config_to_dict(config), params, data_spec(name, data),
                              device, str(store), MAIN, cost))
    return tasks


def main_cost(configs: dict[str, object], seeds: Sequence[int]) -> int:
    """The work of the main runs before the choice is known (the cost does not depend on it)."""
    total = 0
    for name, config in configs.items():
        experiment = get_experiment(name)
        total += sum(_cost(experiment.run_cost(config, params))
                     for params in experiment.plan(config, seeds))
    return total


_DATA: dict[str, Splits] = {}


def provide_data(datasets: dict[str, Splits]) -> None:
    """Make loaded data sets available to ``execute`` (in this process or a worker)."""
    _DATA.update(datasets)


def _splits(spec: str) -> Splits:
    if spec not in _DATA:
        _DATA[spec] = load_splits(spec)
    return _DATA[spec]


def execute(task: Task) -> dict:
    """Train one run and save its result (runs in a worker process or in the caller)."""
    experiment = get_experiment(task.experiment)
    config = experiment.config_from_dict(task.config)
    splits = _splits(task.data)
    if task.stage == TUNING:
        splits = splits.without_test()  # a choice is made on validation and never sees the test
    result = experiment.run(config, task.params, splits, task.device)
    ResultStore(Path(task.store)).save(task.key, task.identity, result)
    return result


def _cost(value: float) -> int:
    return max(1, round(value))


def limit_threads(threads: int) -> None:
    """Use ``threads`` threads per run: the models are tiny, and two processes that each run two
    threads on two cores slow each other down several times over. Our CPU kernels follow
    torch's thread count."""
    torch.set_num_threads(threads)


def _worker_setup(threads: int, datasets: dict[str, Splits]) -> None:
    limit_threads(threads)
    provide_data(datasets)


@dataclass
class SuiteOutcome:
    results: dict[str, dict]  # key -> result
    reused: int
    ran: int
    seconds: float


class Progress:
    """One bar for a whole suite, counted in units of work (a run's ``cost``), so that its
    estimate of the time left weighs a batch-2 run more than a batch-128 one."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            unit="work",
            desc="lab",
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}% |{bar}| {elapsed} elapsed, about "
            "{remaining} left {postfix}",
        )
        self.runs_done = 0
        self.runs_total = 0

    def expect(self, runs: int) -> None:
        self.runs_total += runs

    def done(self, task: Task, reused: bool = False) -> None:
        self.runs_done += 1
        self.bar.set_postfix_str(
            f"{self.runs_done}/{self.runs_total} runs ({task.experiment}, {task.stage})",
            refresh=False,
        )
        if reused:
            # Saved runs cost no time: count them without skewing the rate.
            self.bar.n += task.cost
            self.bar.last_print_n = self.bar.n
            self.bar.refresh()
        else:
            self.bar.update(task.cost)

    def close(self) -> None:
        self.bar.close()


class Workers:
    """Worker processes for a suite's runs: started on first use and kept for every stage (the
    tuning and the main runs), so that each worker imports torch and receives the data once."""

    def __init__(self, jobs: int, threads: int, datasets: dict[str, Splits]) -> None:
        self.jobs, self.threads, self.datasets = jobs, threads, datasets
        self._pool = None

    def pool(self):
        if self._pool is None:
            # spawn, not fork: a forked child of a process that already used torch's thread
            # pool can hang.
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.jobs, initializer=_worker_setup,
                                      initargs=(self.threads, self.datasets))
        return self._pool

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self._pool is None:
            return
        if kind is None:
            self._pool.close()
        else:
            self._pool.terminate()  # on Ctrl-C or an error, stop the runs in flight (unsaved)
        self._pool.join()
        self._pool = None


def run_tasks(
    tasks: list[Task],
    *,
    jobs: int = 1,
    threads: int = 1,
    progress: Progress | None = None,
    datasets: dict[str, Splits] | None = None,
    workers: Workers | None = None,
) -> SuiteOutcome:
    """Run every task whose result is not saved yet; return all results by key. With
    ``jobs > 1`` the runs go to ``workers`` (or to processes started for this call)."""
    start = time.perf_counter()
    owned = progress is None
    progress = progress or Progress(sum(task.cost for task in tasks), enabled=False)
    progress.expect(len(tasks))
    datasets = datasets or {}
    results: dict[str, dict] = {}
    pending: list[Task] = []
    for task in tasks:
        saved = ResultStore(Path(task.store)).load(task.key)
        if saved is None:
            pending.append(task)
        else:
            results[task.key] = saved
            progress.done(task, reused=True)
    reused = len(results)
    try:
        if jobs <= 1 or len(pending) <= 1:
            previous = torch.get_num_threads()
            limit_threads(threads)
            provide_data(datasets)
            try:
                for task in pending:
                    results[task.key] = execute(task)
                    progress.done(task)
            finally:
                limit_threads(previous)
        elif workers is not None:
            _run_in_processes(pending, results, progress, workers)
        else:
            with Workers(min(jobs, len(pending)), threads, datasets) as own:
                _run_in_processes(pending, results, progress, own)
    finally:
        if owned:
            progress.close()
    return SuiteOutcome(results, reused, len(pending), time.perf_counter() - start)


def _execute_indexed(indexed: tuple[int, Task]) -> tuple[int, dict]:
    index, task = indexed
    return index, execute(task)


def _run_in_processes(pending, results, progress, workers: Workers) -> None:
    # The costliest runs first, so that the last minutes are not one long run on one core.
    order = sorted(range(len(pending)), key=lambda index: -pending[index].cost)
    for index, result in workers.pool().imap_unordered(
        _execute_indexed, [(index, pending[index]) for index in order]
    ):
        results[pending[index].key] = result
        progress.done(pending[index])
