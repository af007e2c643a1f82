"""C8, depth: the residual and convolutional nets against hand-computed outputs, where a net stops
training on curves with a known answer, each family's findings on synthetic runs whose answer is
known, and the reading across the families."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.base import TUNING_SEEDS, config_to_dict
from batchnorm.lab.experiments.deep_models import (
    NETS,
    DeepCNN,
    ResidualMLP,
    build_cnn,
    build_net,
    hidden_linears,
)
from batchnorm.lab.experiments.depth import (
    EXPERIMENT,
    MODELS,
    DepthConfig,
    across_families,
    both_families,
    stopping_depth,
    stopping_depths,
)
from batchnorm.lab.models import MLP
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS, jitter, result

# Depths doubling from 2, to 64 for the MLPs and to 32 for the CNNs: grids that differ, so that
# a family read on the other's grid shows.
CONFIG = DepthConfig(depths=(2, 4, 8, 16, 32, 64), cnn_depths=(2, 4, 8, 16, 32))
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


def by_hand(model: DeepCNN, x: torch.Tensor, skips: bool) -> torch.Tensor:
    """A convolutional net without norms, layer by layer."""
    h = model.stem(x)
    for block in model.blocks:
        inner = block.conv(torch.relu(h))
        h = h + inner if skips else inner
    return model.classifier(torch.relu(h).flatten(1))


@pytest.mark.parametrize("skips", [False, True])
def test_convolutional_net_is_a_chain_of_convolutions_with_or_without_skips(skips):
    torch.manual_seed(0)
    model = DeepCNN((2, 8, 8), 3, depth=4, channels=5, norm="none", skips=skips)
    x = torch.randn(4, 2, 8, 8)
    assert torch.allclose(model(x), by_hand(model, x, skips), atol=1e-6)
    # The stem halves the resolution; the classifier reads the 4x4 maps of every channel.
    assert model.stem(x).shape == (4, 5, 4, 4) and model.classifier.in_features == 5 * 16


def test_convolutional_net_reads_signals_with_one_dimensional_convolutions():
    torch.manual_seed(0)
    model = DeepCNN((1, 1, 7), 3, depth=3, channels=4, norm="batch")
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convolutions) == 3 and model.classifier.in_features == 4 * 4  # ceil(7 / 2)
    assert model(torch.randn(6, 1, 1, 7)).shape == (6, 3)
    # Odd image sides: ceil(7 / 2) * ceil(5 / 2) positions.
    assert DeepCNN((3, 7, 5), 2, depth=2, channels=2)(torch.randn(2, 3, 7, 5)).shape == (2, 2)


def test_convolutional_net_with_silent_blocks_is_its_stem_head_and_classifier():
    torch.manual_seed(0)
    deep = DeepCNN((1, 8, 8), 3, depth=6, channels=4, norm="batch", skips=True)
    for block in deep.blocks:
        torch.nn.init.zeros_(block.conv.weight)
        torch.nn.init.zeros_(block.conv.bias)
    shallow = DeepCNN((1, 8, 8), 3, depth=1, channels=4, norm="batch")
    shallow.stem.load_state_dict(deep.stem.state_dict())
    shallow.classifier.load_state_dict(deep.classifier.state_dict())
    x = torch.randn(16, 1, 8, 8)
    assert torch.allclose(deep(x), shallow(x), atol=1e-6)


def test_convolutional_nets_by_name():
    for net, (norm, skips) in NETS.items():
        model = build_cnn(net, (1, 8, 8), 3, depth=4, channels=5)
        assert isinstance(model, DeepCNN) and model.skips == skips
        assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 4
        names = {type(module).__name__ for module in model.modules()}
        assert ("BatchNorm2d" in names) == (norm == "batch")
    with pytest.raises(ValueError, match="unknown net"):
        build_cnn("deep", (1, 8, 8), 3, depth=4, channels=5)


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


# Per-seed stopping depths (plain, BN): threshold one doubling (2x), both families.
STOPS = {
    "supported": lambda seed: (6.0 * (1 + jitter(seed, 0.2)), 24.0 * (1 + jitter(seed, 0.4))),
    "flipped": lambda seed: (24.0 * (1 + jitter(seed, 0.4)), 6.0 * (1 + jitter(seed, 0.2))),
    "not supported": lambda seed: (12.0 * (1 + jitter(seed, 0.2)), 12.0),
    "inconclusive": lambda seed: (6.0, 6.0 * (1.0, 4.0, 1.5, 5.0, 2.5)[seed]),
}
# Per-seed test accuracies at the deepest depth (plain, BN): BN minus plain above about 4.5 pp.
DEEP = {
    "supported": lambda seed: (0.10, 0.60 + jitter(seed, 0.04)),
    "flipped": lambda seed: (0.60 + jitter(seed, 0.04), 0.10),
    "not supported": lambda seed: (0.10, 0.11 + jitter(seed, 0.02)),
    "inconclusive": lambda seed: (0.10, 0.10 + (-0.05, 0.15, 0.0, 0.10, 0.025)[seed]),
}
# Per-seed loss of BN's test accuracy from the shallowest to the deepest depth (a gain is
# negative): no loss beyond the margin (about 4.5 pp) is supported.
LOSS = {
    "supported": lambda seed: -0.10 + jitter(seed, 0.02),
    "flipped": lambda seed: 0.10 + jitter(seed, 0.02),
    "not supported": lambda seed: 0.25 + jitter(seed, 0.02),
    "inconclusive": lambda seed: (0.0, 0.10, 0.02, 0.07, 0.045)[seed],
}
ALL_SUPPORTED = ("supported", "supported", "supported")


def family_runs(model: str, stops: str, deep: str, keeps: str) -> list[dict]:
    """One family's runs: the stopping depths, deepest accuracies and BN's loss of the named
    cases (the skips train at every depth)."""
    runs = []
    depths = CONFIG.depths_of(model)
    shallow, deepest = min(depths), max(depths)
    for seed in SEEDS:
        stop = dict(zip(("plain", "batch"), STOPS[stops](seed), strict=True))
        stop["batch-residual"] = 100.0
        plain_deep, batch_deep = DEEP[deep](seed)
        test = {("plain", deepest): plain_deep, ("batch", deepest): batch_deep,
                ("batch", shallow): batch_deep + LOSS[keeps](seed)}
        for net in CONFIG.nets:
            for depth in depths:
                runs.append({
                    "params": {"model": model, "net": net, "depth": depth, "seed": seed,
                               "learning_rate": 0.1},
                    "result": result(test.get((net, depth), 0.5), seed,
                                     salt=depth + 100 * len(net) + 1000 * len(model),
                                     validation_accuracy=[0.1, validation_curve(stop[net], depth)],
                                     chance=0.1),
                })
    return runs


def synthetic_runs(mlp=ALL_SUPPORTED, cnn=ALL_SUPPORTED) -> list[dict]:
    """Both families' runs; ``mlp`` and ``cnn`` name the (stops, deep, keeps) cases of each."""
    return family_runs("mlp", *mlp) + family_runs("cnn", *cnn)


