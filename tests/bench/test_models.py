"""batchnorm.bench.models: whole-model timing, ours against torch, on a small model of the test's
own (the zoo's models are timed by ``batchnorm bench --suite models``; their numbers are not
checked here)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchnorm.bench import models
from batchnorm.cli import main
from batchnorm.modules.batchnorm import BatchNorm2d


class _NormThenAct(nn.BatchNorm2d):
    """A batch norm holding its drop layer and activation as children, as timm's
    ``BatchNormAct2d`` does."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), _NormThenAct(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )


def test_measure_times_four_variants_and_reports_ratios():
    x = torch.randn(2, 3, 6, 6)
    # convert leaves the unknown subclass as it is (and says so): the row counts it apart
    with pytest.warns(UserWarning, match="left these batch norms unchanged"):
        row = models.measure("tiny", _tiny(), x, rounds=2)
    assert (row.name, row.input_size) == ("tiny", (2, 3, 6, 6))
    assert (row.batch_norms, row.converted) == (2, 1)
    for result in (row.train, row.eval):
        assert result.torch_s > 0 and result.ours_s > 0 and result.no_batch_norm_s > 0
        assert result.ours_vs_torch.low <= result.ours_vs_torch.median <= result.ours_vs_torch.high
        assert result.control.median > 0
    table = models.format_rows([row])
    assert "| tiny | 2x3x6x6 | 2 (1) | train |" in table
    assert "| tiny | 2x3x6x6 | 2 (1) | eval |" in table
    assert "A/A control" in table and "BN time ours/torch" in table
    # two rounds: no interval, so no verdict
    assert "| not judged |" in table


def test_summarize_computes_per_round_ratios():
    times = {"torch": [1.0, 2.0, 1.0], "torch (copy)": [1.1, 2.0, 0.9],
             "ours": [0.9, 1.6, 1.2], "no batch norm": [0.5, 1.0, 0.5]}
    result = models.summarize(times)
    assert result.ours_vs_torch.median == pytest.approx(0.9)
    assert (result.ours_vs_torch.low, result.ours_vs_torch.high) == pytest.approx((0.8, 1.2))
    assert result.control.median == pytest.approx(1.0)
    assert result.torch_share.median == pytest.approx(0.5)
    # batch norm's own time: (0.4, 0.6, 0.7) over (0.5, 1.0, 0.5)
    assert result.batch_norm_time.median == pytest.approx(0.8)
    assert result.batch_norm_time.high == pytest.approx(1.4)


def _ratio(values):
    return models.Ratio.of(list(values))


def test_ratio_carries_the_rank_interval_of_its_median():
    ratio = _ratio([0.9 + 0.01 * i for i in range(21)])
    assert (ratio.interval_low, ratio.interval_high) == pytest.approx((0.95, 1.05))
    assert "[0.95, 1.05]" in str(ratio)
    assert math.isnan(_ratio([1.0, 1.1]).interval_low) and "[" not in str(_ratio([1.0, 1.1]))


def test_verdict_follows_the_rule_fixed_before_the_run():
    level_control = _ratio([0.97 + 0.003 * i for i in range(21)])  # interval holds 1
    slower = _ratio([1.02 + 0.01 * i for i in range(21)])
    faster = _ratio([0.80 + 0.01 * i for i in range(21)])
    level = _ratio([0.95 + 0.005 * i for i in range(21)])
    assert models.verdict(slower, level_control) == models.SLOWER
    assert models.verdict(faster, level_control) == models.FASTER
    assert models.verdict(level, level_control) == models.LEVEL
    # an A/A control that sees two identical models differ: the run is not judged
    assert models.verdict(slower, _ratio([1.05 + 0.01 * i for i in range(21)])) == (
        models.NOT_JUDGED)
    # too few rounds for an interval
    assert models.verdict(_ratio([1.5, 1.6, 1.7]), level_control) == models.NOT_JUDGED


def test_batch_norm_time_without_a_positive_torch_time_is_nan():
    times = {"torch": [1.0], "torch (copy)": [1.0], "ours": [1.0], "no batch norm": [1.2]}
    assert math.isnan(models.summarize(times).batch_norm_time.median)


def test_without_batch_norm_keeps_a_fused_layers_activation():
    model = models.without_batch_norm(_tiny())
    assert isinstance(model[1], nn.Identity)
    assert isinstance(model[4], nn.Sequential) and isinstance(model[4][1], nn.ReLU)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 10)


def test_batch_norm_calls_records_every_call():
    model = _tiny()
    model[1] = BatchNorm2d(8)  # ours too
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    calls = models.batch_norm_calls(model, x)
    assert [(c.name, c.size) for c in calls] == [("1", (2, 8, 6, 6)), ("4", (2, 8, 6, 6))]
    assert all(c.channels_last for c in calls)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hooks are removed


