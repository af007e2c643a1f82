"""The lab's models: norms by name (ours for batch norm), placement, and initialization scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.lab.models import CNN, MLP, NORMS, init_weights, make_norm, register_norm


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_norm_builds_and_trains_a_step(norm):
    for model, x in [
        (MLP(64, 10, depth=2, width=16, norm=norm), torch.randn(8, 64)),
        (CNN(1, 10, widths=(4, 8, 8), norm=norm), torch.randn(8, 1, 8, 8)),
        (CNN(1, 10, widths=(4, 8, 8), norm=norm, one_dimensional=True), torch.randn(8, 1, 1, 40)),
    ]:
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,)))
        loss.backward()
        assert torch.isfinite(loss)


def test_batch_norm_is_ours():
    assert type(make_norm("batch", 8, "vector")) is BatchNorm1d
    assert type(make_norm("batch", 8, "sequence")) is BatchNorm1d
    assert type(make_norm("batch", 8, "image")) is BatchNorm2d
    assert any(isinstance(m, BatchNorm1d) for m in MLP(4, 2, norm="batch").modules())


def test_placement_orders_norm_and_activation_and_applies_each_once():
    torch.manual_seed(0)
    x = torch.randn(32, 5)
    before = MLP(5, 2, depth=1, width=6, activation="sigmoid", norm="batch", placement="before")
    linear, norm = before.hidden[0][0], before.hidden[0][1]
    assert torch.allclose(before.hidden(x), torch.sigmoid(norm(linear(x))))
    after = MLP(5, 2, depth=1, width=6, activation="sigmoid", norm="batch", placement="after")
    linear, norm = after.hidden[0][0], after.hidden[0][2]
    assert torch.allclose(after.hidden(x), norm(torch.sigmoid(linear(x))))
    assert after.activations[0] is after.hidden[0][1]


def test_init_scale_multiplies_the_standard_weights():
    torch.manual_seed(3)
    standard = MLP(64, 10, depth=2, width=200)
    torch.manual_seed(3)
    scaled = MLP(64, 10, depth=2, width=200)
    init_weights(scaled, "relu", scale=10.0)
    with torch.no_grad():
        ratio = float(scaled.hidden[1][0].weight.std() / standard.hidden[1][0].weight.std())
        first_std = float(standard.hidden[0][0].weight.std())
    assert ratio == pytest.approx(10.0, rel=0.05)
    assert first_std == pytest.approx((2 / 64) ** 0.5, rel=0.05)  # He: sqrt(2 / fan_in)


def test_unknown_choices_name_the_options():
    with pytest.raises(ValueError, match="unknown norm 'ghosts': expected one of none, batch"):
        make_norm("ghosts", 4, "vector")
    with pytest.raises(ValueError, match="unknown layout 'volume'"):
        make_norm("batch", 4, "volume")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MLP(4, 2, activation="gelu")
    with pytest.raises(ValueError, match="unknown placement 'middle'"):
        MLP(4, 2, placement="middle")


def test_registered_norm_is_usable_by_name():
    register_norm("test-identity", lambda features, layout: nn.Identity())
    try:
        assert MLP(4, 2, norm="test-identity")(torch.randn(3, 4)).shape == (3, 2)
    finally:
        del NORMS["test-identity"]


def test_variants_are_ours_with_the_lab_settings():
    from batchnorm import BatchRenorm2d, GhostBatchNorm1d

    renorm = make_norm("renorm", 8, "image")
    assert type(renorm) is BatchRenorm2d and (renorm.r_max, renorm.d_max) == (1.5, 0.5)
    ghost = make_norm("ghost", 8, "vector")
    assert type(ghost) is GhostBatchNorm1d and ghost.virtual_batch_size == 16


def test_one_dimensional_cnn_convolves_the_signal_with_the_sequence_norms():
    model = CNN(1, 10, widths=(4, 8, 8), norm="layer", one_dimensional=True)
    convolutions = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert convolutions and all(isinstance(m, nn.Conv1d) for m in convolutions)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [m.num_groups for m in norms] == [1, 1, 1]  # LayerNorm over (C, L)
    assert model(torch.randn(5, 1, 1, 40)).shape == (5, 10)
