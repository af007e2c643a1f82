import torch
from torch import nn

import batchnorm
from batchnorm import ChannelAffine, fold
from batchnorm.modules.with_act import BatchNormWithAct2d
from batchnorm.variants.frozen import FrozenBatchNormWithAct2d


class Bottleneck(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 1)
        self.bn3 = batchnorm.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(x + self.bn3(self.conv3(out)))


def _resnet_like():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), batchnorm.BatchNorm2d(8), nn.ReLU(),
        Bottleneck(8), Bottleneck(8),
        nn.ReLU(), batchnorm.BatchNorm2d(8),  # after an activation: cannot be folded
        nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2), batchnorm.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4 * 16 * 16, 6), nn.BatchNorm1d(6),
    )


def _trained(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 2 + 1)
    return model.eval()


def _relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_resnet_style_outputs_match_within_1e5():
    model = _trained(_resnet_like())
    folded, report = fold(model, return_report=True)
    assert report.method == "fx"
    assert len(report.folded) == 9 and report.left == ["6"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert isinstance(folded.get_submodule("6"), ChannelAffine)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert _relative_error(folded(x), model(x)) < 1e-5
    # The original is untouched.
    assert isinstance(model[1], batchnorm.BatchNorm2d)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), batchnorm.BatchNorm1d(5), nn.Tanh(),
                                  nn.BatchNorm1d(5))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            return self.body(x)
        return -self.body(x)


def test_falls_back_to_sequential_adjacency():
    model = Untraceable()
    model.body(torch.randn(8, 4))
    model.eval()
    folded, report = fold(model, return_report=True)
    assert report.method == "sequential"
    assert report.folded == ["body.0 <- body.1"] and report.left == ["body.3"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert _relative_error(folded(x), model(x)) < 1e-5


def test_report_prints():
    _, report = fold(_trained(_resnet_like()), return_report=True)
    text = str(report)
    assert "folded 9 batch norm(s) (fx)" in text and "left 1 as per-channel affine" in text


def test_a_large_eps_is_folded_exactly_in_float64():
    """eps enters the folded scale gamma / sqrt(var + eps): with eps = 1.0, as large as the
    variances themselves, any slip (a default eps, eps outside the root) shows far above
    float64's rounding. One layer has no shift (bias=False)."""
    torch.manual_seed(0)
    options = {"eps": 1.0, "dtype": torch.float64}
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, dtype=torch.float64), batchnorm.BatchNorm2d(4, **options), nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2, dtype=torch.float64),
        nn.BatchNorm2d(4, bias=False, **options), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5, dtype=torch.float64), batchnorm.BatchNorm1d(5, **options),
        nn.Tanh(), batchnorm.BatchNorm1d(5, **options),  # after an activation: left as affine
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.normal_()
        for _ in range(3):
            model(torch.randn(16, 3, 6, 6, dtype=torch.float64) * 0.5 + 1)
    model.eval()
    folded, report = fold(model, return_report=True)
    assert len(report.folded) == 3 and report.left == ["9"]
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert _relative_error(folded(x), expected) < 1e-12
        # the same model with torch's default eps differs far beyond that: eps matters here
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = 1e-5
        assert _relative_error(model(x), expected) > 1e-3


# Layers that hold an activation, and batch norms fold cannot fold.


def _moved(model, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
        model.train()
        for _ in range(3):
            model(torch.randn(*shape) * 2 + 1)
    return model.eval()


def _same_eval_outputs(model, folded, shape):
    x = torch.randn(*shape)
    with torch.no_grad():
        assert _relative_error(folded(x), model(x)) < 1e-5


def test_a_timm_layer_keeps_its_activation_and_drop():
    """timm's BatchNormAct2d folds its affine map and keeps drop and act (the activation was
    dropped before: outputs off by far more than the values themselves)."""
    from tests.zoo import import_timm

    import_timm()
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d

    model = _moved(nn.Sequential(
        nn.Conv2d(3, 4, 3), TimmBatchNormAct2d(4, act_layer=nn.SiLU),
        nn.Conv2d(4, 4, 1), TimmBatchNormAct2d(4, act_layer=nn.Hardswish,
                                               drop_layer=lambda: nn.Dropout(0.5)),
    ), (8, 3, 6, 6))
    folded, report = fold(model, return_report=True)
    assert report.folded == ["0 <- 1", "2 <- 3"]
    assert report.activations == {"1": "SiLU", "3": "Dropout -> Hardswish"}
    assert type(folded.get_submodule("1")) is nn.SiLU
    _same_eval_outputs(model, folded, (4, 3, 6, 6))


def test_our_fused_layers_keep_their_activation():
    model = _moved(nn.Sequential(
        nn.Conv2d(3, 4, 3), batchnorm.BatchNormAct2d(4, activation="gelu"),
        nn.Conv2d(4, 4, 1),
        batchnorm.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2),
        nn.Conv2d(4, 4, 1), BatchNormWithAct2d(4, act=nn.Hardswish()),
        nn.Flatten(), nn.Linear(16, 3), batchnorm.BatchNormAct1d(3, activation="silu"),
    ), (8, 3, 4, 4))
    folded, report = fold(model, return_report=True)
    assert len(report.folded) == 4 and report.left == [] and report.kept == []
    assert report.activations == {"1": "GELU", "3": "LeakyReLU", "5": "Hardswish",
                                  "8": "SiLU"}
    assert folded.get_submodule("3").negative_slope == 0.2
    _same_eval_outputs(model, folded, (4, 3, 4, 4))


