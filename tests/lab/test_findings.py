"""Each experiment's findings are a pure function of saved runs: on synthetic runs whose answer is
known, every rule gives "supported", "not supported" and "inconclusive" where it must, and the
effect with its sign flipped gives the opposite verdict (so a sign error in a rule fails here)."""

from __future__ import annotations

import pytest

from batchnorm.lab.experiments import get_experiment
from batchnorm.lab.experiments.batch_size import BatchSizeConfig
from batchnorm.lab.experiments.convergence import ConvergenceConfig
from batchnorm.lab.experiments.initialization import InitConfig
from batchnorm.lab.experiments.ioffe_mnist import IoffeConfig
from batchnorm.lab.experiments.learning_rate import LearningRateConfig
from batchnorm.lab.experiments.regularization import RegularizationConfig
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.synthetic import SEEDS, jitter, result

# Each case: the effect's direction and size, and the verdict it must get. "flipped" is the
# supported case with its sign reversed: it must not be supported.
CASES = ["supported", "flipped", "not supported", "inconclusive"]
EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}


def verdicts(name: str, config, runs) -> dict[str, str]:
    found = get_experiment(name).findings(config, runs)
    assert found, f"{name} gave no finding"
    return {f"{finding.claim}:{finding.measure[:12]}": finding.verdict for finding in found}


# ---- C1, convergence: steps without BN / steps with BN -----------------------------------------


def convergence_runs(case: str) -> list[dict]:
    # (steps without BN, steps with BN) per seed; eval every 25 steps, so 1.25x is the threshold.
    steps = {
        "supported": lambda s: (600 + 25 * (s % 3), 200 + 25 * (s % 2)),
        "flipped": lambda s: (200 + 25 * (s % 2), 600 + 25 * (s % 3)),
        "not supported": lambda s: (400 + 25 * (s % 3), 400 + 25 * (s % 2)),
        "inconclusive": lambda s: (300 + 150 * (s % 3), 200 + 100 * ((s + 1) % 3)),
    }[case]
    runs = []
    for seed in SEEDS:
        none, batch = steps(seed)
        for norm, reached in (("none", none), ("batch", batch)):
            runs.append({"params": {"norm": norm, "seed": seed, "learning_rate": 0.1},
                         "result": result(0.9, seed, steps_to_target=reached,
                                          validation_accuracy=[0.1, 0.95], steps=[0, 1500])})
    return runs


@pytest.mark.parametrize("case", CASES)
def test_convergence_rule(case):
    (verdict,) = verdicts("convergence", ConvergenceConfig(), convergence_runs(case)).values()
    assert verdict == EXPECTED[case]


def test_convergence_counts_a_run_that_never_reached_the_target_as_the_budget():
    runs = convergence_runs("supported")
    for run in runs:
        if run["params"]["norm"] == "none":
            run["result"]["steps_to_target"] = None  # never reached: counts as 1500 steps
        else:
            run["result"]["steps_to_target"] = 200 + 25 * run["params"]["seed"]
    (finding,) = get_experiment("convergence").findings(ConvergenceConfig(), runs)
    assert finding.verdict == SUPPORTED and finding.effect > 1500 / 300


# ---- C1 and C3, ioffe-mnist --------------------------------------------------------------------


def ioffe_runs(case: str, claim: str) -> list[dict]:
    # C1: mean validation accuracy BN minus none (pp, threshold 2*sqrt(2)*50/sqrt(800) = 5.1 pp).
    # C3: drift none / BN (threshold 1.5x).
    gain, ratio = {
        "supported": (15.0, 3.0),
        "flipped": (-15.0, 1 / 3),
        "not supported": (0.0, 1.0),
        "inconclusive": (5.0, 1.5),
    }[case]
    spread_gain, spread_ratio = {"inconclusive": (20.0, 0.6)}.get(case, (1.0, 0.1))
    runs = []
    for seed in SEEDS:
        offset = jitter(seed, spread_gain) / 100
        factor = 1 + jitter(seed, spread_ratio)
        base = 0.6
        curves = {"none": [0.1, base, base], "batch": [0.1] + [base + gain / 100 + offset] * 2}
        drifts = {"none": 0.5 * ratio * factor, "batch": 0.5}
        for norm in ("none", "batch"):
            runs.append({"params": {"norm": norm, "seed": seed, "learning_rate": 0.1},
                         "result": result(0.8, seed, validation_accuracy=curves[norm],
                                          drift=drifts[norm], drift_whole_run=drifts[norm])})
    return runs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("claim", ["C1", "C3"])
