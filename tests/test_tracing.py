"""Graph capture and symbolic tools on our modules: torch.export and torch.jit.trace in training
and eval (outputs, gradients and running statistics against the eager module), torch.fx symbolic
tracing (one call_module node per layer), torch.jit.script (a clear refusal).

The library's own part is ``batchnorm/backends/traceable.py`` (what capture records) and
``batchnorm/tracing.py`` (fx and scripting), whose hooks every module's forward calls first.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.backends import traceable
from batchnorm.core.errors import BatchNormTypeError
from batchnorm.modules.with_act import BatchNormWithAct2d
from batchnorm.variants.frozen import FrozenBatchNormWithAct2d


def _trained(module: nn.Module, shape, steps: int = 3) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.uniform_(0.5, 1.5)
        module.train()
        for step in range(steps):
            module(torch.randn(*shape) * 2 + step)
    return module


def _conv_bn(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn)


# (model builder, input shape): every module and variant with a plain single-input forward.
CASES = {
    "BatchNorm1d": (lambda: nn.Sequential(nn.Linear(5, 4), batchnorm.BatchNorm1d(4)), (8, 5)),
    "BatchNorm2d": (lambda: _conv_bn(batchnorm.BatchNorm2d(4)), (8, 3, 5, 5)),
    "BatchNorm3d": (lambda: nn.Sequential(nn.Conv3d(3, 4, 1), batchnorm.BatchNorm3d(4)),
                    (4, 3, 3, 3, 3)),
    "BatchNorm2d_momentum_None": (lambda: _conv_bn(batchnorm.BatchNorm2d(4, momentum=None)),
                                  (8, 3, 5, 5)),
    "BatchNormWithAct2d_fused": (lambda: _conv_bn(BatchNormWithAct2d(4, act=nn.SiLU())),
                                 (8, 3, 5, 5)),
    "BatchNormWithAct2d_composed": (lambda: _conv_bn(BatchNormWithAct2d(4, act=nn.Hardswish())),
                                    (8, 3, 5, 5)),
    "FrozenBatchNorm2d": (lambda: _conv_bn(batchnorm.FrozenBatchNorm2d(4)), (8, 3, 5, 5)),
    "FrozenBatchNormWithAct2d": (lambda: _conv_bn(FrozenBatchNormWithAct2d(4, act=nn.ReLU())),
                                 (8, 3, 5, 5)),
}
EVAL_ONLY = {  # variants whose training forward is their own; their eval form is captured
    "BatchRenorm2d": (lambda: _conv_bn(batchnorm.BatchRenorm2d(4, r_max=2.0, d_max=1.0)),
                      (8, 3, 5, 5)),
    "GhostBatchNorm2d": (lambda: _conv_bn(batchnorm.GhostBatchNorm2d(4, virtual_batch_size=4)),
                         (8, 3, 5, 5)),
}


def _frozen_statistics(model: nn.Module) -> None:
    """Frozen layers are built with zeros and ones: give them statistics of their own."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, batchnorm.FrozenBatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)


def _model(case: str) -> tuple[nn.Module, tuple[int, ...]]:
    build, shape = {**CASES, **EVAL_ONLY}[case]
    model = _trained(build(), shape)
    _frozen_statistics(model)
    return model, shape


