"""C8, depth: the residual net against hand-computed outputs, where a net stops training on
curves with a known answer, and each finding on synthetic runs whose answer is known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.base import TUNING_SEEDS, config_to_dict
from batchnorm.lab.experiments.deep_models import (
    NETS,
    ResidualMLP,
    build_net,
    hidden_linears,
)
from batchnorm.lab.experiments.depth import (
    EXPERIMENT,
    DepthConfig,
    stopping_depth,
    stopping_depths,
)
from batchnorm.lab.models import MLP
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS, jitter, result

CONFIG = DepthConfig()  # depths 2 to 64, doubling
EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: torch's intra-op threads only slow them down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- The nets ------------------------------------------------------------------------------


def test_residual_net_adds_each_block_to_its_input():
    torch.manual_seed(0)
    model = ResidualMLP(6, 3, depth=3, width=5, norm="none")
    x = torch.randn(4, 6)
    h = model.stem(x)
    for block in model.blocks:
        h = h + block.linear(torch.relu(h))
    expected = model.classifier(torch.relu(h))
    assert torch.allclose(model(x), expected)
    assert hidden_linears(model) == [model.stem, *(block.linear for block in model.blocks)]


def test_residual_net_with_silent_blocks_is_its_stem_norm_and_classifier():
    """With every block's linear layer zero, the skips carry the stem's output straight to the
    head: the net is the one-layer MLP with the same weights."""
    torch.manual_seed(0)
    deep = ResidualMLP(6, 3, depth=8, width=5, norm="batch")
    for block in deep.blocks:
        torch.nn.init.zeros_(block.linear.weight)
        torch.nn.init.zeros_(block.linear.bias)
    shallow = MLP(6, 3, depth=1, width=5, norm="batch")
    with torch.no_grad():
        shallow.hidden[0][0].weight.copy_(deep.stem.weight)
        shallow.hidden[0][0].bias.copy_(deep.stem.bias)
        shallow.classifier.weight.copy_(deep.classifier.weight)
        shallow.classifier.bias.copy_(deep.classifier.bias)
    x = torch.randn(16, 6)
    assert torch.allclose(deep(x), shallow(x), atol=1e-6)


def test_nets_by_name():
    for net, (norm, skips) in NETS.items():
        model = build_net(net, 6, 3, depth=4, width=5)
        assert isinstance(model, ResidualMLP if skips else MLP)
        assert len(hidden_linears(model)) == 4
        names = {type(module).__name__ for module in model.modules()}
        assert ("BatchNorm1d" in names) == (norm == "batch")
    with pytest.raises(ValueError, match="unknown net"):
        build_net("deep", 6, 3, depth=4, width=5)


# ---- Where a net stops training ------------------------------------------------------------------


def test_stopping_depth_interpolates_on_the_log_depth_axis():
    depths = [2, 4, 8, 16]
    # 0.5 at 4, 0.1 at 8: the level 0.3 is crossed halfway, at sqrt(4 * 8) on the log axis.
    depth, censored = stopping_depth(depths, [0.9, 0.5, 0.1, 0.1], 0.3)
    assert depth == pytest.approx(math.sqrt(32)) and censored == ""
    assert stopping_depth(depths, [0.9, 0.9, 0.9, 0.8], 0.3) == (16.0, "above")
    assert stopping_depth(depths, [0.1, 0.9, 0.9, 0.9], 0.3) == (2.0, "below")
    # A net that fails at 4 but recovers at 8 has stopped at the first failure.
    depth, _ = stopping_depth(depths, [0.9, 0.1, 0.9, 0.9], 0.3)
    assert 2 < depth < 4


# ---- Findings on synthetic runs ----------------------------------------------------------------


def validation_curve(stop: float, depth: int) -> float:
    """Accuracy falling 20 pp per doubling of depth and crossing 30% (chance 10% + 20 pp) at
    ``stop``: the interpolation recovers ``stop`` exactly."""
    return min(0.95, max(0.05, 0.3 + 0.2 * (math.log2(stop) - math.log2(depth))))


# Per-seed stopping depths (plain, BN): threshold one doubling (2x).
STOPS = {
    "supported": lambda seed: (6.0 * (1 + jitter(seed, 0.2)), 30.0 * (1 + jitter(seed, 0.4))),
    "flipped": lambda seed: (30.0 * (1 + jitter(seed, 0.4)), 6.0 * (1 + jitter(seed, 0.2))),
    "not supported": lambda seed: (12.0 * (1 + jitter(seed, 0.2)), 12.0),
    "inconclusive": lambda seed: (8.0, 8.0 * (1.0, 4.0, 1.5, 6.0, 2.5)[seed]),
}
# Per-seed test accuracies at depth 64 (plain, BN): BN minus plain above about 4.5 pp.
DEEP = {
    "supported": lambda seed: (0.10, 0.60 + jitter(seed, 0.04)),
    "flipped": lambda seed: (0.60 + jitter(seed, 0.04), 0.10),
    "not supported": lambda seed: (0.10, 0.11 + jitter(seed, 0.02)),
    "inconclusive": lambda seed: (0.10, 0.10 + (-0.05, 0.15, 0.0, 0.10, 0.025)[seed]),
}
# Per-seed loss of BN's test accuracy from depth 2 to depth 64 (a gain is negative): no loss
# beyond the margin (about 4.5 pp) is supported.
LOSS = {
    "supported": lambda seed: -0.10 + jitter(seed, 0.02),
    "flipped": lambda seed: 0.10 + jitter(seed, 0.02),
    "not supported": lambda seed: 0.25 + jitter(seed, 0.02),
    "inconclusive": lambda seed: (0.0, 0.10, 0.02, 0.07, 0.045)[seed],
}


def synthetic_runs(stops: str = "supported", deep: str = "supported",
                   keeps: str = "supported") -> list[dict]:
    runs = []
    shallow, deepest = min(CONFIG.depths), max(CONFIG.depths)
    for seed in SEEDS:
        stop = dict(zip(("plain", "batch"), STOPS[stops](seed), strict=True))
        stop["batch-residual"] = 100.0  # trains at every depth
        plain_deep, batch_deep = DEEP[deep](seed)
        test = {("plain", deepest): plain_deep, ("batch", deepest): batch_deep,
                ("batch", shallow): batch_deep + LOSS[keeps](seed)}
        for net in CONFIG.nets:
            for depth in CONFIG.depths:
                runs.append({
                    "params": {"net": net, "depth": depth, "seed": seed, "learning_rate": 0.1},
                    "result": result(test.get((net, depth), 0.5), seed,
                                     salt=depth + 100 * len(net),
                                     validation_accuracy=[0.1, validation_curve(stop[net], depth)],
                                     chance=0.1),
                })
    return runs


def verdicts(runs) -> dict[str, str]:
    found = EXPERIMENT.findings(CONFIG, runs)
    assert len(found) == 3 and all(finding.claim == "C8" for finding in found)
    return dict(zip(("stops", "deep", "keeps"), (f.verdict for f in found), strict=True))


@pytest.mark.parametrize("case", list(EXPECTED))
def test_stopping_depth_rule(case):
    runs = synthetic_runs(stops=case)
    assert verdicts(runs)["stops"] == EXPECTED[case]
    stops = stopping_depths(CONFIG, runs)
    for seed in SEEDS:
        plain, batch = STOPS[case](seed)
        assert stops[("plain", seed)][0] == pytest.approx(plain)
        assert stops[("batch", seed)][0] == pytest.approx(batch)
        assert stops[("batch-residual", seed)] == (64.0, "above")


@pytest.mark.parametrize("case", list(EXPECTED))
def test_deepest_depth_accuracy_rule(case):
    assert verdicts(synthetic_runs(deep=case, keeps="not supported"))["deep"] == EXPECTED[case]


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bn_keeps_its_accuracy_rule(case):
    assert verdicts(synthetic_runs(deep="supported", keeps=case))["keeps"] == EXPECTED[case]


# ---- The whole experiment, tiny ------------------------------------------------------------


def test_a_tiny_suite_reports_every_finding_and_the_figure(tmp_path, monkeypatch):
    from batchnorm.lab.suite import run_suite

    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    config = DepthConfig(depths=(1, 3), tuning_depth=1, tuning_rates=(0.1,), steps=4,
                         batch_size=16, width=8)
    run_suite({EXPERIMENT.name: config}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, quick=True, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert report.count("| [C8](#c8) |") == 3
    assert "depth.png" in report and "Yang" in report


@pytest.mark.parametrize("quick", [False, True])
def test_config_round_trips_and_tuning_uses_its_own_seeds_at_one_depth(quick):
    config = EXPERIMENT.config(quick)
    restored = EXPERIMENT.config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert restored == config and hash(restored) == hash(config)
    plan = EXPERIMENT.plan(config, [0, 1])
    assert len(plan) == len({json.dumps(params, sort_keys=True) for params in plan})
    tuning = EXPERIMENT.tuning.plan(config, quick)
    assert {params["seed"] for params in tuning} <= set(TUNING_SEEDS)
    assert {params["depth"] for params in tuning} == {config.tuning_depth}
    choice = {"learning_rate": {"plain": 0.01, "batch": 0.1, "batch-residual": 0.03}}
    assert EXPERIMENT.tuning.apply(choice, plan[0])["learning_rate"] == \
        choice["learning_rate"][plan[0]["net"]]