class _Doubled(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.norm = batchnorm.BatchNormAct2d(4)

    def forward(self, x):
        return self.norm(self.conv(x), x)


class _Dense(nn.Module):
    """densenet's layer: the batch norm normalizes a concatenation, before its convolution."""

    def __init__(self):
        super().__init__()
        self.norm = BatchNormWithAct2d(8, act=nn.ReLU())
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return torch.cat([x, self.conv(self.norm(torch.cat([x, x], 1)))], 1)


def test_what_fold_cannot_fold_it_keeps_or_leaves_as_affine_and_says_why():
    model = _moved(nn.Sequential(
        nn.Conv2d(3, 4, 3), _Doubled(4),
        nn.Conv2d(4, 4, 1), batchnorm.BatchNorm2d(4, track_running_stats=False),
        _Residual(), _Dense(),
    ), (8, 3, 6, 6))
    folded, report = fold(model, return_report=True)
    assert report.folded == []
    assert report.kept == ["1", "3", "4.norm"]
    assert report.left == ["5.norm"]
    assert "subclass fold does not know" in report.reasons["1"]
    assert "no running statistics" in report.reasons["3"]
    assert "more than its input" in report.reasons["4.norm"]
    assert report.reasons["5.norm"] == (
        "its input comes from cat, not from a convolution or linear layer"
    )
    assert report.activations == {"5.norm": "ReLU"}
    assert type(folded.get_submodule("1")) is _Doubled  # kept, in eval mode
    assert isinstance(folded.get_submodule("5.norm")[0], ChannelAffine)
    _same_eval_outputs(model, folded, (4, 3, 6, 6))
    text = str(report)
    assert "kept 3 as they were:" in text
    assert "5.norm (keeps ReLU): its input comes from cat" in text


def test_a_shared_output_and_a_second_call_are_named():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.norm = batchnorm.BatchNorm2d(4)
            self.other = nn.Conv2d(3, 4, 1)
            self.twice = batchnorm.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.other(x)
            return self.norm(y) + y + self.twice(z) + self.twice(z)

    model = _moved(Shared(), (8, 3, 4, 4))
    folded, report = fold(model, return_report=True)
    assert report.reasons == {"norm": "the output of conv is also used elsewhere",
                              "twice": "the output of other is also used elsewhere"}
    _same_eval_outputs(model, folded, (4, 3, 4, 4))


def test_the_sequential_fallback_keeps_activations_too():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormWithAct2d(4, act=nn.SiLU()),
                                      nn.Tanh(), BatchNormWithAct2d(4, act=nn.ReLU()))

        def forward(self, x):
            if x.sum() > 0:
                return self.body(x)
            return -self.body(x)

    model = _moved(Untraceable(), (8, 3, 4, 4))
    folded, report = fold(model, return_report=True)
    assert report.method == "sequential"
    assert report.folded == ["body.0 <- body.1"] and report.left == ["body.3"]
    assert report.activations == {"body.1": "SiLU", "body.3": "ReLU"}
    _same_eval_outputs(model, folded, (4, 3, 4, 4))


def test_zoo_frozen_layers_fold():
    from tests.zoo import import_torchvision

    import_torchvision()
    from torchvision.ops.misc import FrozenBatchNorm2d as VisionFrozen

    model = nn.Sequential(nn.Conv2d(3, 4, 3), VisionFrozen(4), FrozenBatchNormWithAct2d(
        4, act=nn.ReLU()))
    with torch.no_grad():
        for layer in (model[1], model[2]):
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
            layer.weight.uniform_(0.5, 1.5)
    folded, report = fold(model.eval(), return_report=True)
    # the first folds into the conv, which then feeds the second alone: it folds too
    assert report.folded == ["0 <- 1", "0 <- 2"] and report.left == []
    assert report.activations == {"2": "ReLU"}
    _same_eval_outputs(model, folded, (4, 3, 6, 6))