def verdicts(runs) -> dict[str, dict[str, str]]:
    """Each family's three verdicts, by measure."""
    found = EXPERIMENT.findings(CONFIG, runs)
    assert len(found) == 6 and all(finding.claim == "C8" for finding in found)
    assert [f.measure.split(":")[0].split(",")[0] for f in found] == ["MLP"] * 3 + ["CNN"] * 3
    return {model: dict(zip(("stops", "deep", "keeps"),
                            (f.verdict for f in found[3 * index: 3 * index + 3]), strict=True))
            for index, model in enumerate(MODELS)}


def cases(position: int, case: str, model: str) -> dict:
    """The families' cases with ``case`` at ``position`` (0 stops, 1 deep, 2 keeps) of
    ``model`` and every other case supported."""
    chosen = list(ALL_SUPPORTED)
    chosen[position] = case
    return {name: tuple(chosen) if name == model else ALL_SUPPORTED for name in MODELS}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", list(EXPECTED))
def test_stopping_depth_rule(case, model):
    runs = synthetic_runs(**cases(0, case, model))
    found = verdicts(runs)
    other = next(name for name in MODELS if name != model)
    assert found[model]["stops"] == EXPECTED[case]
    assert found[other]["stops"] == SUPPORTED  # one family's runs never reach the other's
    stops = stopping_depths(CONFIG, runs)
    for seed in SEEDS:
        plain, batch = STOPS[case](seed)
        assert stops[(model, "plain", seed)][0] == pytest.approx(plain)
        assert stops[(model, "batch", seed)][0] == pytest.approx(batch)
        deepest = max(CONFIG.depths_of(model))
        assert stops[(model, "batch-residual", seed)] == (float(deepest), "above")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", list(EXPECTED))
def test_deepest_depth_accuracy_rule(case, model):
    found = verdicts(synthetic_runs(**cases(1, case, model)))
    assert found[model]["deep"] == EXPECTED[case]
    assert found[next(name for name in MODELS if name != model)]["deep"] == SUPPORTED


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", list(EXPECTED))
def test_bn_keeps_its_accuracy_rule(case, model):
    found = verdicts(synthetic_runs(**cases(2, case, model)))
    assert found[model]["keeps"] == EXPECTED[case]
    assert found[next(name for name in MODELS if name != model)]["keeps"] == SUPPORTED


