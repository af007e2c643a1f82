"""Our modules under torch.func transforms, against torch's modules under the same transforms:
vmap over a batch of inputs, an ensemble's stacked state (``stack_module_state`` with
``functional_call``) under vmap and under vmap of grad, and the refusal torch also makes (a
vmapped training call with running statistics shared by every member)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn import functional as F

import batchnorm
from batchnorm.core.errors import BatchNormValueError
from tests.conftest import make_input

MEMBERS = 3


def _fused(activation):
    def make(channels, **kwargs):
        return batchnorm.BatchNormAct2d(channels, activation=activation, **kwargs)

    return make


def _torch_fused(activation):
    after = {"relu": nn.ReLU(), "silu": nn.SiLU()}[activation]

    def make(channels, **kwargs):
        return nn.Sequential(nn.BatchNorm2d(channels, **kwargs), after)

    return make


# (ours, torch's, the shape of one vmapped member's input)
CASES = {
    "BatchNorm1d (N, C)": (batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 3)),
    "BatchNorm1d (N, C, L)": (batchnorm.BatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
    "BatchNorm2d": (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 3, 2, 3)),
    "BatchNorm2d channels_last": (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 3, 2, 3)),
    "BatchNormAct2d relu": (_fused("relu"), _torch_fused("relu"), (4, 3, 2, 3)),
    "BatchNormAct2d silu": (_fused("silu"), _torch_fused("silu"), (4, 3, 2, 3)),
}


def _pair(case, **kwargs):
    ours_cls, torch_cls, shape = CASES[case]
    torch.manual_seed(0)
    theirs = torch_cls(3, dtype=torch.float64, **kwargs)
    norm = theirs[0] if isinstance(theirs, nn.Sequential) else theirs
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        if norm.running_mean is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    ours = ours_cls(3, dtype=torch.float64, **kwargs)
    ours.load_state_dict(norm.state_dict())
    layout = "channels_last" if "channels_last" in case else "contiguous"
    members = [make_input(shape, torch.float64, layout, seed=i, scale=2.0) for i in
               range(MEMBERS)]
    return ours, theirs, torch.stack(members)


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_over_inputs_without_running_statistics_is_torchs(case):
    """Training without running statistics (torch.func's advice for batch norm under vmap):
    each member normalized by its own batch statistics, as torch's module computes it."""
    ours, theirs, x = _pair(case, track_running_stats=False)
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_over_inputs_in_eval_is_torchs(case):
    ours, theirs, x = _pair(case)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))


@pytest.mark.parametrize("case", ["BatchNorm2d", "BatchNormAct2d relu"])
def test_vmap_training_with_shared_running_statistics_is_refused_and_changes_nothing(case):
    """One running mean cannot take one update per member: refused by name, catchable as the
    RuntimeError torch's module raises for the same call, and the state is untouched."""
    ours, theirs, x = _pair(case)
    with pytest.raises(RuntimeError):
        vmap(theirs)(x)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(BatchNormValueError, match="running statistics batched"):
        vmap(ours)(x)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def _ensemble(norm):
    torch.manual_seed(1)
    models = []
    for _ in range(MEMBERS):
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.Flatten(),
                              nn.Linear(4 * 5 * 5, 2))
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.normal_()
        models.append(model)
    return models


@pytest.mark.parametrize("fused", [False, True])
def test_an_ensemble_trains_under_vmap_and_vmap_of_grad_as_torchs(fused):
    """Stacked members (each with its own parameters and running statistics) on one input:
    the outputs, every member's gradients and each member's running statistics and count, after
    a vmapped forward and a vmapped grad, are torch's."""
    theirs = _ensemble(nn.BatchNorm2d)
    ours = [batchnorm.convert(copy.deepcopy(m)) for m in theirs]
    if fused:  # our fused layer in place of batch norm (its identity activation)
        for member in ours:
            layer = batchnorm.BatchNormAct2d(4, activation="identity")
            layer.load_state_dict(member[1].state_dict())
            member[1] = layer
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    found = {}
    for name, models in (("torch", theirs), ("ours", ours)):
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def run(p, b, inputs, base=base):
            return functional_call(base, (p, b), (inputs,))

        def loss(p, b, inputs, run=run):
            return F.cross_entropy(run(p, b, inputs), torch.zeros(6, dtype=torch.long))

        output = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
        grads = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
        found[name] = (output, grads, buffers)
    (out, grads, buffers), (expected, expected_grads, expected_buffers) = (
        found["ours"], found["torch"])
    torch.testing.assert_close(out, expected)
    for key, value in expected_grads.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-4, atol=1e-6)
    for key, value in expected_buffers.items():
        torch.testing.assert_close(buffers[key], value)
    assert buffers["1.num_batches_tracked"].tolist() == [2] * MEMBERS