def _step(model, x):
    """Output, input gradient and parameter gradients of one forward and backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    output = model(x)
    (output * torch.linspace(-1, 1, output.numel()).reshape(output.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.detach(), x.grad, grads


def _assert_same_step(captured, eager, x):
    got, expected = _step(captured, x), _step(eager, x)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert got[2].keys() == expected[2].keys() and got[2]
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], msg=name)


def _assert_same_buffers(captured, eager):
    buffers = dict(captured.named_buffers())
    for name, value in eager.named_buffers():
        torch.testing.assert_close(buffers[name], value, msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_in_training_runs_differentiates_and_updates_statistics(case):
    model, shape = _model(case)
    eager = copy.deepcopy(model).train()
    model.train()
    torch.manual_seed(2)
    example = torch.randn(*shape)
    exported = torch.export.export(model, (example,)).module()
    _assert_same_buffers(exported, model)  # exporting changed nothing
    for step in range(2):
        _assert_same_step(exported, eager, torch.randn(*shape) + step)
    _assert_same_buffers(exported, eager)


@pytest.mark.parametrize("case", sorted(CASES) + sorted(EVAL_ONLY))
def test_export_in_eval_is_torch_inference_operator(case):
    model, shape = _model(case)
    model.eval()
    program = torch.export.export(model, (torch.randn(*shape),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("batch_norm" in t for t in targets) == 1, targets
    assert not any(".out" in t for t in targets), targets
    _assert_same_step(program.module(), copy.deepcopy(model), torch.randn(*shape))


def _trace(model, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's own notice
        # Our argument checks compare traced sizes: they run once, at trace time, and warn;
        # the graph does not depend on them (the tests below run it at other batch sizes).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, example)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jit_trace_in_training_follows_the_batch_size(case):
    """Traced at batch 8, run at batch 8 and 5: the statistics' count is no constant of the
    graph."""
    model, shape = _model(case)
    model.train()
    traced = _trace(model, torch.randn(*shape))  # runs the forward: the statistics move
    eager = copy.deepcopy(model)
    _assert_same_buffers(traced, eager)
    other = (5, *shape[1:])
    for size in (shape, other):
        _assert_same_step(traced, eager, torch.randn(*size))
    _assert_same_buffers(traced, eager)


@pytest.mark.parametrize("case", sorted(CASES) + sorted(EVAL_ONLY))
def test_jit_trace_in_eval(case):
    model, shape = _model(case)
    model.eval()
    traced = _trace(model, torch.randn(*shape))
    _assert_same_step(traced, copy.deepcopy(model), torch.randn(*shape))


def test_jit_trace_under_no_grad_still_differentiates():
    """A trace recorded without gradients holds no in-place or out= forms that would refuse
    autograd when the traced module trains."""
    model, shape = _model("BatchNorm2d")
    model.train()
    with torch.no_grad():
        traced = _trace(model, torch.randn(*shape))
    _assert_same_step(traced, copy.deepcopy(model), torch.randn(*shape))


def test_capturing_is_true_only_while_a_graph_is_recorded():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(traceable.capturing())
            return x + 1

    x = torch.randn(2, 3)
    Probe()(x)
    torch.export.export(Probe(), (x,))
    _trace(Probe(), x)
    torch.compile(Probe(), backend="eager", fullgraph=True)(x)
    # eager; export; jit.trace (then its check runs the Python forward again); compile
    assert seen[0] is False and seen[1] is True and seen[2] is True
    assert seen[-1] is False


@pytest.mark.parametrize("case", ["FrozenBatchNorm2d", "FrozenBatchNormWithAct2d",
                                  "BatchNormWithAct2d_fused", "BatchNormWithAct2d_composed"])
def test_fx_records_one_call_module_node_and_the_graph_module_behaves_as_the_model(case):
    model, shape = _model(case)
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1"]  # the conv, then our layer as one node (activation included)
    assert graph_module.get_submodule("1") is model[1]
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(graph_module, mode)()
        eager = copy.deepcopy(model)
        _assert_same_step(graph_module, eager, torch.randn(*shape))
        _assert_same_buffers(graph_module, eager)


def test_fx_refuses_our_layer_as_the_traced_root_with_a_clear_error():
    with pytest.raises(BatchNormTypeError, match="only as a part of the model it traces"):
        torch.fx.symbolic_trace(batchnorm.FrozenBatchNorm2d(3))


@pytest.mark.parametrize("case", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_fx_symbolic_trace_of_our_batch_norms(case):
    model, _ = _model(case)
    graph_module = torch.fx.symbolic_trace(model)
    assert [n.target for n in graph_module.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_fx_symbolic_trace_of_batch_norm_act():
    torch.fx.symbolic_trace(_conv_bn(batchnorm.BatchNormAct2d(4)))


def test_jit_script_stops_with_an_error_naming_what_works():
    model = _conv_bn(batchnorm.FrozenBatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(BatchNormTypeError, match=r"torch\.jit\.script cannot compile.*"
                                                     r"torch\.export\.export.*torch\.compile"):
            torch.jit.script(model)


@pytest.mark.parametrize("build", [lambda: batchnorm.BatchNorm2d(4),
                                   lambda: batchnorm.BatchNormAct2d(4)])
def test_jit_script_of_our_batch_norms_names_what_works(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(BatchNormTypeError, match="torch.export"):
            torch.jit.script(_conv_bn(build()))


def test_jit_trace_of_batch_norm_act():
    model = _trained(_conv_bn(batchnorm.BatchNormAct2d(4, activation="silu")), (8, 3, 5, 5))
    _trace(model.eval(), torch.randn(8, 3, 5, 5))


def test_the_functional_form_exports_in_training():
    """``batchnorm.functional.batch_norm`` updates the statistics it is given, under capture
    too (the protection stays a torch.where; no flag is read)."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))
            self.weight = nn.Parameter(torch.rand(3) + 0.5)

        def forward(self, x):
            return batchnorm.functional.batch_norm(
                x, self.mean, self.var, self.weight, None, training=True, momentum=0.5
            )

    x = torch.randn(6, 3, 4) * 3 + 1
    exported = torch.export.export(Functional(), (x,)).module()
    eager = Functional()
    with torch.no_grad():
        eager.weight.copy_(exported.weight)
    _assert_same_step(exported, eager, x)
    _assert_same_buffers(exported, eager)


