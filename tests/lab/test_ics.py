"""The ics experiment (C3 by gradient change and noisy BN): its findings on synthetic runs with
known answers, and its measurements on hand-built models whose answer is known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchnorm import BatchNorm1d
from batchnorm.lab.data.splits import load_splits
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.ics import (
    EXPERIMENT,
    IcsConfig,
    NoisyBatchNorm,
    add_noise,
    build_model,
    drift,
    expected_noise_scale,
    gradient_change,
    hidden_blocks,
    input_statistics,
    measured_step,
    movement,
    resample_noise,
)
from batchnorm.lab.models import MLP
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tests.lab.synthetic import SEEDS, jitter, result

CASES = ["supported", "flipped", "not supported", "inconclusive"]
EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}


@pytest.fixture(autouse=True)
def one_thread():
    """The nets here are tiny: more torch threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- Findings on synthetic runs ------------------------------------------------------------


def synthetic_runs(ics_ratio: float = 1.0, accuracy_gain: float = 0.0,
                   noisy_drift: float = 3.0) -> list[dict]:
    """No BN's relative gradient change is ``ics_ratio`` times BN's (per seed, up to a jitter);
    BN's test accuracy is ``accuracy_gain`` pp above noisy BN's; noisy BN's drift is
    ``noisy_drift`` times BN's."""
    runs = []
    for seed in SEEDS:
        spread = 1 + jitter(seed, 0.1)
        batch_change = 0.2
        changes = {"none": batch_change * ics_ratio * spread, "batch": batch_change,
                   "noisy": batch_change}
        accuracies = {"none": 0.6, "batch": 0.7 + jitter(seed, 0.02),
                      "noisy": 0.7 - accuracy_gain / 100 - jitter(seed, 0.01)}
        drifts = {"none": 0.9, "batch": 0.3, "noisy": 0.3 * noisy_drift * spread}
        for salt, norm in enumerate(("none", "batch", "noisy")):
            fields = {"relative_change": [[changes[norm]] * 4] * 3, "drift": drifts[norm]}
            runs.append({"params": {"norm": norm, "seed": seed, "learning_rate": 0.1},
                         "result": result(accuracies[norm], seed, salt, **fields)})
    return runs


def verdicts(runs: list[dict]) -> tuple[str, str]:
    gradient, accuracy = EXPERIMENT.findings(IcsConfig(), runs)
    assert gradient.claim == accuracy.claim == "C3"
    return gradient.verdict, accuracy.verdict


@pytest.mark.parametrize("case", CASES)
def test_gradient_change_rule(case):
    # No BN / BN, threshold 1.5x; the inconclusive case sits on it with a 10% spread over seeds.
    ratio = {"supported": 3.0, "flipped": 1 / 3, "not supported": 1.0, "inconclusive": 1.5}[case]
    gradient, _ = verdicts(synthetic_runs(ics_ratio=ratio))
    assert gradient == EXPECTED[case]


@pytest.mark.parametrize("case", CASES)
def test_noisy_accuracy_rule(case):
    # BN minus noisy BN; threshold 2 * sqrt(2) * 50 / sqrt(1000) = 4.5 pp.
    gain = {"supported": 15.0, "flipped": -15.0, "not supported": 0.0, "inconclusive": 4.5}[case]
    _, accuracy = verdicts(synthetic_runs(accuracy_gain=gain))
    assert accuracy == EXPECTED[case]


def test_noisy_accuracy_says_nothing_unless_noisy_inputs_drift_more():
    runs = synthetic_runs(accuracy_gain=0.0, noisy_drift=1.0)  # no more drift than BN
    _, finding = EXPERIMENT.findings(IcsConfig(), runs)
    assert finding.verdict == INCONCLUSIVE and "did not drift" in finding.degenerate
    _, finding = EXPERIMENT.findings(IcsConfig(), synthetic_runs(accuracy_gain=0.0))
    assert finding.verdict == NOT_SUPPORTED and not finding.degenerate


def test_analysis_has_tables_figure_and_drift_note():
    runs = [{**run, "result": {**run["result"], "measured_steps": [1, 80, 160],
                               "raw_change": [[0.1] * 4] * 3, "cosine": [[0.9] * 4] * 3,
                               "movement": [0.2, 0.1], "steps": [0, 800],
                               "validation_accuracy": [0.1, 0.6]}}
            for run in synthetic_runs(ics_ratio=2.0)]
    # A dead layer (||G|| = 0) has no relative change at one step: it is left out of the means.
    runs[1]["result"]["relative_change"] = [[None, 0.2, 0.2, 0.2], [0.2] * 4, [0.2] * 4]
    analysis = EXPERIMENT.analyze(IcsConfig(), runs)
    assert len(analysis.findings) == 2 and len(analysis.tables) == 2
    assert analysis.tables[0].rows[1][1] == "0.2" and analysis.tables[1].rows[1][1] == "0.2"
    (figure,) = analysis.figures
    assert len(figure.panels) == 4 and "5 seeds" in figure.caption
    assert "noisy BN / BN 3.0" in analysis.notes[0] and "no BN / BN 3.0" in analysis.notes[0]


