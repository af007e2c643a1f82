"""Per-step cost of SyncBatchNorm against local batch norm, with 2 processes on gloo.

Both ranks run the same schedule: rounds of K training steps of a small CNN with local batch
norm and K with synchronized batch norm, the order alternating by round, with a barrier before
every sample so that both ranks time the same thing. Reported: the median per-round ratio and
the median extra time per step.
"""

from __future__ import annotations

import datetime
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SyncRow:
    input_size: tuple[int, ...]
    layers: int
    local_ms: float
    sync_ms: float
    median_ratio: float


def _model(sync: bool) -> torch.nn.Module:
    from torch import nn

    import batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
    )
    return batchnorm.convert(model, sync=sync) if sync else batchnorm.convert(model)


def _worker(rank: int, world: int, rendezvous: str, out: str, rounds: int, steps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    x = torch.randn(16, 3, 32, 32)
    models = {"local": _model(False), "sync": _model(True)}

    def sample(name: str) -> float:
        model = models[name]
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            model(x).square().mean().backward()
        return (time.perf_counter() - start) / steps

    for name in models:  # warm-up
        sample(name)
    ratios, local, synced = [], [], []
    for index in range(rounds):
        order = ("local", "sync") if index % 2 == 0 else ("sync", "local")
        times = {name: sample(name) for name in order}
        ratios.append(times["sync"] / times["local"])
        local.append(times["local"])
        synced.append(times["sync"])
    if rank == 0:
        torch.save({"ratios": ratios, "local": local, "sync": synced}, out)
    dist.barrier()
    dist.destroy_process_group()


def run_sync(rounds: int = 15, steps: int = 5) -> SyncRow:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.pt")
        rendezvous = str(Path(folder) / "rendezvous")
        processes = [
            context.Process(target=_worker, args=(r, 2, rendezvous, out, rounds, steps))
            for r in range(2)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(600)
        if any(p.exitcode != 0 for p in processes):
            raise RuntimeError(f"sync benchmark: a rank failed: {[p.exitcode for p in processes]}")
        result = torch.load(out)
    return SyncRow(
        (16, 3, 32, 32), 3,
        statistics.median(result["local"]) * 1e3,
        statistics.median(result["sync"]) * 1e3,
        statistics.median(result["ratios"]),
    )


def format_sync(row: SyncRow) -> str:
    return (
        "| model | per-rank input | BN layers | local BN step (ms) | SyncBatchNorm step (ms) | "
        "extra per step (ms) | sync/local (median) |\n|---|---|---:|---:|---:|---:|---:|\n"
        f"| 3x (conv 3x3 + BN + ReLU), 32 channels | {'x'.join(map(str, row.input_size))} | "
        f"{row.layers} | {row.local_ms:.2f} | {row.sync_ms:.2f} | "
        f"{row.sync_ms - row.local_ms:.2f} | {row.median_ratio:.2f} |"
    )
