r"""Precision in a deep model: every parameter gradient of torchvision's densenet121 (random
weights, batch 4, 64x64, float32, training), with torch's batch norm and with ours on each
backend, against float64. Ours must stay within 3x torch's error on every parameter, and each
float32 run must be bitwise repeatable.

The error of one parameter's gradient :math:`g` against the float64 gradient :math:`g^*` is

.. math::
    e = \max_i |g_i - g^*_i| \,/\, \max_i |g^*_i| ,

the same for torch's run and ours; the float64 run takes the float32 weights and input, so their
rounding is no part of it. torch's error is 1e-5 on most parameters; on
``features.norm0.weight`` it is 1e-2 to 4e-2 (for every implementation, the float64 reference
backend included): with its bias at zero (as initialized) that layer reaches the loss only
through ReLU, max pooling and further batch norms, so the loss is invariant to its weight's
scale but for eps, its exact gradient is nearly zero, and rounding error is large against it.

Why each float32 run is compared on its own activation pattern. densenet121 is piecewise linear
in its input and weights (ReLU, max pooling). A pre-activation within float32 rounding of zero
can fall on the other side of zero in float32 than in float64 (in 3 of the 5 seeds we measured,
torch's own run included: 1 to 26 of the 5.1 million ReLU inputs, the first flip moving
everything downstream). That puts the run on a neighbouring linear piece, whose gradient differs
by O(1) in the rows the flip reaches: errors of 1e-2 to 0.3 where rounding gives 1e-5. Which
implementation flips, and where, is chance (the rounding of everything upstream decides it), so
a ratio over such runs measures luck, not precision (errors of 1e-3 and more, as in the reported
eager runs at 3x and 1000x torch's, are flips: one flipped ReLU in denseblock2 gave an eager run
28500x torch's error while the same run was at 1.75x on its own piece). So the float64 run
replays the discrete choices of the float32 run it is compared with (each ReLU's active set, the
max pool's argmax) and the error is the rounding error on that one piece. Where the choices
agree with those of a free float64 run, that run is the reference as it is.

Run as a script for several seeds (prints each backend's worst ratio, the flips and the errors
against the free float64 run as well)::

    .venv/bin/python -m tests.models.test_deep_precision --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.dispatch import available_backends

BATCH, SIZE, CLASSES = 4, 64, 1000
RATIO_LIMIT = 3.0
# A torch error below float32's unit roundoff counts as that (no ratio against an exact zero).
ERROR_FLOOR = torch.finfo(torch.float32).eps
BACKENDS = ("cpu", "eager", "reference")
Gradients = dict[str, torch.Tensor]


@dataclass
class Pattern:
    """The discrete choices of one forward pass, by module name: recorded, or replayed."""

    choices: dict[str, torch.Tensor] = field(default_factory=dict)
    replay: bool = False


class PatternReLU(nn.Module):
    """ReLU that records its active set (``x > 0``), or replays a recorded one."""

    def __init__(self, name: str, inplace: bool = False) -> None:
        super().__init__()
        self.name, self.inplace, self.pattern = name, inplace, Pattern()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern.replay:
            return x * self.pattern.choices[self.name].to(x.dtype)
        self.pattern.choices[self.name] = x > 0
        return F.relu(x, inplace=self.inplace)


class PatternMaxPool2d(nn.Module):
    """Max pooling that records the argmax of each window, or gathers at recorded ones (whose
    gradient, a scatter-add, is max pooling's)."""

    def __init__(self, name: str, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.name, self.pool, self.pattern = name, pool, Pattern()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern.replay:
            indices = self.pattern.choices[self.name]
            return x.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
        p = self.pool
        y, indices = F.max_pool2d(
            x, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode, return_indices=True
        )
        self.pattern.choices[self.name] = indices
        return y


def densenet121(torchvision, seed: int) -> nn.Module:
    """torchvision's densenet121 with random weights, its ReLUs and max pool made recordable.

    DenseNet.forward applies its last ReLU functionally; the same steps are spelled out as a
    Sequential so that one is recordable too (parameter names are unchanged).
    """
    torch.manual_seed(seed)
    net = torchvision.models.densenet121(weights=None)
    for name, module in list(net.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        if isinstance(module, nn.ReLU):
            setattr(parent, child, PatternReLU(name, module.inplace))
        elif isinstance(module, nn.MaxPool2d):
            setattr(parent, child, PatternMaxPool2d(name, module))
    return nn.Sequential(
        OrderedDict(
            features=net.features,
            relu=PatternReLU("relu", inplace=True),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            classifier=net.classifier,
        )
    ).train()


def gradients(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, pattern: Pattern
) -> Gradients:
    for module in model.modules():
        if isinstance(module, (PatternReLU, PatternMaxPool2d)):
            module.pattern = pattern
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def relative_errors(grads: Gradients, exact: Gradients) -> dict[str, float]:
    """max |g - g*| / max |g*| per parameter (see the module docstring)."""
    errors = {}
    for name, reference in exact.items():
        scale = reference.abs().max().item()
        difference = (grads[name].double() - reference).abs().max().item()
        errors[name] = (
            difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))
        )
    return errors


def flips(a: Pattern, b: Pattern) -> int:
    """How many discrete choices (ReLU signs, pool argmaxes) differ between two passes."""
    return sum(int((a.choices[name] != b.choices[name]).sum()) for name in a.choices)


@dataclass(frozen=True)
class Run:
    """One float32 run (torch's batch norm, or ours on a backend) against float64."""

    label: str
    errors: dict[str, float]  # on its own activation pattern: the rounding error
    free_errors: dict[str, float]  # against the free float64 run: flips included
    flips: int  # choices that differ from the free float64 run's
    deterministic: bool  # a second run gave bitwise the same gradients


def worst_ratio(run: Run, torch_run: Run) -> tuple[float, str]:
    """The largest ratio of this run's error to torch's, over the parameters, and where."""
    return max(
        (error / max(torch_run.errors[name], ERROR_FLOOR), name)
        for name, error in run.errors.items()
    )


class Case:
    """One seed: the float32 model, the input, and the free float64 run every run is held to."""

    def __init__(self, torchvision, seed: int) -> None:
        self.model = densenet121(torchvision, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
        self.labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        self.free = Pattern()
        self.free_grads = self._float64(self.free)

    def _float64(self, pattern: Pattern) -> Gradients:
        """float64 gradients with torch's batch norm, of the same float32 weights and input."""
        return gradients(copy.deepcopy(self.model).double(), self.x.double(), self.labels, pattern)

    def _float32(self, backend: str | None) -> tuple[Gradients, Pattern]:
        model = copy.deepcopy(self.model)
        if backend is None:
            pattern = Pattern()
            return gradients(model, self.x, self.labels, pattern), pattern
        model = batchnorm.convert(model)
        with batchnorm.use_backend(backend):
            pattern = Pattern()
            return gradients(model, self.x, self.labels, pattern), pattern

    def run(self, backend: str | None) -> Run:
        """``backend=None``: torch's batch norm; else ours (``batchnorm.convert``) on it."""
        grads, pattern = self._float32(backend)
        again, _ = self._float32(backend)
        deterministic = all(torch.equal(grads[name], again[name]) for name in grads)
        changed = flips(pattern, self.free)
        if changed:
            exact = self._float64(Pattern(pattern.choices, replay=True))
        else:
            exact = self.free_grads
        return Run(
            label=backend or "torch",
            errors=relative_errors(grads, exact),
            free_errors=relative_errors(grads, self.free_grads),
            flips=changed,
            deterministic=deterministic,
        )


def summary(run: Run, torch_run: Run) -> str:
    ratio, name = worst_ratio(run, torch_run)
    free_worst = max(run.free_errors, key=run.free_errors.get)
    return (
        f"{run.label:9s} worst ratio {ratio:5.2f} at {name} ({run.errors[name]:.2e} vs torch "
        f"{torch_run.errors[name]:.2e}); worst error {max(run.errors.values()):.2e}; "
        f"deterministic {run.deterministic}; flips {run.flips}, against the free float64 run: "
        f"{run.free_errors[free_worst]:.2e} at {free_worst}"
    )


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case() -> Case:
    from tests.zoo import import_torchvision

    return Case(import_torchvision(), seed=0)


@pytest.fixture(scope="module")
def torch_run(case) -> Run:
    return case.run(None)


@pytest.mark.slow
def test_torch_reference_is_repeatable(torch_run):
    """The yardstick itself: torch's float32 gradients are bitwise repeatable."""
    assert torch_run.deterministic


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_parameter_gradient_within_3x_torch(case, torch_run, backend):
    if backend not in available_backends():
        pytest.skip(f"the {backend} backend is not available here")
    run = case.run(backend)
    print(summary(run, torch_run))
    assert run.deterministic, f"{backend}: two identical runs gave different gradients"
    too_far = {
        name: (error, torch_run.errors[name])
        for name, error in run.errors.items()
        if error > RATIO_LIMIT * max(torch_run.errors[name], ERROR_FLOOR)
    }
    assert not too_far, f"{backend}: beyond {RATIO_LIMIT}x torch's error (ours, torch's): {too_far}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--backends", nargs="+", default=[b for b in BACKENDS if b in available_backends()]
    )
    args = parser.parse_args()
    from tests.zoo import load_torchvision

    torchvision = load_torchvision()
    for seed in args.seeds:
        case = Case(torchvision, seed)
        torch_run = case.run(None)
        print(
            f"seed {seed}: torch worst error {max(torch_run.errors.values()):.2e}, "
            f"deterministic {torch_run.deterministic}, flips {torch_run.flips}"
        )
        for backend in args.backends:
            print(f"  {summary(case.run(backend), torch_run)}")


if __name__ == "__main__":
    main()