# ---- The measurements, on hand-built models ------------------------------------------------


def test_gradient_change_of_known_vectors():
    relative, raw, cosine = gradient_change(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
    assert raw == pytest.approx(5.0) and relative == pytest.approx(5 / 3)
    assert cosine == pytest.approx(0.0, abs=1e-7)


class MoveOne:
    """An optimizer stand-in whose step changes one parameter of one hidden block."""

    def __init__(self, model, block: int, what: str, amount: float = 0.5):
        self.model, self.block, self.what, self.amount = model, block, what, amount

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        getattr(hidden_blocks(self.model)[self.block][0], self.what).add_(self.amount)


def tiny_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(16, 6, generator=generator), torch.arange(16) % 3


def mlp(norm: str, depth: int = 4) -> MLP:
    torch.manual_seed(0)
    return MLP(6, 3, depth=depth, width=8, norm=norm)


@pytest.mark.parametrize("norm", ["none", "batch", "noisy"])
def test_no_update_means_no_change(norm):
    model = mlp("batch" if norm == "noisy" else norm)
    if norm == "noisy":
        add_noise(model)
        resample_noise(model, torch.Generator().manual_seed(1))
    inputs, labels = tiny_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    _, changes = measured_step(model, optimizer, inputs, labels)
    assert len(changes) == 3  # hidden layers 2, 3 and 4
    for relative, raw, cosine in changes:  # the same noise in G and G' (redrawn, this fails)
        assert raw < 1e-6 and relative < 1e-6 and cosine == pytest.approx(1.0, abs=1e-6)


def test_only_layers_below_count():
    # Moving hidden layer 2's own weights changes nothing for layer 2 (its own step is not
    # shift), but changes the gradients of layers 3 and 4 above it.
    model = mlp("none")
    inputs, labels = tiny_batch()
    _, changes = measured_step(model, MoveOne(model, 1, "weight"), inputs, labels)
    assert changes[0][1] == 0.0 and changes[1][1] > 1e-3 and changes[2][1] > 1e-3
    # Moving the top hidden layer changes no measured layer's gradient.
    model = mlp("none")
    _, changes = measured_step(model, MoveOne(model, 3, "weight"), inputs, labels)
    assert all(raw == 0.0 for _, raw, _ in changes)


def test_batch_norm_removes_a_shift_of_the_layer_below():
    # Shifting layer 1's pre-activations by a constant moves every layer above without BN; BN
    # subtracts the batch mean, so with BN no gradient above changes.
    inputs, labels = tiny_batch()
    plain = mlp("none")
    _, changes = measured_step(plain, MoveOne(plain, 0, "bias"), inputs, labels)
    assert all(relative > 1e-3 for relative, _, _ in changes)
    normalized = mlp("batch")
    _, changes = measured_step(normalized, MoveOne(normalized, 0, "bias"), inputs, labels)
    assert all(relative < 1e-5 for relative, _, _ in changes)


def test_measured_step_takes_the_step():
    model = mlp("none")
    inputs, labels = tiny_batch()
    reference = mlp("none")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # the second step carries momentum
        measured_step(model, optimizer, inputs, labels)
        reference_optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(inputs), labels).backward()
        reference_optimizer.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_noisy_batch_norm_draws_santurkar_noise_and_uses_its_expectation_in_eval():
    torch.manual_seed(0)
    norm = NoisyBatchNorm(BatchNorm1d(50), 50)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(32, 50)
    shifts, scales = [], []
    for _ in range(200):
        norm.resample(generator)
        shifts.append(norm.noise_shift.clone())
        scales.append(norm.noise_scale.clone())
    shifts, scales = torch.stack(shifts), torch.stack(scales)
    assert shifts.abs().max() <= 0.6 and (shifts.amax(1) - shifts.amin(1)).max() <= 0.2
    step_shift = shifts.mean(dim=1)  # the step-wide mean, near U(-0.5, 0.5)'s draw
    assert step_shift.min() < -0.35 and step_shift.max() > 0.35
    assert scales.mean().item() == pytest.approx(1.125, abs=0.01)
    assert scales.std(dim=1).mean().item() == pytest.approx(0.1, abs=0.02)
    norm.train()
    first, second = norm(x), norm(x)
    assert torch.equal(first, second)  # fixed within a step
    assert torch.allclose(first, norm.norm(x) * norm.noise_scale + norm.noise_shift)
    norm.eval()
    assert expected_noise_scale() == pytest.approx(1.125)
    assert torch.allclose(norm(x), norm.norm(x) * 1.125)


