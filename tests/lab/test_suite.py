"""The whole suite on tiny configs: verdicts for every claim, determinism, and resuming."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batchnorm.lab.claims import CLAIMS
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.runner import choices, plan_tasks, tuning_tasks
from batchnorm.lab.store import ResultStore
from batchnorm.lab.suite import run_suite
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA, make_tiny_configs

SEEDS = (0, 1)


def _suite(configs, out: Path, **options):
    return run_suite(configs, SEEDS, data=TINY_DATA, out=out, store=out / "runs",
                     progress=False, **options)


def _run_count(configs) -> int:
    tuning = tuning_tasks(configs, TINY_DATA, "cpu", Path("unused"), quick=False)
    return len(tuning) + sum(len(EXPERIMENTS[n].plan(c, SEEDS)) for n, c in configs.items())


def _runs_by_key(out: Path) -> dict:
    return {path.name: json.loads(path.read_text())["result"] for path in (out / "runs").glob("*")}


@pytest.fixture(scope="module")
def finished_suite(tmp_path_factory):
    """One full tiny suite, shared by the tests that only read it."""
    configs = make_tiny_configs()
    out = tmp_path_factory.mktemp("suite")
    return configs, out, _suite(configs, out)


def test_every_experiment_and_claim_gets_a_stated_verdict(finished_suite):
    configs, out, report = finished_suite
    assert report.outcome.ran == _run_count(configs)
    claims = {finding.claim for finding in report.findings}
    assert claims == {claim for e in EXPERIMENTS.values() for claim in e.claims}
    assert claims <= set(CLAIMS)
    for finding in report.findings:
        assert finding.verdict in (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
        assert finding.seeds == len(SEEDS) and len(finding.per_seed) == len(SEEDS)
        assert "95% CI" in finding.rule and finding.why
    for name in ("report.html", "report.md", "results.json", "convergence.png", "batch-size.png"):
        assert (out / name).stat().st_size > 0


def test_same_seed_and_config_give_identical_numbers(finished_suite, tmp_path):
    configs, out, _ = finished_suite
    subset = {"init": configs["init"], "ioffe-mnist": configs["ioffe-mnist"]}
    _suite(subset, tmp_path)
    again = _runs_by_key(tmp_path)
    first = _runs_by_key(out)
    assert again and all(first[key] == value for key, value in again.items())


def test_processes_give_the_same_numbers_as_one_process(finished_suite, tmp_path):
    configs, out, _ = finished_suite
    subset = {"init": configs["init"]}  # both stages (tuning, then evaluation) in the workers
    report = _suite(subset, tmp_path, jobs=2)
    assert report.outcome.ran == _run_count(subset) == 4 + 8
    first = _runs_by_key(out)
    assert all(first[key] == value for key, value in _runs_by_key(tmp_path).items())


def test_resume_reruns_only_missing_truncated_and_corrupt_runs(tiny_configs, tmp_path):
    configs = {"init": tiny_configs["init"], "regularization": tiny_configs["regularization"]}
    # An interrupted run: only the first experiment finished, and a write was cut off.
    first = _suite({"init": configs["init"]}, tmp_path)
    assert (first.outcome.ran, first.outcome.reused) == (4 + 8, 0)  # tuning, then evaluation
    store = ResultStore(tmp_path / "runs")
    tuning = tuning_tasks(configs, TINY_DATA, "cpu", tmp_path / "runs", quick=False)
    chosen = choices(configs, tuning, {task.key: store.load(task.key) for task in tuning
                                       if task.experiment == "init"} | {
        task.key: {"validation_accuracy": [0.5]} for task in tuning
        if task.experiment != "init"})
    tasks = plan_tasks(configs, SEEDS, TINY_DATA, "cpu", tmp_path / "runs", chosen)
    init_keys = [task.key for task in tasks if task.experiment == "init"]
    truncated, corrupt = store.path(init_keys[0]), store.path(init_keys[1])
    original = json.loads(truncated.read_text())["result"]
    truncated.write_text(truncated.read_text()[:40])
    field = '"test_accuracy":'
    corrupt.write_text(corrupt.read_text().replace(field, field + "9"))
    (tmp_path / "runs" / f".{init_keys[2]}.123.tmp").write_text("{half")  # killed mid-write
    modified_before = {key: os.stat(store.path(key)).st_mtime_ns for key in init_keys[2:]}

    second = _suite(configs, tmp_path)

    assert second.outcome.reused == 4 + 6  # init's tuning runs and its intact runs
    assert second.outcome.ran == 2 + 8 + 8  # the two damaged ones, regularization's tuning+runs
    assert store.load(init_keys[0]) == original  # re-run, same numbers
    assert store.load(init_keys[1]) is not None
    for key, stamp in modified_before.items():
        assert os.stat(store.path(key)).st_mtime_ns == stamp  # intact files untouched
    third = _suite(configs, tmp_path)
    assert (third.outcome.ran, third.outcome.reused) == (0, 4 + 8 + 8 + 8)


def test_a_changed_config_is_a_different_run(tiny_configs, tmp_path):
    from dataclasses import replace

    _suite({"init": tiny_configs["init"]}, tmp_path)
    changed = _suite({"init": replace(tiny_configs["init"], steps=21)}, tmp_path)
    assert (changed.outcome.ran, changed.outcome.reused) == (4 + 8, 0)


def _lab_command(out: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "batchnorm", "lab", "init", "--quick",
            "--seeds", "3", "--data", TINY_DATA, "--jobs", "1", "--no-progress",
            "--out", str(out)]


def _saved_runs(out: Path) -> dict:
    document = json.loads((out / "results.json").read_text())
    return {
        entry["name"]: (entry["runs"], entry.get("tuning"))
        for entry in document["experiments"]
    }, document["claims"]


def test_killed_lab_resumes_to_the_same_numbers(tmp_path):
    import signal
    import subprocess
    import time

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = subprocess.Popen(_lab_command(killed), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    try:
        while len(list((killed / "runs").glob("*.json"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = list((killed / "runs").glob("*.json"))
    assert len(saved) >= 5  # the tuning runs and some evaluation runs
    assert not (killed / "results.json").exists()  # the suite did not finish
    store = ResultStore(killed / "runs")
    assert all(store.load(path.stem) is not None for path in saved)  # only whole results
    stamps = {path.name: path.stat().st_mtime_ns for path in saved}

    subprocess.run(_lab_command(killed), check=True, capture_output=True)
    # The same suite uninterrupted, in this process (what the command runs, without a new one).
    init = EXPERIMENTS["init"]
    run_suite({"init": init.config(quick=True)}, (0, 1, 2), data=TINY_DATA, out=whole,
              store=whole / "runs", quick=True, progress=False)
    for path in saved:
        assert path.stat().st_mtime_ns == stamps[path.name]  # finished runs were not redone
    resumed_runs, resumed_claims = _saved_runs(killed)
    whole_runs, whole_claims = _saved_runs(whole)
    assert resumed_runs == whole_runs and resumed_claims == whole_claims


def test_tuning_runs_never_see_the_test_part(finished_suite):
    """A choice is made on validation: the tuning runs are given splits without a test part, so
    their saved results hold no test outcome, while every evaluation run has one."""
    configs, out, _ = finished_suite
    results = {name.removesuffix(".json"): value for name, value in _runs_by_key(out).items()}
    tuning = tuning_tasks(configs, TINY_DATA, "cpu", out / "runs", quick=False)
    assert tuning
    for task in tuning:
        assert not any(key.startswith("test_") for key in results[task.key]), task.experiment
    tuning_experiments = {task.experiment for task in tuning}
    evaluation = plan_tasks({name: configs[name] for name in tuning_experiments}, SEEDS,
                            TINY_DATA, "cpu", out / "runs",
                            choices(configs, tuning, {t.key: results[t.key] for t in tuning}))
    assert evaluation and all("test_accuracy" in results[task.key] for task in evaluation)
