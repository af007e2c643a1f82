"""Deployment paths for models holding ours: ONNX through the dynamo exporter (onnxruntime's
outputs against ours, and a graph as small as torch's), quantization (fold first, or convert
back to torch's classes), and checkpoints that load into plain torch with
``torch.load(weights_only=True)`` and back, optimizer state included.

ONNX needs the ``zoo`` extra (onnx, onnxscript, onnxruntime); without it those tests skip.
"""

from __future__ import annotations

import collections
import copy
import io
import logging
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.modules.with_act import BatchNormWithAct2d
from batchnorm.variants.frozen import FrozenBatchNormWithAct2d


def _moved(model: nn.Module, shape) -> nn.Module:
    """Affine and statistics away from their initial values; eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for name in ("weight", "running_var"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.uniform_(0.5, 1.5)
            for name in ("bias", "running_mean"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.normal_(0, 0.5)
        model.train()
        for step in range(3):
            model(torch.randn(*shape) * 2 + step)
    return model.eval()


def _onnx(model: nn.Module, x: torch.Tensor):
    """(onnxruntime's output, the graph's operator counts) of ``model.eval()`` exported by the
    dynamo exporter."""
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output), collections.Counter(n.op_type for n in proto.graph.node)


def _conv(bn: nn.Module, dims: int = 2) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return nn.Sequential(conv(3, 4, 3, padding=1), bn)


# Every module and variant with an inference form, after a convolution (or alone), and the
# same model built with torch's classes: the graph must be no larger than torch's.
ONNX_CASES = {
    "BatchNorm1d (N, C)": (lambda: batchnorm.BatchNorm1d(3), (6, 3),
                           lambda: nn.BatchNorm1d(3)),
    "BatchNorm1d": (lambda: _conv(batchnorm.BatchNorm1d(4), 1), (4, 3, 7),
                    lambda: _conv(nn.BatchNorm1d(4), 1)),
    "BatchNorm2d": (lambda: _conv(batchnorm.BatchNorm2d(4)), (4, 3, 6, 6),
                    lambda: _conv(nn.BatchNorm2d(4))),
    "BatchNorm3d": (lambda: _conv(batchnorm.BatchNorm3d(4), 3), (2, 3, 4, 4, 4),
                    lambda: _conv(nn.BatchNorm3d(4), 3)),
    "BatchNormAct2d": (lambda: _conv(batchnorm.BatchNormAct2d(4, activation="silu")),
                       (4, 3, 6, 6), lambda: nn.Sequential(*_conv(nn.BatchNorm2d(4)), nn.SiLU())),
    "BatchNormAct1d": (lambda: batchnorm.BatchNormAct1d(3, activation="relu"), (6, 3),
                       lambda: nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())),
    "BatchNormWithAct2d": (lambda: _conv(BatchNormWithAct2d(4, act=nn.Hardswish())),
                           (4, 3, 6, 6),
                           lambda: nn.Sequential(*_conv(nn.BatchNorm2d(4)), nn.Hardswish())),
    "FrozenBatchNorm2d": (lambda: _conv(batchnorm.FrozenBatchNorm2d(4)), (4, 3, 6, 6),
                          lambda: _conv(nn.BatchNorm2d(4))),
    "FrozenBatchNorm1d": (lambda: batchnorm.FrozenBatchNorm1d(3), (6, 3),
                          lambda: nn.BatchNorm1d(3)),
    "FrozenBatchNormWithAct2d": (lambda: _conv(FrozenBatchNormWithAct2d(4, act=nn.ReLU())),
                                 (4, 3, 6, 6),
                                 lambda: nn.Sequential(*_conv(nn.BatchNorm2d(4)), nn.ReLU())),
    "BatchRenorm2d": (lambda: _conv(batchnorm.BatchRenorm2d(4, r_max=2.0, d_max=1.0)),
                      (4, 3, 6, 6), lambda: _conv(nn.BatchNorm2d(4))),
    "GhostBatchNorm2d": (lambda: _conv(batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2)),
                         (4, 3, 6, 6), lambda: _conv(nn.BatchNorm2d(4))),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_export_matches_ours_and_is_as_small_as_torchs(case):
    build, shape, build_torch = ONNX_CASES[case]
    model = _moved(build(), shape)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)
    output, operators = _onnx(model, x)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    _, torch_operators = _onnx(_moved(build_torch(), shape), x)
    assert operators == torch_operators
    assert sum(operators.values()) <= 3  # e.g. Conv alone (the batch norm folded into it)


def test_onnx_export_of_a_folded_model():
    model = _moved(nn.Sequential(
        nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), batchnorm.BatchNormAct2d(4, activation="gelu"),
        nn.ReLU(), batchnorm.BatchNorm2d(4),  # after an activation: a per-channel affine
    ), (8, 3, 6, 6))
    folded = batchnorm.fold(model)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = folded(x)
        torch.testing.assert_close(expected, model(x), rtol=1e-5, atol=1e-5)
    output, operators = _onnx(folded, x)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    assert operators["Conv"] == 2 and "BatchNormalization" not in operators


# Quantization: torch.ao's fusers and FX patterns key on torch's exact classes.


def _calibrated(prepared: nn.Module, batches) -> nn.Module:
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return prepared


def _quantization_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), batchnorm.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), batchnorm.BatchNormAct2d(8, activation="relu"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _assert_quantized_close(quantized, model, batches):
    x = torch.cat(batches)
    with torch.no_grad():
        error = (quantized(x) - model(x)).abs().max() / model(x).abs().max()
    assert error < 0.05  # 8-bit rounding, not a dropped layer


def test_quantize_fold_first_then_fx():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model = _moved(_quantization_model(), (16, 3, 8, 8))
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    folded = batchnorm.fold(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notices about its successor, torchao
        prepared = prepare_fx(folded, get_default_qconfig_mapping("x86"), (batches[0],))
        quantized = convert_fx(_calibrated(prepared, batches))
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert {"ConvReLU2d", "Linear"} <= kinds and not any("BatchNorm" in k for k in kinds)
    _assert_quantized_close(quantized, model, batches)


def test_quantize_after_converting_back_with_torchs_eager_fusion():
    """Our plain batch norms go back to torch's classes, which torch.ao's fusers know. (Our
    fused BatchNormAct has no torch class: fold first, as above.)"""
    from torch.ao import quantization

    torch.manual_seed(0)
    model = _moved(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), batchnorm.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), batchnorm.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ), (16, 3, 8, 8))
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    with pytest.raises(AssertionError, match="did not find fuser method"):
        quantization.fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    plain = batchnorm.convert(copy.deepcopy(model), to="torch")
    fused = quantization.fuse_modules(plain, [["0", "1", "2"], ["3", "4", "5"]])
    wrapped = nn.Sequential(quantization.QuantStub(), fused, quantization.DeQuantStub())
    wrapped.qconfig = quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notices about its successor, torchao
        prepared = quantization.prepare(wrapped.eval())
        quantized = quantization.convert(_calibrated(prepared, batches))
    assert [type(quantized[1][i]).__name__ for i in (0, 3)] == ["ConvReLU2d", "ConvReLU2d"]
    _assert_quantized_close(quantized, model, batches)


# Checkpoints: a state dict of ours is a state dict of torch's.


def _checkpoint_model(norm) -> nn.Module:
    # (no conv bias before the batch norm: its gradient would be zero up to rounding, which
    # Adam's normalized step turns into full steps that differ between any two libraries)
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), norm(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def _train(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=generator)
        target = torch.randint(0, 5, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("direction", ["ours to torch", "torch to ours"])
def test_checkpoint_with_optimizer_state_loads_across_with_weights_only(
    optimizer_class, direction, tmp_path
):
    ours, theirs = (batchnorm.BatchNorm2d, nn.BatchNorm2d)
    first, second = (ours, theirs) if direction == "ours to torch" else (theirs, ours)
    options = {"lr": 0.05, "momentum": 0.9} if optimizer_class is torch.optim.SGD else {
        "lr": 0.01}
    model = _checkpoint_model(first)
    optimizer = optimizer_class(model.parameters(), **options)
    _train(model, optimizer, steps=3, seed=0)
    path = tmp_path / "checkpoint.pt"
    batchnorm.save_checkpoint(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3}, path
    )
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 3

    resumed = _checkpoint_model(second)
    resumed.load_state_dict(loaded["model"], strict=True)
    resumed_optimizer = optimizer_class(resumed.parameters(), **options)
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    assert type(resumed[1]) is second and resumed[1].num_batches_tracked == 3
    # both continue from the same state: the same parameters and statistics after two steps
    _train(model, optimizer, steps=2, seed=1)
    _train(resumed, resumed_optimizer, steps=2, seed=1)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_a_whole_model_saved_with_ours_loads_as_torchs_state_dict():
    """``torch.save(model)`` pickles our classes (loading that needs weights_only=False and
    this package); the state dict inside loads into torch's model with weights_only=True."""
    model = _checkpoint_model(batchnorm.BatchNorm2d)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    plain = _checkpoint_model(nn.BatchNorm2d)
    plain.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(buffer, weights_only=True)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert type(again[1]) is batchnorm.BatchNorm2d
