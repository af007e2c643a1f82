"""Fuzz: a parameter or buffer that is too short, too long, of another rank, of an integer dtype
or on the ``meta`` device, in every module and variant and in the functional forms, training and
eval.

Each call must raise an error that is a ``RuntimeError`` (what code written for torch catches)
and one of ``batchnorm.core.errors``' classes, whose message names the tensor, what was expected
and what came; the running statistics and ``num_batches_tracked`` must be as before; and the
process must survive (the compiled kernels read per-channel vectors by address, so a short or
``meta`` vector that got through would read out of bounds or crash).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.core.errors import BatchNormTypeError, BatchNormValueError
from batchnorm.functional import batch_norm, batch_norm_pure
from batchnorm.variants.frozen import frozen_batch_norm
from batchnorm.variants.ghost import ghost_batch_norm
from batchnorm.variants.recurrent import recurrent_batch_norm
from batchnorm.variants.renorm import batch_renorm

SLOTS = ("weight", "bias", "running_mean", "running_var")
CORRUPTIONS = ("short", "long", "extra_dim", "int", "meta")
BATCH = 6
MAX_STEPS = 3  # the recurrent layer's rows of statistics


@dataclass(frozen=True)
class Target:
    """Something to call: a module (``build`` returns it) or a functional form (``build``
    returns a dict of tensors, ``call`` receives it)."""

    build: Callable[[int], object]
    spatial: tuple[int, ...]
    call: Callable[[object, torch.Tensor, bool], object]
    functional: bool = False
    step_rows: bool = False  # running statistics of shape (max_steps, C)


def _module(factory, spatial, call=None, **options) -> Target:
    return Target(factory, spatial, call or (lambda module, x, training: module(x)), **options)


def _tensors(channels: int, rows: bool = False) -> dict[str, torch.Tensor]:
    shape = (MAX_STEPS, channels) if rows else (channels,)
    return {
        "weight": torch.rand(channels) + 0.5,
        "bias": torch.randn(channels),
        "running_mean": torch.randn(shape),
        "running_var": torch.rand(shape) + 0.5,
    }


def _functional(function, spatial, rows: bool = False) -> Target:
    def call(tensors, x, training):
        return function(x, tensors["running_mean"], tensors["running_var"], tensors["weight"],
                        tensors["bias"], training)

    return Target(lambda c: _tensors(c, rows), spatial, call, functional=True, step_rows=rows)


TARGETS: dict[str, Target] = {
    "BatchNorm1d": _module(batchnorm.BatchNorm1d, ()),
    "BatchNorm1d (N, C, L)": _module(batchnorm.BatchNorm1d, (5,)),
    "BatchNorm2d": _module(batchnorm.BatchNorm2d, (3, 3)),
    "BatchNorm3d": _module(batchnorm.BatchNorm3d, (2, 2, 2)),
    "BatchNormAct1d": _module(lambda c: batchnorm.BatchNormAct1d(c, activation="silu"), (4,)),
    "BatchNormAct2d": _module(batchnorm.BatchNormAct2d, (3, 3),
                              lambda m, x, training: m(x, torch.randn_like(x))),
    "BatchRenorm2d": _module(lambda c: batchnorm.BatchRenorm2d(c, r_max=2.0, d_max=1.0), (2, 2)),
    "BatchRenorm1d (schedule)": _module(batchnorm.BatchRenorm1d, ()),
    "GhostBatchNorm1d": _module(lambda c: batchnorm.GhostBatchNorm1d(c, virtual_batch_size=2),
                                (3,)),
    "FrozenBatchNorm2d": _module(batchnorm.FrozenBatchNorm2d, (3, 3)),
    "SyncBatchNorm": _module(batchnorm.SyncBatchNorm, (4,)),
    "RecurrentBatchNorm": _module(
        lambda c: batchnorm.RecurrentBatchNorm(c, max_steps=MAX_STEPS), (),
        lambda module, x, training: module(x, 1), step_rows=True,
    ),
    "batch_norm": _functional(
        lambda x, rm, rv, w, b, training: batch_norm(x, rm, rv, w, b, training), (3,)),
    "batch_norm_pure": _functional(
        lambda x, rm, rv, w, b, training: batch_norm_pure(x, rm, rv, w, b, training), (2, 2)),
    "batch_renorm": _functional(
        lambda x, rm, rv, w, b, training: batch_renorm(x, rm, rv, w, b, training,
                                                       r_max=2.0, d_max=1.0), (3,)),
    "ghost_batch_norm": _functional(
        lambda x, rm, rv, w, b, training: ghost_batch_norm(x, rm, rv, w, b, training,
                                                           virtual_batch_size=4), ()),
    "frozen_batch_norm": _functional(
        lambda x, rm, rv, w, b, training: frozen_batch_norm(x, rm, rv, w, b), (2, 2)),
    "recurrent_batch_norm": _functional(
        lambda x, rm, rv, w, b, training: recurrent_batch_norm(x, 5, rm, rv, w, b, training),
        (), rows=True),
}


def corrupted(good: torch.Tensor, corruption: str) -> torch.Tensor:
    """``good`` (shape (C,) or (max_steps, C)) made wrong in one way."""
    if corruption == "short":
        return good[..., :-1].clone()
    if corruption == "long":
        return torch.cat([good, good[..., :1]], dim=-1)
    if corruption == "extra_dim":  # (1, C): as many values as channels, one axis too many
        return good.unsqueeze(0).clone()
    if corruption == "int":
        return good.to(torch.int64)
    assert corruption == "meta"
    return good.to("meta")


def _install(holder, target: Target, slot: str, bad: torch.Tensor, through_dict: bool) -> None:
    """Put ``bad`` where ``slot`` lives, the ways users do: attribute assignment (a Parameter
    for parameters) or the module's own dictionaries."""
    if target.functional:
        holder[slot] = bad
    elif slot in holder._parameters:
        parameter = nn.Parameter(bad, requires_grad=bad.is_floating_point())
        if through_dict:
            holder._parameters[slot] = parameter
        else:
            setattr(holder, slot, parameter)
    elif through_dict:
        holder._buffers[slot] = bad
    else:
        setattr(holder, slot, bad)


