"""Code run inside the spawned processes of the distributed tests (gloo on the CPU)."""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

import batchnorm

CHANNELS = 3
SPATIAL = (2, 2)
# Per-rank batch sizes for each scenario, by world size.
SCENARIOS = {
    "even": {2: [4, 4], 3: [3, 3, 3]},
    "uneven": {2: [1, 6], 3: [5, 1, 3]},
    "empty": {2: [0, 5], 3: [4, 0, 3]},
}
STEPS = 2


def global_data(scenario: str, world: int, step: int):
    """The whole batch of one step, identical on every rank and in the parent."""
    sizes = SCENARIOS[scenario][world]
    generator = torch.Generator().manual_seed(1000 * step + world)
    total = sum(sizes)
    x = torch.randn(total, CHANNELS, *SPATIAL, generator=generator) * 2 + 1
    g = torch.randn(total, CHANNELS, *SPATIAL, generator=generator)
    return sizes, x, g


def initial_state(module: torch.nn.Module) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        module.bias.copy_(torch.linspace(-1.0, 1.0, CHANNELS))


def _init(rank: int, world: int, rendezvous: str, timeout_s: float = 60.0) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def equality_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world, rendezvous)
    results = {}
    for scenario in SCENARIOS:
        module = batchnorm.SyncBatchNorm(CHANNELS, momentum=0.3)
        initial_state(module)
        steps = []
        for step in range(STEPS):
            sizes, x, g = global_data(scenario, world, step)
            start = sum(sizes[:rank])
            local = x[start : start + sizes[rank]].clone().requires_grad_(True)
            module.weight.grad = module.bias.grad = None
            y = module(local)
            y.backward(g[start : start + sizes[rank]])
            steps.append({
                "y": y.detach(), "dx": local.grad.detach().clone(),
                "dw": module.weight.grad.clone(), "db": module.bias.grad.clone(),
            })
        module.eval()
        eval_x = global_data(scenario, world, 99)[1]
        results[scenario] = {
            "steps": steps,
            "running_mean": module.running_mean.clone(),
            "running_var": module.running_var.clone(),
            "tracked": int(module.num_batches_tracked),
            "eval": module(eval_x).detach(),  # eval: plain batch norm, no collective
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def fault_worker(rank: int, world: int, rendezvous: str, out_dir: str, fault: str) -> None:
    """Rank 1 dies (or stalls) before the step; rank 0 must fail with a clear error."""
    torch.set_num_threads(1)
    _init(rank, world, rendezvous, timeout_s=120.0)
    module = batchnorm.SyncBatchNorm(CHANNELS, timeout=3.0)
    checkpoint = os.path.join(out_dir, "checkpoint.pt")
    if rank == 0:
        batchnorm.save_checkpoint(module.state_dict(), checkpoint)
    dist.barrier()
    if rank == 1:
        if fault == "die":
            os._exit(0)
        time.sleep(20)  # stalls past rank 0's timeout
        os._exit(0)
    started = time.monotonic()
    outcome = {"error": None}
    try:
        module(torch.randn(4, CHANNELS, *SPATIAL))
    except Exception as error:  # noqa: BLE001 - the test inspects what came
        outcome = {"error": type(error).__name__, "message": str(error)}
    outcome["elapsed"] = time.monotonic() - started
    # A checkpoint written earlier must still be whole; saving again goes through atomically.
    outcome["checkpoint_keys"] = sorted(torch.load(checkpoint))
    batchnorm.save_checkpoint(module.state_dict(), checkpoint)
    torch.save(outcome, os.path.join(out_dir, "outcome.pt"))
    os._exit(0)


def bad_argument_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """Every rank holds a running_var of the wrong size: each must refuse it before the
    collective (so no rank waits for another), change nothing, and still synchronize after."""
    torch.set_num_threads(1)
    _init(rank, world, rendezvous)
    module = batchnorm.SyncBatchNorm(CHANNELS, timeout=20.0)
    initial_state(module)
    module.running_var = torch.ones(CHANNELS - 1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    outcome = {}
    started = time.monotonic()
    try:
        module(torch.randn(4, CHANNELS, *SPATIAL))
    except Exception as error:  # noqa: BLE001 - the test inspects what came
        outcome = {"error": type(error).__name__, "message": str(error),
                   "runtime_error": isinstance(error, RuntimeError)}
    outcome["elapsed"] = time.monotonic() - started
    outcome["unchanged"] = all(
        torch.equal(value, before[key]) for key, value in module.state_dict().items()
    )
    module.running_var = torch.ones(CHANNELS)
    _, x, _ = global_data("even", world, 0)
    local = x[rank * 4 : (rank + 1) * 4]
    outcome["after"] = module(local).detach()  # the ranks still make the same collectives
    torch.save(outcome, os.path.join(out_dir, f"bad{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# -- masked synchronized batch norm -------------------------------------------------------------

LENGTH = 6
# Per-rank batch sizes of (N, C, L) sequences; in "nothing valid on rank 0" that rank's
# sequences are all padding.
MASKED_SCENARIOS = {
    "uneven": [1, 4, 2],
    "empty rank": [3, 0, 4],
    "nothing valid on rank 0": [2, 3, 2],
}


def masked_global_data(scenario: str, step: int):
    """The whole padded batch of one step: input with NaN in the padding (it must be selected
    out), mask, and an output gradient that is zero on padding (padded outputs are unused)."""
    sizes = MASKED_SCENARIOS[scenario]
    generator = torch.Generator().manual_seed(100 * step + len(scenario))
    total = sum(sizes)
    x = torch.randn(total, CHANNELS, LENGTH, generator=generator) * 2 + 1
    lengths = torch.randint(1, LENGTH + 1, (total,), generator=generator)
    if scenario == "nothing valid on rank 0":
        lengths[: sizes[0]] = 0
    mask = torch.arange(LENGTH) < lengths[:, None]
    x = torch.where(mask[:, None], x, float("nan"))
    g = torch.randn(total, CHANNELS, LENGTH, generator=generator)
    g = torch.where(mask[:, None], g, 0.0)
    return sizes, x, mask, g


def masked_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world, rendezvous)
    results = {}
    for scenario, sizes in MASKED_SCENARIOS.items():
        module = batchnorm.SyncBatchNorm(CHANNELS, momentum=0.3)
        initial_state(module)
        steps = []
        for step in range(STEPS):
            _, x, mask, g = masked_global_data(scenario, step)
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            local = x[rows].clone().requires_grad_(True)
            module.weight.grad = module.bias.grad = None
            y = module(local, mask[rows])
            y.backward(g[rows])
            steps.append({"y": y.detach(), "dx": local.grad.clone(),
                          "dw": module.weight.grad.clone(), "db": module.bias.grad.clone()})
        results[scenario] = {"steps": steps, "running_mean": module.running_mean.clone(),
                             "running_var": module.running_var.clone(),
                             "tracked": int(module.num_batches_tracked)}
    results["single value"] = _single_value_across_ranks(rank)
    torch.save(results, os.path.join(out_dir, f"masked{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _single_value_across_ranks(rank: int) -> dict:
    """One value per channel in the whole global batch (rank 0 holds it, the others nothing):
    refused on every rank by default; with single_sample="running", normalized with the running
    statistics on every rank, which stay as they are."""
    module = batchnorm.SyncBatchNorm(CHANNELS)
    initial_state(module)
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        module.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    x = torch.randn(1 if rank == 0 else 0, CHANNELS, generator=torch.Generator().manual_seed(5))
    outcome = {"x": x}
    try:
        module(x)
    except Exception as error:  # noqa: BLE001 - the test inspects what came
        outcome["error"] = (type(error).__name__, str(error))
    module.single_sample = "running"
    before = {k: v.clone() for k, v in module.state_dict().items()}
    outcome["y"] = module(x).detach()
    outcome["unchanged"] = all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    module.eval()
    outcome["eval"] = module(x).detach()
    return outcome


# -- precise_bn under torch.distributed ---------------------------------------------------------

PRECISE_BATCH_SIZES = {2: [[7, 3], [12, 5, 4]], 3: [[7, 3], [12, 5, 4], []]}


def precise_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 4), batchnorm.BatchNorm1d(4, momentum=0.3), torch.nn.ReLU(),
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
    )


def precise_batches(world: int, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s batches: different data, sizes and numbers per rank (none on the third)."""
    generator = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(n, 5, generator=generator) * (rank + 1) + rank
            for n in PRECISE_BATCH_SIZES[world][rank]]


def precise_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world, rendezvous)
    model = precise_model()
    used = batchnorm.precise_bn(model, precise_batches(world, rank), progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"used": used, "state": state}, os.path.join(out_dir, f"precise{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
