"""C4, smoothness: the probe on landscapes whose answer is known, the deep linear network, the
choice of the common learning rate, and the findings on synthetic runs (all four cases)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from batchnorm.lab.data.splits import Part, Splits
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.base import TUNING_SEEDS, config_to_dict
from batchnorm.lab.experiments.smoothness import (
    DIVERGED_RATIO,
    EXPERIMENT,
    MEASURES,
    MINIMUM_RATIO,
    PROBED,
    DeepLinear,
    SmoothnessConfig,
    median_ratio,
    probe,
    probe_noise,
    ratio_rule,
)
from batchnorm.lab.models import make_norm
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.synthetic import SEEDS, jitter, result


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The lab runs each run on one thread; tiny models only lose time to more (and to a busy
    machine's other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- The probe on hand-built landscapes ------------------------------------------------------


class Weights(nn.Module):
    """A model whose output is its weights: the loss function alone shapes the landscape."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.weights = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.weights


def quadratic(curvatures: list[float]):
    """L(w) = 1/2 sum_i c_i w_i^2: Hessian diag(c), so every quantity has a closed form."""
    scale = torch.tensor(curvatures, dtype=torch.float64)
    return lambda outputs, labels: 0.5 * (scale * outputs**2).sum()


def test_probe_on_a_one_dimensional_quadratic_matches_the_closed_form():
    c, w, rate, multipliers = 2.0, 1.5, 0.1, (0.5, 1.0, 4.0)
    measured = probe(Weights([w]), torch.zeros(1), torch.zeros(1), rate, multipliers,
                     loss_function=quadratic([c]))
    g = c * w
    etas = [m * rate for m in multipliers]
    losses = [0.5 * c * (w - eta * g) ** 2 for eta in etas]
    assert measured["loss"] == pytest.approx(0.5 * c * w**2)
    assert measured["gradient_norm"] == pytest.approx(g)
    assert measured["loss_range"] == pytest.approx(max(losses) - min(losses))
    assert measured["loss_low"] == pytest.approx(min(losses))
    assert measured["loss_high"] == pytest.approx(max(losses))
    # The gradient changes by c * eta * g; per unit of distance (eta * g) that is c, at any eta.
    assert measured["predictiveness"] == pytest.approx(c * max(etas) * g)
    assert measured["beta"] == pytest.approx(c)
    # The loss departs from the first-order prediction by the curvature term 1/2 c (eta g)^2.
    assert measured["departure"] == pytest.approx(0.5 * c * (max(etas) * g) ** 2)


def test_probe_beta_is_the_curvature_along_the_gradient():
    # Hessian diag(1, 9) at w = (1, 1): g = (1, 9), H g = (1, 81); beta = ||H g|| / ||g||.
    measured = probe(Weights([1.0, 1.0]), torch.zeros(1), torch.zeros(1), 0.01, (0.5, 2.0),
                     loss_function=quadratic([1.0, 9.0]))
    assert measured["beta"] == pytest.approx(math.hypot(1, 81) / math.hypot(1, 9))
    flat = probe(Weights([1.0, 1.0]), torch.zeros(1), torch.zeros(1), 0.01, (0.5, 2.0),
                 loss_function=quadratic([1.0, 1.0]))
    assert flat["beta"] == pytest.approx(1.0) and flat["beta"] < measured["beta"]


def test_probe_of_a_step_that_diverges_is_infinite():
    def cliff(outputs, labels):  # L(w) = w^2 for w > 0, infinite beyond the edge at 0
        total = outputs.sum()
        return torch.where(total > 0, total**2, torch.full_like(total, math.inf))

    # At w = 1, g = 2: a step of 0.25 g stays on the slope, one of 1.0 g falls off the edge.
    safe = probe(Weights([1.0]), torch.zeros(1), torch.zeros(1), 0.25, (1.0,),
                 loss_function=cliff)
    assert all(math.isfinite(safe[key]) for key in MEASURES)
    measured = probe(Weights([1.0]), torch.zeros(1), torch.zeros(1), 0.25, (1.0, 4.0),
                     loss_function=cliff)
    assert all(math.isinf(measured[key]) for key in MEASURES)