def test_tracing_reads_no_finiteness_flag_into_the_graph():
    """Under jit.trace the protected update stays a torch.where: the flag is not read (reading
    it would freeze the traced batch's answer into the graph, with a TracerWarning)."""
    import linecache

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            return batchnorm.functional.batch_norm(x, self.mean, self.var, training=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(Functional(), torch.randn(6, 3))
    read = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
            and "finite" in linecache.getline(w.filename, w.lineno)]
    assert read == []
    before = traced.mean.clone(), traced.var.clone()
    x = torch.randn(6, 3)
    x[0, 1] = float("nan")  # a non-finite batch leaves the statistics unchanged
    traced(x)
    assert torch.equal(traced.mean, before[0]) and torch.equal(traced.var, before[1])
    traced(torch.randn(6, 3) + 5)  # a finite one moves them
    assert (traced.mean - before[0]).abs().min() > 0.1


def test_tracing_a_module_reads_no_finiteness_flag():
    """The module's warning about a non-finite batch reads the flag only outside a recording."""
    import linecache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(batchnorm.BatchNorm1d(3).train(), torch.randn(6, 3))
    read = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
            and "finite" in linecache.getline(w.filename, w.lineno)]
    assert read == []


def _prepare_fx_round_trip(model, shape):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = [torch.randn(*shape) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notices about its successor, torchao
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                              (batches[0],))
        with torch.no_grad():
            for x in batches:
                prepared(x)
        quantized = convert_fx(prepared)
    x = torch.cat(batches)
    with torch.no_grad():
        error = (quantized(x) - model(x)).abs().max() / model(x).abs().max()
    return quantized, error


@pytest.mark.parametrize("case", ["FrozenBatchNorm2d", "BatchNormWithAct2d_fused"])
def test_fx_quantization_takes_our_layer_as_one_float_layer(case):
    model, shape = _model(case)
    quantized, error = _prepare_fx_round_trip(model.eval(), shape)
    kinds = [type(m).__name__ for m in quantized.modules()]
    assert "Conv2d" in kinds and type(model[1]).__name__ in kinds  # ours kept, in float
    assert error < 0.05  # 8-bit rounding of the convolution


def test_fx_quantization_of_our_batch_norm():
    model, shape = _model("BatchNorm2d")
    _prepare_fx_round_trip(model.eval(), shape)
