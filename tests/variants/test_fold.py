import torch
from torch import nn

import batchnorm
from batchnorm import ChannelAffine, fold


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
