"""C10, recurrent: the three LSTMs are one cell with three normalizations (the plain one is
exactly torch's LSTM; LayerNorm's statistics are per example and, as Ba et al.'s, cover the input
projection too; the BN-LSTM beyond its trained steps reuses the last step's statistics); the
longer test signals are the same shapes stretched; each rule gives the four verdicts on
synthetic runs; the experiment runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from batchnorm.lab.data.splits import load_splits
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.experiments.recurrent import (
    EXPERIMENT,
    RecurrentConfig,
    evaluation_lengths,
    findings,
    late_validation_accuracy,
    run,
)
from batchnorm.lab.experiments.sequence_models import (
    SequenceClassifier,
    as_steps,
    sequence_lstm,
    stretch,
)
from batchnorm.lab.stats import decode_correct, encode_correct
from batchnorm.lab.suite import run_suite
from batchnorm.lab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from batchnorm.variants.recurrent import RecurrentBatchNorm
from tests.lab.conftest import TINY_DATA
from tests.lab.synthetic import SEEDS, jitter, outcome, result

EXPECTED = {"supported": SUPPORTED, "flipped": NOT_SUPPORTED, "not supported": NOT_SUPPORTED,
            "inconclusive": INCONCLUSIVE}
CONFIG = RecurrentConfig()
TINY = RecurrentConfig(hidden_size=4, tuning_rates=(0.1,), steps=4, eval_every=2,
                       batch_size=16, length_factors=(1.0, 1.5))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train in milliseconds on one thread; on a loaded machine, threads that wait
    for each other make them take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- The models --------------------------------------------------------------------------------


def test_signals_split_into_steps_of_consecutive_values():
    signals = torch.arange(16.0).reshape(2, 8)
    steps = as_steps(signals, 4)
    assert steps.shape == (2, 2, 4)
    assert steps[1, 0].tolist() == [4.0, 5.0, 6.0, 7.0]  # step 1 of the first signal
    assert steps[0, 1].tolist() == [8.0, 9.0, 10.0, 11.0]  # step 0 of the second
    with pytest.raises(ValueError, match="does not split"):
        as_steps(signals, 3)


def test_stretching_keeps_the_shape_and_the_ends():
    ramp = torch.arange(40.0).reshape(1, 40)
    longer = stretch(ramp, 79)
    assert longer.shape == (1, 79)
    assert torch.allclose(longer, torch.arange(79.0).reshape(1, 79) / 2)  # the same ramp, slower
    same = stretch(ramp, 40)
    assert torch.equal(same, ramp) and same.data_ptr() != ramp.data_ptr()


def test_the_test_lengths_are_whole_steps():
    assert evaluation_lengths(CONFIG, 40) == [40, 60, 80]
    assert evaluation_lengths(CONFIG, 64) == [64, 96, 128]
    # 1.3 x 10 steps rounds to 13 steps of 4 values
    four = RecurrentConfig(values_per_step=4, length_factors=(1.0, 1.3))
    assert evaluation_lengths(four, 40) == [40, 52]


def _modules(model: nn.Module, kind: type) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, kind)]


def test_the_three_lstms_differ_only_in_their_norms():
    for norm in ("none", "batch", "layer"):
        torch.manual_seed(0)
        lstm = sequence_lstm(norm, 4, 8, 10, gamma_init=0.1)
        cell = lstm.cells[0]
        assert cell.bias[8:16].eq(1).all()  # the forget gate opens, for every model
        batch, layer = _modules(lstm, RecurrentBatchNorm), _modules(lstm, nn.LayerNorm)
        if norm == "batch":
            assert len(batch) == 3 and not layer
            assert all(module.weight.eq(0.1).all() for module in batch)
        elif norm == "layer":
            # Ba et al.'s three: both projections separately, and the cell state
            assert not batch and len(layer) == 3
            assert [cell.bn_ih.norm.normalized_shape, cell.bn_hh.norm.normalized_shape,
                    cell.bn_c.norm.normalized_shape] == [(32,), (32,), (8,)]
            assert all(module.weight.eq(1.0).all() for module in layer)
        else:
            assert not batch and not layer
    with pytest.raises(ValueError, match="unknown norm"):
        sequence_lstm("group", 4, 8, 10, gamma_init=0.1)


def test_the_plain_lstm_is_torchs_lstm():
    torch.manual_seed(0)
    ours = sequence_lstm("none", 4, 8, 10, gamma_init=0.1)
    cell = ours.cells[0]
    reference = nn.LSTM(4, 8)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(cell.weight_ih)
        reference.weight_hh_l0.copy_(cell.weight_hh)
        reference.bias_ih_l0.copy_(cell.bias)
        reference.bias_hh_l0.zero_()
    x = torch.randn(10, 5, 4)
    expected, (hidden, _) = reference(x)
    output, (ours_hidden, _) = ours(x)
    assert torch.allclose(output, expected, atol=1e-6)
    assert torch.allclose(ours_hidden, hidden, atol=1e-6)


def test_the_input_layer_is_shared_by_every_step_and_feeds_the_lstm():
    torch.manual_seed(0)
    model = SequenceClassifier(10, "none", hidden_size=8, max_steps=10, values_per_step=4,
                               embedding_size=6)
    assert model.embedding.in_features == 4 and model.lstm.cells[0].input_size == 6
    signals = torch.randn(3, 40)
    expected = model.classifier(
        model.lstm(torch.tanh(model.embedding(as_steps(signals, 4))))[1][0][-1])
    assert torch.allclose(model(signals), expected)


def test_both_normalized_lstms_ignore_the_scale_of_the_input_projection():
    """Ba et al.'s LN-LSTM normalizes W_x x itself, as the BN-LSTM does; the plain LSTM does
    not, so scaling W_x changes its answer."""
    signals = torch.randn(6, 40)
    for norm, invariant in (("layer", True), ("batch", True), ("none", False)):
        torch.manual_seed(0)
        model = SequenceClassifier(10, norm, hidden_size=8, max_steps=10, values_per_step=4)
        before = model(signals)
        with torch.no_grad():
            model.lstm.cells[0].weight_ih.mul_(3.0)
        assert torch.allclose(model(signals), before, atol=1e-4) == invariant, norm


def test_layer_norm_statistics_are_per_example_and_batch_norms_are_not():
    torch.manual_seed(0)
    signals = torch.randn(6, 40)
    for norm, independent in (("layer", True), ("batch", False)):
        model = SequenceClassifier(10, norm, hidden_size=8, max_steps=10, values_per_step=4)
        model.train()
        whole = model(signals)[:3]
        alone = model(signals[:3])  # the same examples with other companions
        assert torch.allclose(whole, alone, atol=1e-5) == independent, norm


def test_bn_lstm_beyond_its_trained_steps_reuses_the_last_steps_statistics():
    torch.manual_seed(0)
    short = SequenceClassifier(10, "batch", hidden_size=8, max_steps=2, values_per_step=4)
    long = SequenceClassifier(10, "batch", hidden_size=8, max_steps=3, values_per_step=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in _modules(short, RecurrentBatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape,
                                                  generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape,
                                                generator=generator) + 0.5)
        state = short.state_dict()
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var")):
                state[key] = torch.cat([value, value[-1:]])  # step 2 gets step 1's statistics
            elif key.endswith("num_batches_tracked"):
                state[key] = torch.cat([value, value[-1:]])
        long.load_state_dict(state)
    short.eval()
    long.eval()
    signals = torch.randn(5, 12)  # three steps of four values
    assert torch.allclose(short(signals), long(signals), atol=1e-6)
    # and the last row matters: with other statistics at step 2, the answer changes
    with torch.no_grad():
        for module in _modules(long, RecurrentBatchNorm):
            module.running_mean[2] += 1.0
    assert not torch.allclose(short(signals), long(signals), atol=1e-3)


# ---- Findings on synthetic runs ----------------------------------------------------------------


def recurrent_runs(trained_case: str = "not supported", longer_case: str = "not supported",
                   steps_case: str = "not supported"):
    """Runs at 40 values (trained, 20 steps of two) and 80 (stretched, 40 steps). Thresholds on
    1000 test examples: 4.5 pp for LayerNorm minus batch norm at the trained length, 6.4 pp for
    the difference of losses; for the ratio of steps to the target, 1 + 2 x 25 / (the faster
    network's median steps), 1.5x at 100 steps."""
    gap, gap_scatter = {"supported": (15.0, 2.0), "flipped": (-15.0, 2.0),
                        "not supported": (0.0, 2.0), "inconclusive": (4.5, 8.0)}[trained_case]
    # (BN's loss, LN's loss) from 40 to 80 values, in pp
    losses, loss_scatter = {"supported": ((30.0, 5.0), 2.0), "flipped": ((5.0, 30.0), 2.0),
                            "not supported": ((10.0, 10.0), 2.0),
                            "inconclusive": ((16.4, 10.0), 8.0)}[longer_case]
    # (BN's steps, LN's steps) to the target; the scatter is BN's
    reached, steps_scatter = {"supported": ((300, 100), 20), "flipped": ((100, 300), 20),
                              "not supported": ((100, 100), 20),
                              "inconclusive": ((150, 100), 120)}[steps_case]
    runs = []
    for seed in SEEDS:
        trained = {"batch": 0.55, "layer": 0.55 + (gap + jitter(seed, gap_scatter)) / 100,
                   "none": 0.5}
        loss = {"batch": (losses[0] + jitter(seed, loss_scatter)) / 100,
                "layer": losses[1] / 100, "none": 0.1}
        to_target = {"batch": reached[0] + jitter(seed, steps_scatter), "layer": reached[1],
                     "none": 90}
        for salt, norm in enumerate(("none", "batch", "layer")):
            longest = trained[norm] - loss[norm]
            correct = [outcome(trained[norm], seed, salt), outcome(longest, seed, salt + 10)]
            runs.append({
                "params": {"norm": norm, "seed": seed, "learning_rate": 0.1},
                "result": result(
                    trained[norm], seed, salt=salt, steps=[0, 90, 180],
                    validation_accuracy=[0.1, 0.3, trained[norm]],
                    steps_to_target=to_target[norm],
                    trained_length=40, lengths=[40, 80],
                    length_accuracy=[trained[norm], longest],
                    length_correct=[encode_correct(value) for value in correct],
                ),
            })
    return runs


CASES = ["supported", "flipped", "not supported", "inconclusive"]


@pytest.mark.parametrize("case", CASES)
def test_rule_at_the_trained_length(case):
    first, _, _ = findings(CONFIG, recurrent_runs(trained_case=case))
    assert first.claim == "C10" and "trained length" in first.measure
    assert first.threshold == pytest.approx(4.5)
    assert first.verdict == EXPECTED[case], first


@pytest.mark.parametrize("case", CASES)
def test_rule_on_steps_to_the_target(case):
    _, steps, _ = findings(CONFIG, recurrent_runs(steps_case=case))
    assert steps.claim == "C10" and steps.split == "validation"
    assert "steps of the BN-LSTM to 50.0% validation accuracy" in steps.measure
    # the faster network's median: 100 steps, but 106 when the BN-LSTM is the faster (flipped)
    assert steps.threshold == pytest.approx(1.47 if case == "flipped" else 1.5)
    assert steps.verdict == EXPECTED[case], steps


def test_a_run_that_never_reaches_the_target_counts_as_the_whole_budget():
    runs = recurrent_runs(steps_case="not supported")
    for run_ in runs:
        if run_["params"]["norm"] == "batch":
            run_["result"]["steps_to_target"] = None
    _, steps, _ = findings(CONFIG, runs)
    assert steps.per_seed == pytest.approx([CONFIG.steps / 100] * 5)
    assert "counts as 400 steps" in steps.measure
    notes = EXPERIMENT.analyze(CONFIG, runs).notes
    assert any("5 BN-LSTM or LN-LSTM run(s) never reached the target" in note for note in notes)


@pytest.mark.parametrize("case", CASES)
def test_rule_on_longer_sequences(case):
    _, _, longer = findings(CONFIG, recurrent_runs(longer_case=case))
    assert longer.claim == "C10" and "from the trained 20 time steps to 40" in longer.measure
    assert longer.threshold == pytest.approx(6.4)
    assert longer.verdict == EXPECTED[case], longer


def test_the_longer_sequence_measure_reads_the_longest_length():
    runs = recurrent_runs(longer_case="supported")
    for run_ in runs:  # an extra, middle length that says the opposite must not matter
        saved = run_["result"]
        middle = outcome(saved["test_accuracy"], 0, 99)
        saved["lengths"].insert(1, 60)
        saved["length_correct"].insert(1, encode_correct(middle))
        saved["length_accuracy"].insert(1, float(middle.mean()))
    _, _, longer = findings(CONFIG, runs)
    assert longer.verdict == SUPPORTED and longer.effect == pytest.approx(25.0, abs=1.0)


def test_the_tuning_score_averages_the_last_three_checkpoints():
    swinging = {"validation_accuracy": [0.1, 0.9, 0.5, 0.8, 0.6]}
    assert late_validation_accuracy(CONFIG, swinging) == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    assert late_validation_accuracy(CONFIG, {"validation_accuracy": [0.1, 0.4]}) == (
        pytest.approx(0.25))
    assert EXPERIMENT.tuning.choose(CONFIG, [
        {"params": {"norm": "layer", "seed": 1000, "learning_rate": rate},
         "result": {"validation_accuracy": curve}}
        for rate, curve in ((0.1, [0.1, 0.8, 0.8, 0.5]), (0.3, [0.1, 0.6, 0.6, 0.7]))
    ]) == {"learning_rate": {"layer": 0.1}}  # 0.70 vs 0.63; the last checkpoint alone: 0.3


def test_no_findings_without_both_norms_and_no_length_finding_without_longer_signals():
    runs = [run_ for run_ in recurrent_runs() if run_["params"]["norm"] != "layer"]
    assert findings(RecurrentConfig(norms=("none", "batch")), runs) == []
    runs = recurrent_runs()
    for run_ in runs:
        run_["result"]["lengths"] = [40]
    assert len(findings(CONFIG, runs)) == 2


# ---- Runs --------------------------------------------------------------------------------------


def test_a_run_scores_every_length_and_the_trained_one_is_the_test_record():
    data = load_splits(TINY_DATA)  # 64 values: 16 steps of 4, tested also at 24
    for norm in ("none", "batch", "layer"):
        saved = run(TINY, {"norm": norm, "seed": 0, "learning_rate": 0.1}, data, "cpu")
        assert saved["trained_length"] == 64 and saved["lengths"] == [64, 96]
        assert saved["length_correct"][0] == saved["test_correct"]
        assert saved["length_accuracy"][0] == pytest.approx(saved["test_accuracy"])
        longer = decode_correct(saved["length_correct"][1], saved["test_size"])
        assert longer.mean() == pytest.approx(saved["length_accuracy"][1])
        assert saved["steps"] == [0, 2, 4] and len(saved["validation_accuracy"]) == 3


def test_the_experiment_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, EXPERIMENT.name, EXPERIMENT)
    config = RecurrentConfig(norms=("batch", "layer"), hidden_size=4, tuning_rates=(0.1,),
                             steps=4, eval_every=2, batch_size=16, length_factors=(1.0, 1.5))
    run_suite({EXPERIMENT.name: config}, (0, 1, 2), data=TINY_DATA, out=tmp_path,
              store=tmp_path / "runs", jobs=1, quick=False, progress=False)
    saved = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*")]
    assert len(saved) == 2 + 3 * 2  # one tuning seed even in the default form, then 3 x 2
    report = (tmp_path / "report.md").read_text()
    assert "C10" in report and "BN-LSTM" in report


def test_the_analysis_tabulates_steps_to_target_and_accuracy_by_length():
    analysis = EXPERIMENT.analyze(CONFIG, recurrent_runs(trained_case="supported"))
    (table,) = analysis.tables
    rows = {row[0]: row for row in table.rows}
    # none stays at 50%, and reaches the target at step 90 in every seed
    assert rows["LSTM (no norm)"][2:] == ["5/5", "90", "50.0%", "40.0%"]
    assert table.headers[-2:] == ["20 steps", "40 steps"]
    (figure,) = analysis.figures
    curves, lengths = figure.panels
    assert [series.x for series in lengths.series] == [[20, 40]] * 3
    assert curves.series[-1].label == "target"
    (baseline,) = analysis.baselines
    assert baseline.model == "GRU" and baseline.accuracy == pytest.approx(50.0)