def test_add_noise_wraps_our_batch_norm():
    model = add_noise(mlp("batch"))
    norms = [block[1] for block in hidden_blocks(model)]
    assert all(isinstance(n, NoisyBatchNorm) and isinstance(n.norm, BatchNorm1d) for n in norms)


def test_input_statistics_leave_the_model_alone():
    model = mlp("batch", depth=3)
    inputs, _ = tiny_batch()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    recorded = input_statistics(model, inputs)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in state.items())
    # Layer 2's input is the first block's output in training mode (batch statistics).
    expected = model.hidden[0](inputs)
    assert len(recorded) == 2
    assert torch.allclose(recorded[0][0], expected.mean(0), atol=1e-6)
    assert torch.allclose(recorded[0][1], expected.std(0), atol=1e-6)


def test_drift_and_movement_of_known_statistics():
    # Three measurements of four units; the last is dead (no spread) and left out.
    means = torch.tensor([[0.0, 5.0, 0.0, 0.0], [1.0, 5.0, 0.0, 0.0], [3.0, 5.0, 0.0, 0.0]])
    stds = torch.tensor([[2.0, 1.0, 4.0, 0.0], [2.0, 2.0, 4.0, 0.0], [2.0, 3.0, 4.0, 0.0]])
    # Unit drifts: 3 / 2, 2 / 2 and 0: median 1.
    assert drift(means, stds) == pytest.approx(1.0)
    # Step 1: 0.5, 0.5, 0 (median 0.5); step 2: 1, 0.5, 0 (median 0.5).
    assert movement(means, stds) == pytest.approx([0.5, 0.5])
    assert math.isnan(drift(torch.zeros(3, 2), torch.zeros(3, 2)))


# ---- Tuning and runs -----------------------------------------------------------------------


def test_one_rate_for_all_chosen_on_the_plain_network():
    config = IcsConfig()
    tuning = EXPERIMENT.tuning.plan(config, False)
    assert {p["norm"] for p in tuning} == {"none"} and all(not p["measure"] for p in tuning)
    runs = [{"params": p, "result": {"validation_accuracy": [
        0.1, 0.6 if p["learning_rate"] == 0.1 else 0.4]}} for p in tuning]
    choice = EXPERIMENT.tuning.choose(config, runs)
    for norm in config.norms:
        params = EXPERIMENT.tuning.apply(choice, {"norm": norm, "seed": 0})
        assert params["learning_rate"] == 0.1


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def test_a_run_records_every_measurement(digits):
    config = IcsConfig(steps=20, measure_every=10, eval_every=10, depth=3, width=16,
                       batch_size=32)
    first = EXPERIMENT.run(config, {"norm": "noisy", "seed": 0, "learning_rate": 0.05},
                           digits, "cpu")
    assert first["measured_steps"] == [1, 10, 20]
    assert all(len(step) == 2 for step in first["relative_change"])  # hidden layers 2 and 3
    assert len(first["movement"]) == 2 and first["drift"] > 0
    assert json.loads(json.dumps(first)) == first
    again = EXPERIMENT.run(config, {"norm": "noisy", "seed": 0, "learning_rate": 0.05},
                           digits, "cpu")
    assert again == first  # the noise has its own seeded generator
    quiet = EXPERIMENT.run(config, {"norm": "none", "seed": 0, "learning_rate": 0.05,
                                    "measure": False}, digits, "cpu")
    assert quiet["measured_steps"] == [] and quiet["drift"] is None


def test_the_noisy_model_is_built_from_our_batch_norm(digits):
    model = build_model(IcsConfig(depth=3, width=8), digits, "noisy")
    assert all(isinstance(block[1], NoisyBatchNorm) for block in hidden_blocks(model))
    assert not any(isinstance(m, NoisyBatchNorm) for m in build_model(
        IcsConfig(depth=3, width=8), digits, "batch").modules())


@pytest.mark.slow
def test_suite_runs_and_reports_ics(monkeypatch, tmp_path):
    from batchnorm.lab.suite import run_suite

    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    config = IcsConfig(tuning_rates=(0.05,), steps=20, measure_every=10, eval_every=10,
                       depth=3, width=16, batch_size=32)
    report = run_suite({"ics": config}, (0, 1, 2), data="digits", out=tmp_path,
                       store=tmp_path / "runs", jobs=1, quick=True, progress=False)
    assert [finding.claim for finding in report.findings] == ["C3", "C3"]
    text = (tmp_path / "report.md").read_text()
    assert "gradient change" in text and "noisy BN" in text
