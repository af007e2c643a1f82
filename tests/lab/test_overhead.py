"""C13, overhead: the timing loop interleaves and rotates the variants and drops the warm-up; the
ratios and the A/A widening give known answers; each rule gives the four verdicts on synthetic
timings; the variants are what they claim to be; the experiment runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch import nn

import batchnorm
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.overhead import (
    EXPERIMENT,
    INFERENCE_VARIANTS,
    MARGIN,
    MODELS,
    TRAINING_VARIANTS,
    OverheadConfig,
    _models,
    interleaved_timings,
    median_ratio,
    noise_factor,
    rotated,
)
from batchnorm.lab.suite import run_suite
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS

EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}


def test_rounds_rotate_the_order_and_drop_the_warm_up():
    assert rotated("ABC", 0) == ["A", "B", "C"]
    assert rotated("ABC", 1) == ["B", "C", "A"]
    assert rotated("ABC", 5) == ["C", "A", "B"]
    calls, now = [], [0.0]

    def clock() -> float:
        return now[0]

    def action(name: str, cost: float):
        def run() -> None:
            calls.append(name)
            now[0] += cost
        return run

    timings = interleaved_timings({"A": action("A", 1.0), "B": action("B", 2.0),
                                   "C": action("C", 3.0)}, rounds=4, warmup=2, clock=clock)
    assert calls[:6] == ["A", "B", "C", "B", "C", "A"] and len(calls) == 18
    assert timings == {"A": [1.0] * 4, "B": [2.0] * 4, "C": [3.0] * 4}


def test_ratios_within_rounds_and_the_noise_factor():
    # Round by round the load doubles the time of both; the within-round ratio stays 2.
    assert median_ratio([2, 4, 8, 100], [1, 2, 4, 10]) == pytest.approx(2.0)
    assert noise_factor([1.0]) == 1.0  # no interval from one run
    assert noise_factor([1.0, 1.0, 1.0]) == 1.0
    wide = noise_factor([0.8, 1.25, 1.0])
    assert wide > 1.25  # the interval of a scattered control reaches beyond its values
    assert 1.2 < noise_factor([1.2, 1.21, 1.19]) < 1.25  # a bias counts, not only scatter


def _timings(rounds: int, base: float, ratio: float, rng) -> list[float]:
    """Per-round times of a variant ``ratio`` times ``base``, with load that both share."""
    load = 1 + rng.uniform(0, 0.5, rounds)
    return list(base * ratio * load)


def overhead_runs(case: str, control_bias: float = 1.0) -> list[dict]:
    """Every BN variant (unfolded) takes ``overhead`` times no BN's time and the folded one
    ``folded`` times; the A/A control is ``control_bias`` times no BN. The margin is 1.10x."""
    overhead, folded, scatter = {
        "supported": (1.8, 1.0, 0.03),
        "flipped": (1 / 1.8, 1.8, 0.03),
        "not supported": (1.0, 1.5, 0.03),
        "inconclusive": (1.1, 1.1, 0.15),
    }[case]
    runs = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        per_seed = float(np.exp(rng.normal(0, scatter)))
        result = {"data": "synthetic", "device": "cpu", "threads": 1, "clock": "test"}
        for model in MODELS:
            result[model] = {}
            for phase, variants in (("training", TRAINING_VARIANTS),
                                    ("inference", INFERENCE_VARIANTS)):
                load = 1 + rng.uniform(0, 0.5, 20)
                ratios = {"none": 1.0, "ours": overhead * per_seed, "torch": overhead,
                          "folded": folded * per_seed,
                          "none again": control_bias * float(np.exp(rng.normal(0, 0.01)))}
                result[model][phase] = {v: list(100.0 * ratios[v] * load) for v in variants}
        runs.append({"params": {"seed": seed}, "result": result})
    return runs


@pytest.mark.parametrize("case", list(EXPECTED))
def test_overhead_findings(case):
    found = EXPERIMENT.findings(OverheadConfig(), overhead_runs(case))
    assert len(found) == 6 and {f.claim for f in found} == {"C13"}
    for finding in found:
        folding = "folded into" in finding.measure
        expected = EXPECTED[case]
        assert finding.verdict == expected, finding
        assert finding.supports == ("below" if folding else "above")
        assert finding.threshold == MARGIN and finding.unit == "x"
        assert finding.low < finding.effect < finding.high


def test_a_biased_control_widens_the_interval():
    # A 1.05-1.07x overhead with a tight interval is "not supported" (below 1.10)... unless two
    # timings of one model differ by 8% here: then it cannot be told from 1.10.
    def runs(control_bias: float) -> list[dict]:
        runs = overhead_runs("not supported", control_bias=control_bias)
        for run in runs:
            for model in MODELS:
                times = run["result"][model]["training"]
                spread = 1 + run["params"]["seed"] / 200  # distinct per seed
                times["ours"] = [1.05 * spread * t for t in times["none"]]
        return runs

    def training_verdicts(control_bias: float) -> set[str]:
        found = EXPERIMENT.findings(OverheadConfig(), runs(control_bias))
        return {f.verdict for f in found if "training step" in f.measure}

    assert training_verdicts(1.0) == {NOT_SUPPORTED}
    assert training_verdicts(1.08) == {INCONCLUSIVE}
    assert training_verdicts(1 / 1.08) == {INCONCLUSIVE}  # a bias either way
    # The interval reported is the widened one.
    tight, widened = (
        next(f for f in EXPERIMENT.findings(OverheadConfig(), runs(bias))
             if "training step" in f.measure)
        for bias in (1.0, 1.08)
    )
    assert widened.effect == tight.effect and widened.high > 1.1 > tight.high


def test_overhead_analysis_tables_and_figure():
    analysis = EXPERIMENT.analyze(OverheadConfig(), overhead_runs("supported"))
    training, inference = analysis.tables
    assert [row[0] for row in training.rows] == ["MLP", "CNN"]
    assert training.rows[0][1] == "100" or float(training.rows[0][1]) > 100
    assert "our BN / torch's BN" in training.headers
    assert "our BN folded / no BN" in inference.headers
    (figure,) = analysis.figures
    assert len(figure.panels) == 2 and "5 runs" in figure.caption
    assert any("torch's" in note for note in analysis.notes)


def test_the_variants_share_their_weights_and_differ_only_in_the_norm():
    from batchnorm.lab.data.splits import load_splits

    data = load_splits(TINY_DATA)
    for model in MODELS:
        variants = _models(OverheadConfig(width=8, widths=(4, 8)), model, data, seed=3)

        def norms(network: nn.Module) -> set[type]:
            return {type(m) for m in network.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)}

        assert norms(variants["none"]) == norms(variants["none again"]) == set()
        assert norms(variants["ours"]) <= {batchnorm.BatchNorm1d, batchnorm.BatchNorm2d}
        assert norms(variants["torch"]) <= {nn.BatchNorm1d, nn.BatchNorm2d}
        assert norms(variants["ours"]) and norms(variants["torch"])
        for ours, theirs, none in zip(variants["ours"].parameters(),
                                      variants["torch"].parameters(),
                                      variants["none"].parameters(), strict=False):
            assert ours.data_ptr() != theirs.data_ptr()
            if ours.shape == none.shape and ours.dim() > 1:
                assert ours.equal(theirs)


TINY = OverheadConfig(rounds=2, warmup_rounds=1, steps_per_timing=1, batches_per_timing=1,
                      width=8, widths=(4, 8), inference_batch=16)


def test_a_run_times_every_variant(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    run_suite({EXPERIMENT.name: TINY}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, progress=False)
    saved = [json.loads(path.read_text())["result"] for path in (tmp_path / "runs").glob("*")]
    assert len(saved) == 3
    for result in saved:
        for model in MODELS:
            assert set(result[model]["training"]) == set(TRAINING_VARIANTS)
            assert set(result[model]["inference"]) == set(INFERENCE_VARIANTS)
            for times in (*result[model]["training"].values(),
                          *result[model]["inference"].values()):
                assert len(times) == TINY.rounds and all(t > 0 for t in times)
    report = (tmp_path / "report.md").read_text()
    assert "C13" in report and "overhead" in report