@pytest.mark.filterwarnings("ignore:convert. left these batch norms unchanged")
def test_cli_runs_the_suite(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "QUICK", [models.ModelSpec("tiny.net", 2, 6)])
    monkeypatch.setattr(models, "build", lambda spec: _tiny())
    out = tmp_path / "models.md"
    assert main(["bench", "--suite", "models", "--quick", "--rounds", "1",
                 "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "| tiny.net | 2x3x6x6 | 2 (1) | train |" in text
    assert "outside 0.1-2 s" in text  # a tiny model's step is far below the intended range
    assert "train ours/torch" in capsys.readouterr().out


def test_specs_name_their_zoo():
    names = [spec.name for spec in models.MODELS]
    assert len(names) == 8 and {spec.zoo for spec in models.MODELS} == {"torchvision", "timm"}
    with pytest.raises(ValueError, match="unknown model zoo"):
        models.build(models.ModelSpec("nowhere.net", 1, 8))


def test_zoo_loader_imports_torchvision_and_timm():
    from batchnorm.bench import zoo

    try:
        torchvision, timm = zoo.load_torchvision(), zoo.load_timm()
    except ImportError as error:  # the zoo extra is not installed
        pytest.skip(str(error))
    assert hasattr(torchvision.models, "resnet18") and hasattr(timm, "create_model")
    message = "RuntimeError: operator torchvision::nms does not exist"
    assert zoo._missing_operator(RuntimeError(message)) == "nms"
    assert zoo._missing_operator(RuntimeError("something else")) is None


def test_distinct_shapes_counts_calls_per_size(monkeypatch):
    monkeypatch.setattr(models, "build", lambda spec: _tiny())
    specs = [models.ModelSpec("tiny.a", 2, 6), models.ModelSpec("tiny.b", 2, 6)]
    shapes = models.distinct_shapes(specs)
    assert [(s.name, s.size, s.calls) for s in shapes] == [("tiny.a.1", (2, 8, 6, 6), 4)]


def test_model_shapes_are_in_the_layer_bench():
    from batchnorm.bench import shapes

    sizes = {s.size for s in shapes.MODEL_SHAPES}
    assert len(sizes) == len(shapes.MODEL_SHAPES)  # distinct
    assert (4, 1024, 3, 3) in sizes  # densenet121's last concatenation at 96x96
    assert sum(s.calls for s in shapes.MODEL_SHAPES) == 20 + 53 + 34 + 49 + 121 + 20 + 49 + 34
    assert shapes.SHAPE_SETS["all"][-2:] == shapes.SMALL


def test_per_call_times_time_each_batch_norm_inside_the_model():
    model = _tiny()
    model[4] = nn.BatchNorm2d(8)  # a second plain batch norm, of the first one's size
    x = torch.randn(2, 3, 6, 6)
    ticks = iter(range(10**6))
    rows = models.per_call_times("tiny", model, x, rounds=3, clock=lambda: float(next(ticks)))
    assert {(r.mode, r.size, r.layers) for r in rows} == {
        ("train", (2, 8, 6, 6), 2), ("backward", (2, 8, 6, 6), 2), ("eval", (2, 8, 6, 6), 2)}
    for row in rows:  # a fake clock that ticks once per reading: every interval is positive
        assert row.torch_us > 0 and row.ours_us > 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    table = models.format_call_times(rows)
    assert "| tiny | train | 2x8x6x6 | 2 |" in table and "all calls of a forward" in table
    assert "| tiny | backward | 2x8x6x6 | 2 |" in table
    assert "| tiny | train+backward | **all calls of a training step** | 2 |" in table


def test_backward_span_covers_every_node_a_layer_records():
    """The backward of a layer is timed from the node of its output to the earliest node its
    forward recorded: one node for a batch norm Function, two for batch norm then an
    activation; nothing before the layer's input, and no parameter's accumulator."""
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5)
    h = conv(x)
    y = bn(h)
    assert models._backward_span(y, h) == (y.grad_fn, y.grad_fn)
    z = torch.relu(bn(h))
    first, last = models._backward_span(z, h)
    assert first is z.grad_fn and last is z.grad_fn.next_functions[0][0]
    assert type(last).__name__.startswith("NativeBatchNorm")
    with torch.no_grad():
        assert models._backward_span(bn(h), h) is None



def test_cli_per_call(monkeypatch, capsys):
    monkeypatch.setattr(models, "QUICK", [models.ModelSpec("tiny.net", 2, 6)])
    monkeypatch.setattr(models, "build", lambda spec: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)))
    assert main(["bench", "--suite", "models", "--quick", "--per-call", "--rounds", "1"]) == 0
    assert "| tiny.net | eval | 2x4x4x4 | 1 |" in capsys.readouterr().out
