"""Real architectures, converted to ours and back, folded, exported (torch.export in training
and eval, ONNX) and traced (torch.fx, torch.jit.trace): torchvision's resnet18,
mobilenet_v3_small, efficientnet_b0 and densenet121; timm's resnet18, efficientnet_b0 and
mobilenetv3_small_100 (random weights, tests/zoo_models/models.py). The default run converts
and folds one model of each zoo and exports and traces resnet18; ``-m slow`` does the rest.

Training steps are compared in float64, where ours and torch's agree to about 1e-12: a slip
(a lost activation, a wrong momentum, statistics not updated) shows far above that, and no
ReLU lands on the other side of zero by rounding (which in float32 moves a deep network onto a
neighbouring linear piece; see tests/models/test_deep_precision.py).
"""

from __future__ import annotations

import collections
import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.modules.with_act import BatchNormWithAct2d
from tests.zoo_models.models import INPUT, MODELS, build, is_batch_norm, names

MODEL_NAMES = names(pytest.mark.slow)
# Exporting takes 5 to 60 s a model here: the default run exports resnet18 only.
EXPORT_NAMES = names(pytest.mark.slow, default=("torchvision.resnet18",))
OURS = (batchnorm.BatchNorm2d, BatchNormWithAct2d)


def _step(model: nn.Module, x: torch.Tensor, train: bool | None):
    """Output, input gradient and parameter gradients of one forward and backward; dropout
    and stochastic depth draw the same numbers in every model. ``train``: the mode to set
    (None: the mode an exported program was captured in)."""
    if train is not None:
        model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(2)
    output = model(x)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape)
    (output * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return output.detach(), x.grad, grads


def _close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    """Each tensor within ``rtol`` of the largest value of its kind (gradients that are zero
    up to rounding, statistics of channels a ReLU emptied, are then compared at that scale)."""
    assert actual.keys() == expected.keys(), what
    scale = max(float(v.detach().double().abs().max()) for v in expected.values() if v.numel())
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value.double(), rtol=rtol,
                                   atol=rtol * scale, msg=f"{what} {key}")


def _types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_convert_both_ways(name):
    """Converted: every batch norm is ours, state dict unchanged, and a training step and an
    eval step give the unconverted model's outputs, gradients and running statistics.
    Converted back: the zoo's own classes, bit-equal outputs."""
    spec = MODELS[name]
    original = build(name)
    keys = list(original.state_dict())
    ours = batchnorm.convert(copy.deepcopy(original))
    norms = [m for m in ours.modules() if is_batch_norm(m)]
    assert len(norms) == spec.batch_norms and all(type(m) in OURS for m in norms)
    assert list(ours.state_dict()) == keys
    for key, value in original.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    back = batchnorm.convert(copy.deepcopy(ours), to="torch")
    assert _types(back) == _types(original)
    x = torch.randn(*INPUT)
    with torch.no_grad():
        assert torch.equal(back(x), original(x))

    reference, ours = original.double(), ours.double()
    x = x.double()
    for train in (True, False):
        got, expected = _step(ours, x, train), _step(reference, x, train)
        _close({"output": got[0], "input": got[1]},
               {"output": expected[0], "input": expected[1]}, 1e-9, "outputs")
        _close(got[2], expected[2], 1e-9, "gradient")
        _close(dict(ours.named_buffers()), dict(reference.named_buffers()), 1e-9, "buffer")


@pytest.mark.parametrize("converted", [False, True], ids=["zoo", "ours"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fold(name, converted):
    """Every batch norm after a convolution folds, every activation a fused layer holds is
    kept, the rest are named with the reason, and eval outputs are unchanged."""
    spec = MODELS[name]
    model = build(name)
    if converted:
        batchnorm.convert(model)
    folded, report = batchnorm.fold(model, return_report=True)
    assert report.method == "fx"
    assert len(report.folded) == spec.foldable and report.kept == []
    assert len(report.left) == spec.batch_norms - spec.foldable
    assert len(report.activations) == spec.activations
    for left in report.left:  # densenet's batch norms before their convolution
        assert report.reasons[left] == (
            "its input comes from cat, not from a convolution or linear layer"
        ), left
    assert not any(is_batch_norm(m) for m in folded.modules())
    x = torch.randn(*INPUT)
    with torch.no_grad():
        expected = model(x)
        error = (folded(x) - expected).abs().max() / expected.abs().max()
    assert error < 1e-5


def _ours(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return batchnorm.convert(build(name, dtype))


@pytest.mark.parametrize("name", EXPORT_NAMES)
def test_torch_export_in_training_and_eval(name):
    """The exported program of the converted model runs, differentiates and updates the
    running statistics as the eager model does (in float64, as the training steps above)."""
    x = torch.randn(*INPUT, dtype=torch.float64)
    for train in (True, False):
        model = _ours(name, torch.float64).train(train)
        eager = copy.deepcopy(model)
        exported = torch.export.export(model, (x,)).module()
        got, expected = _step(exported, x, None), _step(eager, x, train)
        _close({"output": got[0], "input": got[1]},
               {"output": expected[0], "input": expected[1]}, 1e-9, "outputs")
        _close(got[2], expected[2], 1e-9, "gradient")
        _close(dict(exported.named_buffers()), dict(eager.named_buffers()), 1e-9, "buffer")


def _onnx(model: nn.Module, x: torch.Tensor):
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


@pytest.mark.parametrize("name", EXPORT_NAMES)
def test_onnx(name):
    """onnxruntime runs the converted model's export with our outputs, and the graph has the
    operators of the unconverted model's export (every foldable batch norm in its conv)."""
    x = torch.randn(*INPUT)
    model = _ours(name)
    with torch.no_grad():
        expected = model(x)
    output, operators = _onnx(model, x)
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    _, zoo_operators = _onnx(build(name), x)
    assert operators == zoo_operators


@pytest.mark.parametrize("name", EXPORT_NAMES)
def test_fx_and_jit_trace(name):
    """torch.fx records each of our layers as one node, and the GraphModule trains and
    evaluates as the model does; torch.jit.trace records the eval model and the training
    step (float64, as above)."""
    spec = MODELS[name]
    model = _ours(name, torch.float64)
    x = torch.randn(*INPUT, dtype=torch.float64)
    for train in (True, False):
        # traced in the mode it runs in: fx fixes the zoo's own branches on self.training
        # (torchvision's stochastic depth); our layers, one node each, follow the mode anyway
        graph_module = torch.fx.symbolic_trace(model.train(train))
        modules = dict(graph_module.named_modules())
        ours = [n for n in graph_module.graph.nodes
                if n.op == "call_module" and type(modules[n.target]) in OURS]
        assert len(ours) == spec.batch_norms
        eager = copy.deepcopy(model)
        got, expected = _step(graph_module, x, train), _step(eager, x, train)
        _close({"output": got[0], "input": got[1]},
               {"output": expected[0], "input": expected[1]}, 1e-9, "fx outputs")
        _close(got[2], expected[2], 1e-9, "fx gradient")
        _close(dict(graph_module.named_buffers()), dict(eager.named_buffers()), 1e-9, "buffer")
    for train in (True, False):
        model.train(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit.trace's deprecation; our checks' warnings
            traced = torch.jit.trace(model, x)  # (runs the forward: statistics move)
        eager = copy.deepcopy(model)
        got, expected = _step(traced, x, None), _step(eager, x, train)
        _close({"output": got[0], "input": got[1]},
               {"output": expected[0], "input": expected[1]}, 1e-9, "traced outputs")
        _close(got[2], expected[2], 1e-9, "traced gradient")