@pytest.mark.parametrize("verdicts_, expected", [
    ((SUPPORTED, SUPPORTED), SUPPORTED),
    ((SUPPORTED, NOT_SUPPORTED), NOT_SUPPORTED),
    ((NOT_SUPPORTED, SUPPORTED), NOT_SUPPORTED),
    ((INCONCLUSIVE, NOT_SUPPORTED), NOT_SUPPORTED),
    ((SUPPORTED, INCONCLUSIVE), INCONCLUSIVE),
    ((INCONCLUSIVE, INCONCLUSIVE), INCONCLUSIVE),
    ((NOT_SUPPORTED, NOT_SUPPORTED), NOT_SUPPORTED),
    ((), INCONCLUSIVE),
])
def test_both_families_is_the_conjunction(verdicts_, expected):
    assert both_families(list(verdicts_)) == expected


@pytest.mark.parametrize("case, expected", [
    # CNN's stopping-depth case against the MLP's (supported): the reading across the families.
    ("supported", SUPPORTED),
    ("not supported", NOT_SUPPORTED),
    ("inconclusive", INCONCLUSIVE),
    ("flipped", NOT_SUPPORTED),
])
def test_reading_across_families(case, expected):
    runs = synthetic_runs(cnn=(case, "supported", "supported"))
    reading = across_families(CONFIG, runs)
    assert reading["stops"] == {"mlp": SUPPORTED, "cnn": EXPECTED[case], "both": expected}
    assert reading["deepest"]["both"] == reading["keeps"]["both"] == SUPPORTED
    # Both families flipped: the claim is contradicted across them.
    flipped = across_families(CONFIG, synthetic_runs(mlp=("flipped",) * 3, cnn=("flipped",) * 3))
    assert {measure: value["both"] for measure, value in flipped.items()} == {
        "stops": NOT_SUPPORTED, "deepest": NOT_SUPPORTED, "keeps": NOT_SUPPORTED}


def test_one_family_alone_gives_its_own_findings_and_no_reading_across():
    config = replace(CONFIG, models=("cnn",))
    runs = family_runs("cnn", *ALL_SUPPORTED)
    found = EXPERIMENT.findings(config, runs)
    assert len(found) == 3 and all(f.measure.startswith("CNN") for f in found)
    analysis = EXPERIMENT.analyze(config, runs)
    assert [figure.name for figure in analysis.figures] == ["depth-cnn"]
    assert not any(table.title.startswith("C8 across") for table in analysis.tables)


def test_analysis_draws_a_captioned_figure_per_family_and_reads_across_them():
    analysis = EXPERIMENT.analyze(CONFIG, synthetic_runs())
    assert [figure.name for figure in analysis.figures] == ["depth", "depth-cnn"]
    for figure, depths in zip(analysis.figures, (CONFIG.depths, CONFIG.cnn_depths), strict=True):
        assert "5 seeds" in figure.caption and "95%" in figure.caption
        assert all(series.x == list(depths) for series in figure.panels[1].series)
    across = next(table for table in analysis.tables if table.title.startswith("C8 across"))
    assert [row[-1] for row in across.rows] == [SUPPORTED] * 3
    stops = next(table for table in analysis.tables if table.title.startswith("Where"))
    assert [row[:2] for row in stops.rows] == [[family, net] for family in ("MLP", "CNN")
                                               for net in ("plain (no BN)", "BN", "BN + skips")]
    assert any(note.startswith("CNN, BN without skips: stopped") for note in analysis.notes)


def test_setup_says_why_the_cnn_grid_is_as_deep_as_it_is():
    same = EXPERIMENT.setup(DepthConfig())
    assert "CNNs of 2, 4, 8, 16, 32, 64 3x3 convolutions" in same
    assert "as deep as the MLPs' (64, past Yang et al.'s 50 layers)" in same
    shorter = EXPERIMENT.setup(CONFIG)
    assert "Their depths stop at 32, short of the MLPs' 64" in shorter
    assert "CNNs" not in EXPERIMENT.setup(replace(CONFIG, models=("mlp",)))


# ---- The whole experiment, tiny ------------------------------------------------------------


def test_a_tiny_suite_reports_every_finding_and_the_figure(tmp_path, monkeypatch):
    from batchnorm.lab.suite import run_suite

    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    config = DepthConfig(depths=(1, 3), cnn_depths=(1, 3), tuning_depth=1, tuning_rates=(0.1,),
                         steps=4, batch_size=16, width=8, channels=2)
    run_suite({EXPERIMENT.name: config}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, quick=True, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert report.count("| [C8](#c8) |") == 6
    assert "depth.png" in report and "depth-cnn.png" in report and "Yang" in report
    assert "C8 across the families" in report


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
    assert {(params["model"], params["net"]) for params in tuning} == \
        {(model, net) for model in MODELS for net in NETS}
    assert {(params["model"], params["depth"]) for params in plan} == \
        {(model, depth) for model in MODELS for depth in config.depths_of(model)}
    choice = {"learning_rate": {f"{model}/{net}": 0.01 * (index + 1)
                                for index, (model, net) in enumerate(
                                    (model, net) for model in MODELS for net in NETS)}}
    for params in plan:
        assert EXPERIMENT.tuning.apply(choice, params)["learning_rate"] == \
            choice["learning_rate"][f"{params['model']}/{params['net']}"]
