"""Synchronized batch norm with 2 and 3 CPU processes (gloo): equal to single-process batch norm
on the concatenated batch; faults end in a clear error, not a hang."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import batchnorm
from tests.distributed import workers

ROOT = Path(__file__).resolve().parents[2]


def launch(target, world: int, tmp_path: Path, *extra, timeout: float = 120.0) -> None:
    context = multiprocessing.get_context("spawn")
    rendezvous = tmp_path / "rendezvous"
    processes = [
        context.Process(target=target, args=(rank, world, str(rendezvous), str(tmp_path), *extra))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "a rank hung"
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]


def _single_process(scenario: str, world: int):
    module = batchnorm.BatchNorm2d(workers.CHANNELS, momentum=0.3)
    workers.initial_state(module)
    steps = []
    for step in range(workers.STEPS):
        sizes, x, g = workers.global_data(scenario, world, step)
        x = x.clone().requires_grad_(True)
        module.weight.grad = module.bias.grad = None
        y = module(x)
        y.backward(g)
        steps.append({"sizes": sizes, "y": y.detach(), "dx": x.grad, "dw": module.weight.grad,
                      "db": module.bias.grad})
    module.eval()
    eval_out = module(workers.global_data(scenario, world, 99)[1]).detach()
    return steps, module, eval_out


@pytest.mark.parametrize("world", [2, 3])
def test_equals_batch_norm_on_the_concatenated_batch(world, tmp_path):
    launch(workers.equality_worker, world, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    close = {"rtol": 1e-5, "atol": 1e-5}
    for scenario in workers.SCENARIOS:
        steps, reference, eval_out = _single_process(scenario, world)
        for step, expected in enumerate(steps):
            per_rank = [ranks[r][scenario]["steps"][step] for r in range(world)]
            y = torch.cat([s["y"] for s in per_rank])
            dx = torch.cat([s["dx"] for s in per_rank])
            torch.testing.assert_close(y, expected["y"], **close)
            torch.testing.assert_close(dx, expected["dx"], **close)
            assert all(torch.isfinite(s["dx"]).all() for s in per_rank)
            # Parameter gradients stay per rank; their sum is the whole-batch gradient.
            torch.testing.assert_close(sum(s["dw"] for s in per_rank), expected["dw"], **close)
            torch.testing.assert_close(sum(s["db"] for s in per_rank), expected["db"], **close)
        for r in range(world):
            result = ranks[r][scenario]
            torch.testing.assert_close(result["running_mean"], reference.running_mean, **close)
            torch.testing.assert_close(result["running_var"], reference.running_var, **close)
            assert result["tracked"] == workers.STEPS
            torch.testing.assert_close(result["eval"], eval_out, **close)


def test_without_a_process_group_it_is_plain_batch_norm():
    assert not torch.distributed.is_initialized()
    sync, plain = batchnorm.SyncBatchNorm(3), batchnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(sync(x), plain(x))
    assert torch.equal(sync.running_var, plain.running_var)


@pytest.mark.parametrize("fault", ["die", "stall"])
def test_a_lost_rank_gives_a_clear_error_within_the_timeout(fault, tmp_path):
    launch(workers.fault_worker, 2, tmp_path, fault, timeout=60.0)
    outcome = torch.load(tmp_path / "outcome.pt")
    assert outcome["error"] == "SyncTimeoutError", outcome
    assert "a rank may have died or stalled" in outcome["message"]
    assert outcome["elapsed"] < 15.0
    assert outcome["checkpoint_keys"] == sorted(batchnorm.SyncBatchNorm(3).state_dict())


def test_convert_to_sync_keeps_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.SyncBatchNorm(4), batchnorm.BatchNorm2d(4))
    model(torch.randn(4, 3, 5, 5))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batchnorm.convert(model, sync=True, timeout=5.0)
    assert all(type(model[i]) is batchnorm.SyncBatchNorm for i in (1, 2, 3))
    assert model[1].timeout == 5.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # a synchronized batch norm cannot say which plain form it came from: left as it is, and
    # convert says which layers and why
    with pytest.warns(UserWarning, match="does not record whether it was 1d, 2d or 3d"):
        batchnorm.convert(model, to="batchnorm")
    assert all(type(model[i]) is batchnorm.SyncBatchNorm for i in (1, 2, 3))


def test_torchrun_example_runs(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", str(ROOT / "examples" / "ddp_digits.py"),
        "--steps", "6", "--checkpoint", str(tmp_path / "model.pt"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "test accuracy" in result.stdout
    state = torch.load(tmp_path / "model.pt")
    assert any(key.endswith("running_var") for key in state)


def test_a_bad_buffer_is_refused_on_every_rank_before_the_collective(tmp_path):
    launch(workers.bad_argument_worker, 2, tmp_path)
    outcomes = [torch.load(tmp_path / f"bad{rank}.pt") for rank in range(2)]
    for outcome in outcomes:
        assert outcome["error"] == "BatchNormValueError", outcome
        assert "running_var of shape (3,)" in outcome["message"]
        assert "got shape (2,)" in outcome["message"]
        assert outcome["runtime_error"] and outcome["unchanged"]
        assert outcome["elapsed"] < 5.0  # refused at once, not after a collective's timeout
    # afterwards the ranks synchronize as usual: batch norm of the concatenated batch
    _, x, _ = workers.global_data("even", 2, 0)
    module = batchnorm.BatchNorm2d(workers.CHANNELS)
    workers.initial_state(module)
    expected = module(x[:8])
    torch.testing.assert_close(torch.cat([o["after"] for o in outcomes]), expected,
                               rtol=1e-5, atol=1e-5)


def test_a_drop_in_for_torch_sync_batch_norm():
    """Not a subclass (DistributedDataParallel refuses torch's SyncBatchNorm on the CPU), but the
    same constructor order, attributes and state dict, and torch's converter takes our
    modules."""
    ours = batchnorm.SyncBatchNorm(3, 1e-3, 0.2, True, True, "group", "cpu", torch.float64,
                                   bias=False)
    theirs = torch.nn.SyncBatchNorm(3, 1e-3, 0.2, True, True, "group", "cpu", torch.float64,
                                    bias=False)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                 "process_group"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.weight.dtype == torch.float64 and ours.timeout is None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours).replace("batchnorm.", "") == repr(theirs)
    model = torch.nn.Sequential(batchnorm.BatchNorm2d(3), batchnorm.SyncBatchNorm(3, bias=False))
    model(torch.randn(4, 3, 2, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    assert all(type(m) is torch.nn.SyncBatchNorm for m in converted)
    assert converted[0].process_group == "group" and converted[1].bias is None
    for key, value in converted.state_dict().items():
        assert torch.equal(value, state[key]), key
    batchnorm.convert(converted, sync=True)
    assert all(type(m) is batchnorm.SyncBatchNorm for m in converted)
    assert converted[0].process_group == "group"


def test_masked_sync_equals_masked_batch_norm_on_the_concatenated_batch(tmp_path):
    """Three ranks, padded sequences with NaN in the padding, uneven batches, a rank without
    samples and a rank without a valid position: outputs (valid positions), input gradients,
    summed parameter gradients and running statistics as one masked batch norm over the whole
    batch. Then a global batch of one value."""
    world = 3
    launch(workers.masked_worker, world, tmp_path)
    ranks = [torch.load(tmp_path / f"masked{r}.pt") for r in range(world)]
    close = {"rtol": 1e-5, "atol": 1e-5}
    for scenario in workers.MASKED_SCENARIOS:
        reference = batchnorm.BatchNorm1d(workers.CHANNELS, momentum=0.3)
        workers.initial_state(reference)
        for step in range(workers.STEPS):
            _, x, mask, g = workers.masked_global_data(scenario, step)
            x = x.clone().requires_grad_(True)
            reference.weight.grad = reference.bias.grad = None
            y = reference(x, mask)
            y.backward(g)
            per_rank = [ranks[r][scenario]["steps"][step] for r in range(world)]
            valid = mask[:, None].expand_as(y)
            torch.testing.assert_close(torch.cat([s["y"] for s in per_rank])[valid],
                                       y.detach()[valid], **close)
            torch.testing.assert_close(torch.cat([s["dx"] for s in per_rank]), x.grad, **close)
            assert torch.isfinite(torch.cat([s["dx"] for s in per_rank])).all()
            torch.testing.assert_close(sum(s["dw"] for s in per_rank), reference.weight.grad,
                                       **close)
            torch.testing.assert_close(sum(s["db"] for s in per_rank), reference.bias.grad,
                                       **close)
        for r in range(world):
            result = ranks[r][scenario]
            torch.testing.assert_close(result["running_mean"], reference.running_mean, **close)
            torch.testing.assert_close(result["running_var"], reference.running_var, **close)
            assert result["tracked"] == workers.STEPS
    # The same processes then ran a global batch of one value per channel (rank 0 holds it):
    # refused on every rank by default; with single_sample="running", normalized with the
    # running statistics (as in eval) on every rank, which stay as they are.
    for rank in range(world):
        outcome = ranks[rank]["single value"]
        name, message = outcome["error"]
        assert name == "BatchNormValueError"
        assert "more than 1 value per channel across all ranks" in message and "got 1" in message
        assert outcome["unchanged"]
        torch.testing.assert_close(outcome["y"], outcome["eval"])
        assert outcome["y"].shape == outcome["x"].shape


@pytest.mark.parametrize("world", [2, 3])
def test_precise_bn_under_ddp_gives_every_rank_the_statistics_of_all_data(world, tmp_path):
    """Different data per rank (and none on the third rank): every rank ends with identical
    buffers, equal to one process that saw every rank's batches."""
    launch(workers.precise_worker, world, tmp_path)
    ranks = [torch.load(tmp_path / f"precise{r}.pt") for r in range(world)]
    single = workers.precise_model()
    everything = [b for r in range(world) for b in workers.precise_batches(world, r)]
    assert batchnorm.precise_bn(single, everything, progress=False) == len(everything)
    for outcome in ranks:
        assert outcome["used"] == len(everything)
        for key, value in outcome["state"].items():
            assert torch.equal(value, ranks[0]["state"][key]), key  # identical on every rank
            torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-6, atol=1e-7)
    # and the ranks' own data alone would have given other statistics
    alone = workers.precise_model()
    batchnorm.precise_bn(alone, workers.precise_batches(world, 0), progress=False)
    assert not torch.allclose(alone[1].running_mean, single[1].running_mean)
