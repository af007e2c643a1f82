"""The benchmark's plumbing on tiny shapes (its numbers are checked by running it, not here)."""

from __future__ import annotations

import pytest
import torch

from batchnorm import select_backend
from batchnorm.bench import runner
from batchnorm.bench.shapes import Shape
from batchnorm.cli import main


@pytest.mark.parametrize("mode", runner.ALL_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_run_case_reports_both_ratios(mode, layout):
    shape = Shape("tiny", (4, 3, 5, 5))
    row = runner.run_case(shape, mode, layout, rounds=2)
    assert row.comparison.median_ratio > 0 and row.floor.median_ratio > 0
    assert row.torch_floor.median_ratio > 0 and row.noop.median_ratio > 0
    # The row names the backend the dispatcher chose for that very input.
    expected = select_backend(runner._make_input(shape, layout, torch.float32, seed=0)).name
    assert row.backend == expected
    table = runner.format_table([row])
    assert "ours/floor" in table and "torch/floor" in table
    assert f"| {mode} | {layout} | {expected} |" in table
    assert "no-op/torch" in table and table.splitlines()[-1].count("|") == 13


def test_noop_layer_has_the_layer_interface_and_no_arithmetic():
    """The no-op layer takes and returns what a batch norm does (output like the input,
    gradients for input, weight and bias) and records no operation but its own Function."""
    layer = runner.NoOpLayer(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and out.grad_fn.name().endswith("_NoArithmeticBackward")
    grads = torch.autograd.grad(out, [x, layer.weight, layer.bias], torch.ones_like(out))
    assert [g.shape for g in grads] == [x.shape, (3,), (3,)]
    with torch.no_grad():
        assert layer(x).shape == x.shape


def test_first_call_latency_runs_in_a_new_process():
    first = runner.first_call_latency()
    assert first.backend == "cpu"
    assert first.first_s > 0 and first.second_s > 0


def test_cli_writes_the_table(tmp_path, monkeypatch):
    real_run_case = runner.run_case

    def tiny_case(shape, mode, layout, rounds):
        size = (2, 3, 4, 4) if len(shape.size) == 4 else (6, 3)
        return real_run_case(Shape(shape.name, size), mode, layout, rounds=1)

    monkeypatch.setattr(runner, "run_case", tiny_case)
    out = tmp_path / "table.md"
    assert main(["bench", "--quick", "--mode", "train_relu", "--shapes", "mlp",
                 "--rounds", "1", "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "first training step in a new process" in text
    assert "| mlp.small | 6x3 | train_relu | contiguous | cpu |" in text


def test_fold_suite_reports_a_ratio():
    from batchnorm.bench.fold import format_fold, run_fold

    row = run_fold(batch=2, resolution=8, rounds=2)
    assert row.folded == 9 and row.comparison.median_ratio > 0
    assert "folded/unfolded" in format_fold(row)


def test_sync_suite_runs_two_processes():
    from batchnorm.bench.sync import format_sync, run_sync

    row = run_sync(rounds=1, steps=1)
    assert row.local_ms > 0 and row.sync_ms > 0
    assert "SyncBatchNorm step" in format_sync(row)


def test_machine_description_names_the_allocator_tunables(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert "GLIBC_TUNABLES" not in runner.machine_description()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert runner.machine_description().endswith("GLIBC_TUNABLES=glibc.malloc.trim_threshold=1")


def test_cli_modes_are_the_runners():
    """The command's --mode choices name exactly the modes the runner knows."""
    from batchnorm.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    mode = next(action for action in bench._actions if action.dest == "mode")
    assert tuple(mode.choices) == runner.ALL_MODES


def test_memory_floor_moves_what_a_batch_norm_must():
    """Training: 2 clones (new output and input gradient) and 2 copies into existing tensors;
    eval: 1 clone. Counted by the operations the floor calls."""
    x, grad = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    floor = runner.memory_floor(x, grad, "train")
    with torch.profiler.profile() as profile:
        floor()
    names = [event.name for event in profile.events()]
    assert names.count("aten::clone") == 2 and names.count("aten::copy_") == 4  # clone copies
    assert runner.memory_floor(x, grad, "eval") == x.clone


def test_overhead_suite_times_the_module_and_each_hop():
    from batchnorm.bench.overhead import MODES, format_overhead, run_overhead

    rows = run_overhead([Shape("tiny", (8, 4))], rounds=1)
    assert list(rows[0].modules) == list(MODES)
    assert all(c.median_ratio > 0 for c in rows[0].modules.values())
    assert rows[0].hops["ours module call"] > 0 and rows[0].hops["torch module call"] > 0
    assert any(name.startswith("backend forward") for name in rows[0].hops)
    table = format_overhead(rows)
    assert "| tiny | 8x4 | train forward |" in table and "| validation (_validate) |" in table