def test_probe_leaves_the_model_and_its_running_statistics_as_they_were():
    model = DeepLinear(6, 3, depth=4, width=5, norm="batch")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    inputs, labels = torch.randn(16, 6), torch.randint(0, 3, (16,))
    measured = probe(model, inputs, labels, 0.1, (0.5, 1.0, 4.0))
    assert all(math.isfinite(measured[key]) and measured[key] > 0 for key in MEASURES)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(parameter.grad is None for parameter in model.parameters())


def test_probe_measures_the_training_loss_with_batch_statistics():
    # One BN unit (ours) and the mean square of its output as the loss: with the batch's own
    # statistics the output is standardized and the loss is 1 (less a hair for epsilon), while
    # the population statistics (mean 0, variance 1 at the start) would leave x as it is, ~13.
    model = nn.Sequential(make_norm("batch", 1, "vector")).double()
    model.eval()  # the probe must not take the model's mode
    generator = torch.Generator().manual_seed(0)
    inputs = 3 + 2 * torch.randn(64, 1, dtype=torch.float64, generator=generator)
    measured = probe(model, inputs, torch.zeros(64), 0.1, (1.0,),
                     loss_function=lambda outputs, labels: (outputs**2).mean())
    assert measured["loss"] == pytest.approx(1.0, abs=1e-4)
    assert not model.training


# ---- The deep linear network -----------------------------------------------------------------


def test_deep_linear_network_has_its_layers_and_computes_a_linear_map():
    plain = DeepLinear(40, 10, depth=25, width=16, norm="none")
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 25 and not any(isinstance(m, nn.ReLU) for m in plain.modules())
    x, y = torch.randn(4, 40), torch.randn(4, 40)
    torch.testing.assert_close(plain(2 * x - 3 * y), 2 * plain(x) - 3 * plain(y))
    with_bn = DeepLinear(40, 10, depth=25, width=16, norm="batch")
    assert sum("BatchNorm" in type(m).__name__ for m in with_bn.modules()) == 24
    assert all(type(m).__module__.startswith("batchnorm.") for m in with_bn.modules()
               if "BatchNorm" in type(m).__name__)  # our layers, not torch's
    with_bn.eval()  # with population statistics BN is an affine map: the net stays affine
    torch.testing.assert_close(with_bn(0.5 * x + 0.5 * y), 0.5 * with_bn(x) + 0.5 * with_bn(y))


# ---- Runs ------------------------------------------------------------------------------------


TINY = SmoothnessConfig(steps=6, probe_every=3, probe_batch=16, multipliers=(0.5, 4.0),
                        widths=(4, 8, 8), linear_depth=4, linear_width=4)


@pytest.fixture(scope="module")
def signals():
    """A tiny data set of 1-D signals (the CNN takes 1-D convolutions, as on MNIST-1D)."""
    generator = torch.Generator().manual_seed(0)

    def part(size: int) -> Part:
        labels = torch.arange(size) % 3
        images = torch.randn(size, 1, 1, 12, generator=generator) + labels.view(-1, 1, 1, 1)
        return Part(images, labels)

    return Splits("signals", part(96), part(48), part(48), classes=3)


@pytest.mark.parametrize("net", ["cnn", "linear"])
def test_probing_does_not_change_the_training_run(signals, net):
    params = {"net": net, "norm": "batch", "seed": 3, "learning_rate": 0.05}
    probed = EXPERIMENT.run(TINY, params, signals, "cpu")
    plain = EXPERIMENT.run(TINY, {**params, "probe": False}, signals, "cpu")
    assert probed["steps"] == [0, 3, 6]
    assert all(len(probed[key]) == 3 for key in PROBED)
    assert "steps" not in plain and "beta" not in plain
    for key in ("validation_accuracy", "validation_loss", "test_correct"):
        assert probed[key] == plain[key], key
    json.dumps(probed)  # plain numbers


def test_a_run_that_diverges_fills_its_checkpoints_with_infinity(signals):
    params = {"net": "cnn", "norm": "none", "seed": 0, "learning_rate": 1e6}
    diverged = EXPERIMENT.run(TINY, params, signals, "cpu")
    assert diverged["nonfinite"] and len(diverged["beta"]) == 3
    assert math.isinf(diverged["beta"][-1])


# ---- The common learning rate ------------------------------------------------------------------


