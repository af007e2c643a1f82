"""C7, gradients: the gradient-norm measurement on hand-built nets with a known answer, the fitted
growth, and each finding on synthetic runs whose answer is known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.base import config_to_dict
from batchnorm.lab.experiments.deep_models import NETS, build_net, hidden_linears
from batchnorm.lab.experiments.gradients import (
    EXPERIMENT,
    YANG_GROWTH,
    GradientsConfig,
    end_to_end_change,
    growth_factor,
    layer_gradient_norms,
    profile_at,
)
from batchnorm.lab.models import MLP
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS, jitter, result

CONFIG = GradientsConfig(depth=20, steps=20, eval_every=10)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: torch's intra-op threads only slow them down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def geometric_profile(growth: float, depth: int, scale: float = 1.0) -> list[float]:
    """Norms that grow by ``growth`` per layer toward the input (layer 1 the largest)."""
    return [scale * growth ** (depth - layer) for layer in range(1, depth + 1)]


# ---- Measurement -------------------------------------------------------------------------------


def test_growth_and_end_to_end_change_of_an_exact_profile():
    norms = geometric_profile(1.3, 10)
    assert growth_factor(norms) == pytest.approx(1.3)
    # Fitted over layers 2 to 10: eight steps of 1.3, whichever way they go.
    assert end_to_end_change(norms) == pytest.approx(1.3**8)
    assert end_to_end_change(list(reversed(norms))) == pytest.approx(1.3**8)
    assert growth_factor(list(reversed(norms))) == pytest.approx(1 / 1.3)
    # The first layer (it reads the data) does not enter the fit.
    assert growth_factor([1e6, *norms[1:]]) == pytest.approx(1.3)
    assert math.isnan(growth_factor([1.0, 2.0, math.inf, 3.0]))


def test_layer_gradient_norms_of_a_hand_built_net():
    """A ReLU MLP whose layers are scaled identities a_l * I, fed positive inputs, is linear; the
    weight gradient of layer l is (prod of all a_k / a_l) times one matrix, so its norm is
    proportional to 1 / a_l. With a_l = 2**l the norm halves from each layer to the next."""
    torch.manual_seed(0)
    depth, width = 6, 5
    model = MLP(width, 3, depth=depth, width=width, norm="none")
    for layer, linear in enumerate(hidden_linears(model), start=1):
        with torch.no_grad():
            linear.weight.copy_(2.0**layer * torch.eye(width))
            linear.bias.zero_()
    inputs = torch.rand(8, width) + 0.1
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    norms = layer_gradient_norms(model, inputs, labels)
    assert len(norms) == depth
    for earlier, later in zip(norms, norms[1:], strict=False):
        assert earlier / later == pytest.approx(2.0, rel=1e-5)
    assert growth_factor(norms) == pytest.approx(2.0, rel=1e-5)
    assert all(parameter.grad is None for parameter in model.parameters())  # measured on a copy


def test_measuring_changes_neither_the_net_nor_its_running_statistics():
    torch.manual_seed(0)
    model = build_net("batch", 6, 3, depth=4, width=8)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    layer_gradient_norms(model, torch.randn(16, 6), torch.randint(0, 3, (16,)))
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(parameter.grad is None for parameter in model.parameters())


def test_bn_gradient_grows_toward_the_input_at_initialization():
    """Yang et al.'s explosion, on random data: BN about 1.2 per layer, the plain net about 1."""
    torch.manual_seed(0)
    inputs, labels = torch.randn(128, 20), torch.randint(0, 10, (128,))
    growth = {net: growth_factor(layer_gradient_norms(build_net(net, 20, 10, 24, 64),
                                                      inputs, labels))
              for net in ("plain", "batch", "batch-residual")}
    assert 1.15 < growth["batch"] < 1.27
    assert 0.95 < growth["plain"] < 1.05 and 0.97 < growth["batch-residual"] < 1.08


def test_a_profile_counts_after_training_only_when_the_run_finished():
    norms = geometric_profile(1.1, 10)
    done = {"profiles": [{"step": 0, "gradient_norms": norms},
                         {"step": 20, "gradient_norms": norms}]}
    stopped = {"profiles": [{"step": 0, "gradient_norms": norms},
                            {"step": 10, "gradient_norms": norms}]}
    broken = {"profiles": [{"step": 0, "gradient_norms": norms},
                           {"step": 20, "gradient_norms": [math.nan] * 10}]}
    assert profile_at(done, "final", 20) == norms and profile_at(done, "init", 20) == norms
    assert profile_at(stopped, "final", 20) is None
    assert profile_at(broken, "final", 20) is None


# ---- Findings on synthetic runs ----------------------------------------------------------------