def _state(holder, target: Target) -> dict[str, object]:
    """The running statistics and counts (and every other tensor), comparable after the call:
    values, or shape and dtype for a ``meta`` tensor (which has none)."""
    tensors = dict(holder) if target.functional else dict(holder.state_dict(keep_vars=True))
    return {
        name: (tuple(t.shape), t.dtype) if t.device.type == "meta" else t.detach().clone()
        for name, t in tensors.items()
        if t is not None
    }


def _same(before: dict[str, object], after: dict[str, object]) -> bool:
    if before.keys() != after.keys():
        return False
    for name, value in before.items():
        other = after[name]
        if isinstance(value, tuple) or isinstance(other, tuple):
            if value != other:
                return False
        elif not torch.equal(value, other):
            return False
    return True


def expected_in_message(slot: str, corruption: str, good: torch.Tensor, bad: torch.Tensor,
                        step_rows: bool) -> list[str]:
    """What the message must say: the tensor's name, what was expected and what came."""
    channels = good.shape[-1]
    if corruption == "int":
        return [slot, "float", str(bad.dtype)]
    if corruption == "meta":
        return [slot, "cpu", "meta"]
    expected = f"(max_steps, {channels})" if step_rows and slot.startswith("running") else (
        f"({channels},)"
    )
    return [slot, expected, str(tuple(bad.shape))]


def run_case(name: str, slot: str, corruption: str, training: bool, channels: int = 3,
             through_dict: bool = False, seed: int = 0) -> None:
    """One fuzz case: build, corrupt, call, and check the error and the state."""
    target = TARGETS[name]
    torch.manual_seed(seed)
    holder = target.build(channels)
    if not target.functional:
        holder.train(training)
    good = holder[slot] if target.functional else getattr(holder, slot)
    bad = corrupted(good.detach(), corruption)
    _install(holder, target, slot, bad, through_dict)
    before = _state(holder, target)
    x = torch.randn(BATCH, channels, *target.spatial)
    with pytest.raises(RuntimeError) as caught:
        target.call(holder, x, training)
    error = caught.value
    assert isinstance(error, (BatchNormValueError, BatchNormTypeError)), (
        f"{type(error).__name__}: {error}"
    )
    message = str(error)
    for part in expected_in_message(slot, corruption, good, bad, target.step_rows):
        assert part in message, f"{part!r} not in: {message}"
    assert _same(before, _state(holder, target)), "the call changed the state before refusing"


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=6, deadline=None)
@given(
    slot=st.sampled_from(SLOTS),
    training=st.booleans(),
    channels=st.integers(2, 5),
    through_dict=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_bad_parameter_or_buffer_is_refused_before_anything_changes(
    name, corruption, slot, training, channels, through_dict, seed
):
    run_case(name, slot, corruption, training, channels, through_dict, seed)