def test_the_common_rate_is_the_best_validation_loss_of_the_network_without_bn():
    config = SmoothnessConfig()
    tuning = EXPERIMENT.tuning.plan(config, False)
    assert {p["norm"] for p in tuning} == {"none"} and not any(p["probe"] for p in tuning)
    assert {p["seed"] for p in tuning} == set(TUNING_SEEDS)
    losses = {("cnn", 0.03): 1.2, ("cnn", 0.1): 0.8, ("cnn", 0.3): math.inf,
              ("linear", 0.001): 1.8, ("linear", 0.003): 1.7, ("linear", 0.01): 1.7}
    runs = [{"params": p, "result": {"validation_loss": losses[(p["net"], p["learning_rate"])],
                                     "validation_accuracy": [0.0]}} for p in tuning]
    # A rate at which a tuning seed diverged never wins, whatever the other seed did.
    runs[2]["result"]["validation_loss"] = 0.1
    choice = EXPERIMENT.tuning.choose(config, runs)
    assert choice == {"learning_rate": {"cnn": 0.1, "linear": 0.003}}  # ties: the smaller rate
    for norm in ("none", "batch"):
        main = EXPERIMENT.tuning.apply(choice, {"net": "linear", "norm": norm, "seed": 0})
        assert main["learning_rate"] == 0.003  # BN trains at the same rate
    table = EXPERIMENT.tuning.table(config, runs, choice)
    assert "validation" in table.title and table.rows[0][-1] == "0.1"


def test_config_round_trips_and_plans_both_norms_of_both_networks():
    for config in (SmoothnessConfig(), SmoothnessConfig.quick()):
        restored = EXPERIMENT.config_from_dict(json.loads(json.dumps(config_to_dict(config))))
        assert restored == config
        plan = EXPERIMENT.plan(config, [0, 1])
        assert len(plan) == 8 and {(p["net"], p["norm"]) for p in plan} == {
            (net, norm) for net in ("cnn", "linear") for norm in ("none", "batch")}


# ---- Findings on synthetic runs ----------------------------------------------------------------

CHECKPOINTS = list(range(0, 201, 10))


def smoothness_runs(ratios: dict[str, float], spread: float = 0.05) -> list[dict]:
    """Runs whose medians without BN are ``ratios[measure]`` times those with BN, per seed up to
    ``spread`` either way on the log scale; step 0 is wildly off and must be ignored."""
    runs = []
    for seed in SEEDS:
        for net in ("cnn", "linear"):
            for norm in ("none", "batch"):
                probes = {}
                for measure in PROBED:
                    level = math.exp(jitter(2 * seed + 7, 0.2))  # each seed's own level
                    if norm == "none":
                        level *= ratios.get(measure, 1.0) * math.exp(jitter(seed, 2 * spread))
                    wobble = [1.0 + 0.01 * ((seed + i) % 3) for i in range(len(CHECKPOINTS))]
                    probes[measure] = [(1e6 if step == 0 else level) * w
                                       for step, w in zip(CHECKPOINTS, wobble, strict=True)]
                runs.append({
                    "params": {"net": net, "norm": norm, "seed": seed, "learning_rate": 0.1},
                    "result": result(0.8, seed, steps=CHECKPOINTS,
                                     validation_accuracy=[0.1, 0.8], validation_loss=0.6,
                                     **probes),
                })
    return runs