def test_ioffe_rules(case, claim):
    found = get_experiment("ioffe-mnist").findings(IoffeConfig(), ioffe_runs(case, claim))
    (finding,) = [f for f in found if f.claim == claim]
    assert finding.verdict == EXPECTED[case], finding


# ---- C2, learning rate: largest tolerated rate with BN / without -------------------------------


def learning_rate_runs(case: str) -> list[dict]:
    config = LearningRateConfig()
    rates = config.learning_rates  # 0.01 * 2**k, k = 0..8

    def curve(edge_index: float) -> list[float]:
        # 0.6 up to the edge, then lower: the interpolated edge lies between grid points.
        return [0.6 if index <= edge_index else 0.05 + 0.2 * (edge_index % 1)
                for index in range(9)]

    none_edge, batch_edge, scatter = {
        "supported": (2.0, 6.0, 0.0),
        "flipped": (6.0, 2.0, 0.0),
        "not supported": (4.0, 4.0, 0.0),
        "inconclusive": (3.0, 4.0, 3.0),
    }[case]
    runs = []
    for seed in SEEDS:
        edges = (("none", none_edge + jitter(seed, 0.5)),
                 ("batch", batch_edge + jitter(seed + 3, 0.5) + jitter(seed, scatter)))
        for norm, edge in edges:
            for rate, accuracy in zip(rates, curve(edge), strict=True):
                runs.append({"params": {"norm": norm, "learning_rate": rate, "seed": seed},
                             "result": result(accuracy, seed, salt=int(rate * 100))})
    return runs


@pytest.mark.parametrize("case", CASES)
def test_learning_rate_rule(case):
    (verdict,) = verdicts("learning-rate", LearningRateConfig(), learning_rate_runs(case)).values()
    assert verdict == EXPECTED[case]


# ---- C5, regularization: the gap, and non-inferiority to dropout -------------------------------


def regularization_runs(gap_case: str, dropout_case: str) -> list[dict]:
    # Gap threshold (2 accuracies on 1000 examples): 4.5 pp; dropout margin: -4.5 pp.
    gap_reduction = {"supported": 15.0, "flipped": -15.0, "not supported": 0.0,
                     "inconclusive": 4.5}[gap_case]
    bn_minus_dropout = {"supported": 2.0, "flipped": -15.0, "not supported": -15.0,
                        "inconclusive": -4.5}[dropout_case]
    runs = []
    for seed in SEEDS:
        wobble = jitter(seed, 2.0) / 100
        tests = {("none", 0.0): 0.55, ("batch", 0.0): 0.60 + wobble,
                 ("none", 0.3): 0.60 - bn_minus_dropout / 100, ("batch", 0.3): 0.6}
        trains = {("none", 0.0): 0.95, ("batch", 0.0): 0.95 - gap_reduction / 100 + 0.05,
                  ("none", 0.3): 0.9, ("batch", 0.3): 0.9}
        for (norm, dropout), test in tests.items():
            runs.append({"params": {"norm": norm, "dropout": dropout, "seed": seed,
                                    "learning_rate": 0.03},
                         "result": result(test, seed, salt=int(dropout * 10),
                                          train_accuracy=trains[(norm, dropout)])})
    return runs


@pytest.mark.parametrize("case", CASES)
def test_regularization_gap_rule(case):
    found = get_experiment("regularization").findings(
        RegularizationConfig(), regularization_runs(case, "supported"))
    assert found[0].verdict == EXPECTED[case], found[0]


@pytest.mark.parametrize("case", CASES)
def test_dropout_non_inferiority_rule(case):
    found = get_experiment("regularization").findings(
        RegularizationConfig(), regularization_runs("supported", case))
    assert found[1].threshold < 0  # a margin below zero: "not worse by more than"
    assert found[1].verdict == EXPECTED[case], found[1]


# ---- C6, init: spread over scales without BN minus with BN -------------------------------------


def init_runs(case: str) -> list[dict]:
    config = InitConfig()
    spreads = {  # (spread without BN, spread with BN) in accuracy; threshold 6.4 pp
        "supported": (0.40, 0.05),
        "flipped": (0.05, 0.40),
        "not supported": (0.10, 0.10),
        "inconclusive": (0.12, 0.05),
    }[case]
    scatter = 0.15 if case == "inconclusive" else 0.01
    runs = []
    for seed in SEEDS:
        for norm, spread in zip(("none", "batch"), spreads, strict=True):
            wide = max(0.0, spread + (jitter(seed, scatter) if norm == "none" else 0.0))
            for index, scale in enumerate(config.scales):
                accuracy = 0.6 - wide * abs(index - 2) / 2  # best at 1x, worst at the ends
                runs.append({"params": {"norm": norm, "scale": scale, "seed": seed,
                                        "learning_rate": 0.03},
                             "result": result(accuracy, seed, salt=index)})
    return runs