@pytest.mark.parametrize("case", ["BatchNorm1d (N, C)", "BatchNorm2d", "BatchNormAct2d relu"])
def test_an_ensemble_whose_batch_norm_reads_the_shared_input_is_torchs(case):
    """Batch norm first in each member, so every member normalizes the same input (unbatched
    under the vmap) with its own stacked statistics: under vmap of grad each member's
    statistics and count move as torch's (one finite flag for all members)."""
    ours_cls, torch_cls, shape = CASES[case]
    found = {}
    for name, make in (("torch", torch_cls), ("ours", ours_cls)):
        torch.manual_seed(0)
        models = [nn.Sequential(make(3, dtype=torch.float64), nn.Flatten(),
                                nn.LazyLinear(1, dtype=torch.float64)) for _ in range(MEMBERS)]
        x = make_input(shape, torch.float64, seed=4, scale=2.0)
        for model in models:
            model(x)  # (materializes the lazy layer; one training step of each member)
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def loss(p, b, inputs, base=base):
            return functional_call(base, (p, b), (inputs,)).pow(2).sum()

        grads = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
        # (torch's fused pair is a Sequential of batch norm and activation: "0.0.weight")
        found[name] = [{k.replace("0.0.", "0.", 1): v for k, v in d.items()}
                       for d in (grads, buffers)]
    (grads, buffers), (expected_grads, expected_buffers) = found["ours"], found["torch"]
    assert grads.keys() == expected_grads.keys() and buffers.keys() == expected_buffers.keys()
    for key, value in expected_grads.items():
        torch.testing.assert_close(grads[key], value)
    for key, value in expected_buffers.items():
        torch.testing.assert_close(buffers[key], value)
    assert buffers["0.num_batches_tracked"].tolist() == [2] * MEMBERS


@pytest.mark.parametrize("case", ["BatchNorm1d (N, C, L)", "BatchNorm2d", "BatchNormAct2d relu"])
def test_per_member_input_gradients_and_jacobians_are_torchs(case):
    """vmap of grad and of jacrev with respect to each member's input, training without
    running statistics."""
    ours, theirs, x = _pair(case, track_running_stats=False)
    for transform in (grad, torch.func.jacrev):
        found = [vmap(transform(lambda t, m=m: m(t).pow(2).sum()))(x) for m in (ours, theirs)]
        torch.testing.assert_close(*found)


def test_nested_vmap_training_with_per_member_statistics_is_refused_and_changes_nothing():
    """Running statistics stacked for an outer vmap, updated under an inner vmap of grad: one
    buffer per outer member cannot take one update per inner member; refused by name before
    either statistic is written."""
    models = [batchnorm.BatchNorm2d(3) for _ in range(2)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 3, 4, 3, 2, 2, generator=torch.Generator().manual_seed(3))

    def loss(p, b, inputs):
        return functional_call(base, (p, b), (inputs,)).pow(2).sum()

    before = {k: v.clone() for k, v in buffers.items()}
    with pytest.raises(BatchNormValueError, match="nested vmaps"):
        vmap(vmap(grad(loss), in_dims=(None, None, 0)))(params, buffers, x)
    for key, value in buffers.items():
        assert torch.equal(value, before[key]), key


def test_nested_vmap_training_without_grad_is_refused_by_name_and_changes_nothing():
    """The same nesting without a differentiating transform: torch's module refuses it with an
    unnamed RuntimeError from its in-place write (after counting the batch); ours names it, as a
    RuntimeError too, before anything is written."""
    found = {}
    for make in (nn.BatchNorm2d, batchnorm.BatchNorm2d):
        models = [make(3) for _ in range(2)]
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        x = torch.randn(2, 3, 4, 3, 2, 2, generator=torch.Generator().manual_seed(3))

        def run(p, b, inputs, base=base):
            return functional_call(base, (p, b), (inputs,))

        before = {k: v.clone() for k, v in buffers.items()}
        with pytest.raises(RuntimeError) as caught:
            vmap(vmap(run, in_dims=(None, None, 0)))(params, buffers, x)
        found[make] = caught.value
        if make is batchnorm.BatchNorm2d:  # (torch's has counted the batch by then)
            for key, value in buffers.items():
                assert torch.equal(value, before[key]), key
    assert isinstance(found[batchnorm.BatchNorm2d], BatchNormValueError)
    assert "nested vmaps" in str(found[batchnorm.BatchNorm2d])