CASES = {
    # (loss-range ratio, beta ratio, spread on the log scale between seeds): the verdict
    "supported": ((3.0, 2.5, 0.05), SUPPORTED),
    "flipped": ((1 / 3.0, 1 / 2.5, 0.05), NOT_SUPPORTED),
    "not supported": ((1.0, 1.0, 0.05), NOT_SUPPORTED),
    "inconclusive": ((1.25, 1.25, 0.5), INCONCLUSIVE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_findings_on_synthetic_runs(case):
    (loss_range, beta, spread), expected = CASES[case]
    config = SmoothnessConfig()
    found = EXPERIMENT.findings(config,
                                smoothness_runs({"loss_range": loss_range, "beta": beta}, spread))
    assert len(found) == 4 and {f.claim for f in found} == {"C4"}
    assert {f.split for f in found} == {"training"}
    for finding in found:
        assert finding.verdict == expected, (finding.measure, finding.effect_text())
        assert finding.threshold == MINIMUM_RATIO and finding.unit == "x"
        assert finding.seeds == len(SEEDS)
    if case == "supported":
        effects = sorted(f.effect for f in found)
        assert effects == pytest.approx([2.5, 2.5, 3.0, 3.0], rel=0.05)


def test_each_measure_is_judged_on_its_own():
    found = EXPERIMENT.findings(SmoothnessConfig(),
                                smoothness_runs({"loss_range": 1.0, "beta": 3.0}))
    verdicts = {f.measure.split(" along")[0]: f.verdict for f in found}
    assert verdicts == {
        "CNN: loss range": NOT_SUPPORTED, "CNN: effective beta-smoothness": SUPPORTED,
        "deep linear net: loss range": NOT_SUPPORTED,
        "deep linear net: effective beta-smoothness": SUPPORTED,
    }


def test_a_diverged_run_counts_as_rougher_than_any_measured():
    without = {"steps": [0, 10, 20, 30], "beta": [1.0, math.inf, math.inf, 5.0]}
    with_bn = {"steps": [0, 10, 20, 30], "beta": [1.0, 2.0, 2.0, 2.0]}
    assert median_ratio(without, with_bn, "beta") == DIVERGED_RATIO
    assert median_ratio(with_bn, without, "beta") == 1 / DIVERGED_RATIO
    assert median_ratio(without, without, "beta") == 1.0
    finite = {"steps": [0, 10, 20, 30], "beta": [100.0, 4.0, 6.0, 5.0]}
    assert median_ratio(finite, with_bn, "beta") == 2.5


def test_threshold_rises_above_the_probe_noise_when_that_is_larger():
    assert probe_noise(20, 5) < MINIMUM_RATIO
    assert ratio_rule("beta", 20, 5).threshold == MINIMUM_RATIO
    assert probe_noise(3, 3) > probe_noise(20, 3) > probe_noise(20, 10) > 1
    assert ratio_rule("beta", 3, 3).threshold == pytest.approx(probe_noise(3, 3), abs=0.01)
    assert ratio_rule("beta", 3, 3).threshold >= probe_noise(3, 3)


# ---- Analysis and the suite ------------------------------------------------------------------


def test_analysis_has_tables_and_a_log_scale_figure_per_network():
    runs = smoothness_runs({"loss_range": 3.0, "beta": 2.5})
    analysis = EXPERIMENT.analyze(SmoothnessConfig(), runs)
    assert len(analysis.findings) == 4 and len(analysis.tables) == 2
    ratios = analysis.tables[1]
    assert [row[0] for row in ratios.rows] == ["CNN", "deep linear net"]
    loss_range, _, beta, _ = (float(cell.split("x")[0]) for cell in ratios.rows[0][1:])
    assert loss_range == pytest.approx(3.0, rel=0.05) and beta == pytest.approx(2.5, rel=0.05)
    assert [figure.name for figure in analysis.figures] == ["smoothness-cnn",
                                                             "smoothness-linear"]
    for figure in analysis.figures:
        assert figure.caption and all(panel.yscale == "log" for panel in figure.panels)
        loss_panel, beta_panel = figure.panels
        assert {s.label.split(" (")[0] for s in beta_panel.series} == {"no BN", "BN"}
        for series in loss_panel.series:  # the band runs from the lowest to the highest loss
            assert all(low <= high for low, high in zip(series.low, series.high, strict=True))


def test_analysis_plots_around_a_diverged_run():
    runs = smoothness_runs({"loss_range": 3.0, "beta": 2.5})
    for key in ("beta", "loss", "loss_low", "loss_high"):
        runs[0]["result"][key][-1] = math.inf  # seed 0's CNN without BN, last checkpoint
    runs[0]["result"]["nonfinite"] = True
    analysis = EXPERIMENT.analyze(SmoothnessConfig(), runs)
    beta_series = analysis.figures[0].panels[1].series[0]
    assert beta_series.x[-1] == CHECKPOINTS[-2] and all(map(math.isfinite, beta_series.y))
    assert any("diverged" in note for note in analysis.notes)


@pytest.mark.slow
def test_quick_suite_renders_a_report(tmp_path, monkeypatch):
    from batchnorm.lab.suite import run_suite

    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    report = run_suite({EXPERIMENT.name: TINY}, [0, 1, 2], data="digits", out=tmp_path,
                       store=tmp_path / "runs", jobs=1, quick=True, progress=False)
    text = (tmp_path / "report.md").read_text()
    assert "C4" in text and "smoothness" in text and report is not None