@pytest.mark.parametrize("case", CASES)
def test_init_rule(case):
    (verdict,) = verdicts("init", InitConfig(), init_runs(case)).values()
    assert verdict == EXPECTED[case]


# ---- C9 and C15, batch size: one measure, one rule and its complement ------------------------


def batch_size_runs(case: str) -> list[dict]:
    config = BatchSizeConfig()
    # BN's loss from batch 32 to 2 minus the batch-free norm's loss (pp); threshold 6.4 pp.
    excess, scatter = {
        "supported": (30.0, 2.0),
        "flipped": (-30.0, 2.0),
        "not supported": (0.0, 2.0),
        "inconclusive": (6.4, 8.0),
    }[case]
    runs = []
    for seed in SEEDS:
        for model in ("mlp", "cnn"):
            for norm in config.norms(model):
                for size in config.batch_sizes:
                    accuracy = 0.6
                    if norm == "batch" and size == 2:
                        accuracy -= (excess + jitter(seed, scatter)) / 100
                    if norm == "batch" and size == 2 and excess < 0:
                        accuracy = 0.6
                    if norm != "batch" and size == 2 and excess < 0:
                        accuracy = 0.6 + excess / 100 + jitter(seed, scatter) / 100
                    runs.append({"params": {"model": model, "norm": norm, "batch_size": size,
                                            "seed": seed, "learning_rate": 0.1},
                                 "result": result(accuracy, seed, salt=size)})
    return runs


@pytest.mark.parametrize("case", CASES)
def test_batch_size_rules_are_complements(case):
    found = get_experiment("batch-size").findings(BatchSizeConfig(), batch_size_runs(case))
    for model in ("MLP", "CNN"):
        (c9,) = [f for f in found if f.claim == "C9" and f.measure.startswith(model)]
        (c15,) = [f for f in found if f.claim == "C15" and f.measure.startswith(model)]
        assert c9.verdict == EXPECTED[case], c9
        opposite = {SUPPORTED: NOT_SUPPORTED, NOT_SUPPORTED: SUPPORTED,
                    INCONCLUSIVE: INCONCLUSIVE}
        assert c15.verdict == opposite[c9.verdict]
        assert (c9.threshold, c9.effect, c9.low, c9.high) == (c15.threshold, c15.effect,
                                                               c15.low, c15.high)
        assert {c9.supports, c15.supports} == {"above", "below"}


def test_batch_size_compares_with_the_batch_free_norm():
    # Every norm loses the same at batch 2: BN's own loss is large, but no excess over LayerNorm.
    runs = batch_size_runs("supported")
    for run in runs:
        if run["params"]["batch_size"] == 2 and run["params"]["norm"] != "batch":
            seed = run["params"]["seed"]
            twin = next(r for r in runs if r["params"] == {**run["params"], "norm": "batch"})
            accuracy = twin["result"]["test_accuracy"] + jitter(seed + 1, 0.02)
            run["result"] = result(accuracy, seed, salt=2)
    found = get_experiment("batch-size").findings(BatchSizeConfig(), runs)
    assert {f.verdict for f in found if f.claim == "C9"} == {NOT_SUPPORTED}
    assert {f.verdict for f in found if f.claim == "C15"} == {SUPPORTED}


# ---- Every finding says what, where, how much, and why the threshold is above the noise ------


def test_findings_carry_measure_split_threshold_and_reason():
    cases = [
        ("convergence", ConvergenceConfig(), convergence_runs("supported")),
        ("ioffe-mnist", IoffeConfig(), ioffe_runs("supported", "C1")),
        ("learning-rate", LearningRateConfig(), learning_rate_runs("supported")),
        ("regularization", RegularizationConfig(), regularization_runs("supported", "supported")),
        ("init", InitConfig(), init_runs("supported")),
        ("batch-size", BatchSizeConfig(), batch_size_runs("supported")),
    ]
    for name, config, runs in cases:
        for finding in get_experiment(name).findings(config, runs):
            assert finding.measure and finding.unit in ("pp", "x")
            assert finding.split in ("test", "validation") and finding.data == "synthetic"
            assert finding.why and "noise" not in finding.rule  # the reason is its own field
            assert finding.seeds == len(SEEDS) and len(finding.per_seed) == len(SEEDS)
            assert finding.low < finding.effect < finding.high
            if finding.unit == "pp" and finding.split == "test":
                assert finding.example_se > 0  # the shared test examples widen the interval
