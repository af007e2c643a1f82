"""Memory kept for the backward: in-place activated batch norm against torch's ``BatchNorm2d``
followed by ``LeakyReLU``, on a ResNet-style model.

What is measured: the bytes of every distinct storage that autograd keeps from one training
forward until the backward (``torch.autograd.graph.saved_tensors_hooks`` sees each saved tensor;
storages shared by several saves count once), parameters excluded, since they do not grow with
the batch. That is the memory that limits the batch size of training. It grows linearly with the
batch: two batch sizes give the bytes per sample and the fixed part, from which the largest batch
within a budget follows; that batch is then measured, and one more, to confirm it.

Not measured: the transient peak inside a layer's forward or backward (a temporary the size of
one activation), which is the same for every form here.

Run: ``python -m batchnorm.bench.memory [--budget-mib 512] [--markdown FILE]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from batchnorm.modules.norm_act import BatchNormAct2d

FORMS = {
    "torch": "torch BatchNorm2d + LeakyReLU()",
    "torch, inplace activation": "torch BatchNorm2d + LeakyReLU(inplace=True)",
    "ours, in-place": "BatchNormAct2d(activation='leaky_relu', inplace=True)",
}
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # ResNet-18's widths and strides, 2 blocks each
IMAGE = (3, 32, 32)


def _norm_act(channels: int, form: str, activation: bool) -> nn.Module:
    """Batch norm, then leaky ReLU when ``activation``, in the given form."""
    if form == "ours, in-place":
        kind = "leaky_relu" if activation else "identity"
        return BatchNormAct2d(channels, activation=kind, inplace=True)
    layers = [nn.BatchNorm2d(channels)]
    if activation:
        layers.append(nn.LeakyReLU(inplace=form == "torch, inplace activation"))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """ResNet's basic block: conv, norm + act, conv, norm, add the shortcut, act."""

    def __init__(self, inputs: int, outputs: int, stride: int, form: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = _norm_act(outputs, form, activation=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = _norm_act(outputs, form, activation=False)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                          _norm_act(outputs, form, activation=False))
        self.in_place_sum = form != "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.norm2(self.conv2(self.norm1(self.conv1(x)))) + self.shortcut(x)
        return F.leaky_relu(total, inplace=self.in_place_sum)


def resnet(form: str, classes: int = 10) -> nn.Module:
    """A ResNet-18-style network for 32x32 images with leaky ReLU, its norms in ``form``."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {sorted(FORMS)}")
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(IMAGE[0], 64, 3, 1, 1, bias=False),
                               _norm_act(64, form, activation=True)]
    inputs = 64
    for width, stride in STAGES:
        layers += [_Block(inputs, width, stride, form), _Block(width, width, 1, form)]
        inputs = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes)]
    return nn.Sequential(*layers)


def saved_bytes(model: nn.Module, batch: int) -> int:
    """Bytes of the distinct non-parameter storages saved for the backward by one training
    forward of ``model`` on a batch of ``batch`` images."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    x = torch.randn(batch, *IMAGE, generator=torch.Generator().manual_seed(batch))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(x)
    del output
    return sum(storages.values())


@dataclass(frozen=True)
class MemoryRow:
    form: str
    bytes_per_sample: float  # saved for the backward, per image
    fixed_bytes: float  # saved for the backward independently of the batch
    budget_bytes: int
    largest_batch: int  # the largest batch whose saved bytes fit the budget (measured)


def largest_batch(model: nn.Module, budget: int, probes: tuple[int, int] = (4, 8)):
    """``(bytes per sample, fixed bytes, largest batch within budget)``: the linear fit from
    two probe batches, then the predicted batch measured, and moved down (or up) until it fits
    and one more does not."""
    small, large = probes
    low, high = saved_bytes(model, small), saved_bytes(model, large)
    per_sample = (high - low) / (large - small)
    fixed = low - per_sample * small
    batch = max(1, int((budget - fixed) // per_sample))
    while batch > 1 and saved_bytes(model, batch) > budget:
        batch -= 1
    while saved_bytes(model, batch + 1) <= budget:
        batch += 1
    return per_sample, fixed, batch


def run_memory(budget_mib: int = 512) -> list[MemoryRow]:
    budget = budget_mib * 2**20
    rows = []
    for form in FORMS:
        per_sample, fixed, batch = largest_batch(resnet(form), budget)
        rows.append(MemoryRow(form, per_sample, fixed, budget, batch))
    return rows


def format_memory(rows: list[MemoryRow]) -> str:
    baseline = rows[0]
    lines = [
        f"ResNet-18-style model, {IMAGE[1]}x{IMAGE[2]} images, float32; bytes kept for the "
        "backward (parameters excluded), largest batch whose kept bytes fit "
        f"{baseline.budget_bytes / 2**20:.0f} MiB",
        "",
        "| form | layers | MiB per image | ratio to torch | largest batch |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.form} | {FORMS[row.form]} | {row.bytes_per_sample / 2**20:.3f} | "
            f"{row.bytes_per_sample / baseline.bytes_per_sample:.2f} | {row.largest_batch} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=int, default=512)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    table = format_memory(run_memory(args.budget_mib))
    print(table)
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