# Per-seed ratios of the plain net's end-to-end change to BN's (the threshold is 4).
FLOW = {
    "supported": lambda seed: 12.0 * (1 + jitter(seed, 0.4)),
    "flipped": lambda seed: 1 / (12.0 * (1 + jitter(seed, 0.4))),
    "not supported": lambda seed: 1.0 + jitter(seed, 0.4),
    "inconclusive": lambda seed: (1.0, 16.0, 2.0, 32.0, 4.0)[seed],
}
# Per-seed BN growth at initialization over Yang's 1.21: which of the two sides agree.
YANG = {
    "agrees": lambda seed: 1.0 + jitter(seed, 0.01),
    "too large": lambda seed: 1.2 + jitter(seed, 0.01),
    "too small": lambda seed: 1 / 1.2 + jitter(seed, 0.01),
    "straddles": lambda seed: (1.0, 1.1, 0.98, 1.12, 1.03)[seed],
}


def synthetic_runs(init_flow: str, final_flow: str = "not supported",
                   yang: str = "agrees") -> list[dict]:
    fitted = CONFIG.depth - 2  # steps of the fitted line

    def profiles(seed: int, net: str) -> list[dict]:
        # BN's gradient grows by about 1.2 per layer both times (18 steps: about 30x end to
        # end), so that the plain net's change, that times the ratio, stays above 1.
        growth = {"init": YANG_GROWTH * YANG[yang](seed), "final": 1.2 + jitter(seed, 0.02)}
        if net == "plain":
            ratios = {"init": FLOW[init_flow](seed), "final": FLOW[final_flow](seed)}
            changes = {when: ratios[when] * value**fitted for when, value in growth.items()}
            assert min(changes.values()) > 1
            growth = {when: change ** (1 / fitted) for when, change in changes.items()}
        return [{"step": 0, "gradient_norms": geometric_profile(growth["init"], CONFIG.depth)},
                {"step": CONFIG.steps,
                 "gradient_norms": geometric_profile(growth["final"], CONFIG.depth)}]

    return [
        {"params": {"net": net, "seed": seed},
         "result": result(0.5, seed, profiles=profiles(seed, net),
                          validation_accuracy=[0.1, 0.5])}
        for seed in SEEDS for net in CONFIG.nets
    ]


def verdicts(runs) -> dict[str, str]:
    found = EXPERIMENT.findings(CONFIG, runs)
    keys = ["init", "final", "yang upper", "yang lower"]
    assert len(found) == 4 and all(f.claim == "C7" for f in found)
    return dict(zip(keys, (finding.verdict for finding in found), strict=True))


EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_flow_rule_at_initialization(case):
    assert verdicts(synthetic_runs(case))["init"] == EXPECTED[case]


@pytest.mark.parametrize("case", list(EXPECTED))
def test_flow_rule_after_training(case):
    found = verdicts(synthetic_runs("not supported", final_flow=case))
    assert found["final"] == EXPECTED[case] and found["init"] == NOT_SUPPORTED


@pytest.mark.parametrize(("case", "upper", "lower"), [
    ("agrees", SUPPORTED, SUPPORTED),
    ("too large", NOT_SUPPORTED, SUPPORTED),
    ("too small", SUPPORTED, NOT_SUPPORTED),
    ("straddles", INCONCLUSIVE, SUPPORTED),
])
def test_yang_rules(case, upper, lower):
    found = verdicts(synthetic_runs("supported", yang=case))
    assert (found["yang upper"], found["yang lower"]) == (upper, lower)


def test_the_measured_ratio_is_the_one_built_in():
    (init, *_) = EXPERIMENT.findings(CONFIG, synthetic_runs("supported"))
    assert init.per_seed == pytest.approx([FLOW["supported"](seed) for seed in SEEDS])


def test_a_run_that_did_not_finish_drops_out_of_the_after_training_finding():
    runs = synthetic_runs("supported", final_flow="supported")
    for run in runs:
        if run["params"] == {"net": "batch", "seed": 0}:
            run["result"]["profiles"][-1]["step"] = 10  # stopped early: no final profile
    found = EXPERIMENT.findings(CONFIG, runs)
    assert found[0].seeds == 5 and found[1].seeds == 4


# ---- The whole experiment, tiny ------------------------------------------------------------


def test_a_tiny_suite_reports_every_finding_and_the_figure(tmp_path, monkeypatch):
    from batchnorm.lab.suite import run_suite

    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    config = GradientsConfig(depth=4, width=8, batch_size=16, steps=4, eval_every=2)
    run_suite({EXPERIMENT.name: config}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, quick=True, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert report.count("| [C7](#c7) |") == 4
    assert "gradients.png" in report and "Yang" in report


@pytest.mark.parametrize("quick", [False, True])
def test_config_round_trips_and_plan(quick):
    config = EXPERIMENT.config(quick)
    restored = EXPERIMENT.config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert restored == config and hash(restored) == hash(config)
    plan = EXPERIMENT.plan(config, [0, 1])
    assert len(plan) == len({json.dumps(params, sort_keys=True) for params in plan})
    assert {params["net"] for params in plan} == set(NETS)
