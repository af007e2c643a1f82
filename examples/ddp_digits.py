"""Data-parallel training with synchronized batch norm on the digits bundled with scikit-learn.

Run on the CPU with two processes:

    torchrun --nproc_per_node 2 examples/ddp_digits.py

Each process trains on its own share of every batch; ``batchnorm.SyncBatchNorm`` computes the
batch statistics over the whole global batch, and DistributedDataParallel averages the
gradients. Rank 0 evaluates and writes an atomic checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import batchnorm


def digits(seed: int = 0):
    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=seed
    )
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # noqa: E731
    return (as_tensor(train_x), torch.tensor(train_y), as_tensor(test_x), torch.tensor(test_y))


def build_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    return batchnorm.convert(model, sync=True, timeout=60.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--checkpoint", default="runs/ddp_digits.pt")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = digits()
    model = DistributedDataParallel(build_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    per_rank = args.batch_size // world
    generator = torch.Generator().manual_seed(1)  # the same global order on every rank
    for step in range(args.steps):
        order = torch.randperm(len(train_x), generator=generator)[: args.batch_size]
        mine = order[rank * per_rank : (rank + 1) * per_rank]
        loss = nn.functional.cross_entropy(model(train_x[mine]), train_y[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    if rank == 0:
        # The bare module: a DDP forward would wait for the other ranks (buffer broadcast).
        network = model.module.eval()
        with torch.no_grad():
            accuracy = (network(test_x).argmax(1) == test_y).float().mean().item()
        print(f"test accuracy {accuracy:.4f} after {args.steps} steps on {world} processes")
        os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint)), exist_ok=True)
        batchnorm.save_checkpoint(model.module.state_dict(), args.checkpoint)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
