"""The generic module checks of upstream's ``test/test_modules.py``, run on our batch norms.

Every test takes one input of one torch ``ModuleInfo`` entry (see ``cases.py``), builds our
module from it and checks what upstream checks for torch's. Upstream's parametrization is kept:
both modes (the entries set ``train_and_eval_differ``), the entry's dtypes (float32 and float64;
float64 only for the gradient checks, float32 only for ``.to()``), the CPU.

Not ported: ``test_cpu_gpu_parity`` (needs an accelerator; this torch is the CPU build) and
``test_check_inplace`` (only for modules with an ``inplace`` argument).
``test_multiple_device_transfer`` runs with the devices there are (here: the CPU alone).
``test_matches_torch`` and ``test_forward_mode_ad`` are ours: the first compares with torch's
module on the same input, the second applies to these inputs the forward-mode AD check that
upstream's ``test_ops.py`` runs on the ``nn.functional.batch_norm`` OpInfo (declared
``supports_forward_ad``).
"""

from __future__ import annotations

import copy
import io
import itertools
import re
from operator import methodcaller
from unittest.mock import patch

import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses.meta_utils import assert_metadata_eq

from tests.conftest import assert_close
from tests.torch_suite.cases import DEVICE, ERROR_CASES, dtype_name, module_params
from tests.torch_suite.torch_testing import (
    ModuleErrorEnum,
    common_utils,
    freeze_rng_state,
    get_tensors_from,
    gradcheck,
    gradgradcheck,
    mock_wrapper,
)


def map_tensors(obj, fn):
    """``fn`` applied to every tensor in nested tuples, lists and dicts; the rest unchanged."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {key: map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return obj


def assert_placed(module, device, dtype):
    """Every parameter and buffer on ``device``; the floating ones of ``dtype``."""
    device = torch.device(device)
    named = [("parameter", module.named_parameters()), ("buffer", module.named_buffers())]
    for kind, tensors in named:
        for name, tensor in tensors:
            assert tensor.device == device, f"{kind} {name} is on {tensor.device}, not {device}"
            if tensor.dtype.is_floating_point:
                assert tensor.dtype == dtype, f"{kind} {name} is {tensor.dtype}, not {dtype}"


def forward_args(module_input):
    return module_input.forward_input.args, module_input.forward_input.kwargs


# ---------------------------------------------------------------------------------------------
# construction, placement, representation, serialization


@pytest.mark.parametrize(("case", "dtype", "training"), module_params("test_forward"))
def test_forward(case, dtype, training):
    """Forward runs; with a reference, matches it; ``.float()``/``.double()`` keep it placed."""
    module_input = case.module_input(dtype, training)
    with freeze_rng_state():
        module = case.build(module_input, dtype, training)
        args, kwargs = forward_args(module_input)
        output = module(*args, **kwargs)
        if module_input.reference_fn is not None:
            torch.testing.assert_close(output, module_input.reference_fn(module, *args, **kwargs))
        convert = {torch.float32: methodcaller("float"), torch.float64: methodcaller("double")}
        if dtype in convert:
            convert[dtype](module)
            module(*args, **kwargs)
            assert_placed(module, DEVICE, dtype)


@pytest.mark.parametrize(("case", "dtype", "training"), module_params("test_factory_kwargs"))
def test_factory_kwargs(case, dtype, training):
    """``device=``/``dtype=`` given at construction reach every parameter and buffer created."""
    module_input = case.module_input(dtype, training)
    args, kwargs = module_input.constructor_input.args, dict(module_input.constructor_input.kwargs)

    # Watch the real Parameter.__new__ and register_buffer to see whether the module makes
    # tensors of its own (tensors not handed to the constructor).
    new_parameter = mock_wrapper(torch.nn.Parameter.__new__)
    register_buffer = mock_wrapper(torch.nn.Module.register_buffer)
    with patch.object(torch.nn.Parameter, "__new__", new_parameter), patch.object(
        torch.nn.Module, "register_buffer", register_buffer
    ):
        case.our_cls(*args, **kwargs).train(training)
    given = get_tensors_from(args, kwargs)
    makes_its_own = any(
        get_tensors_from(call_args, call_kwargs)
        and not given.intersection(get_tensors_from(call_args, call_kwargs))
        for watched in (new_parameter.mock, register_buffer.mock)
        for call_args, call_kwargs in watched.call_args_list
    )
    if not makes_its_own:
        return
    kwargs.update(device=DEVICE, dtype=dtype)
    module = case.our_cls(*args, **kwargs)
    module.train(training)
    assert_placed(module, DEVICE, dtype)


def _devices():
    devices = [DEVICE]
    if torch.accelerator.is_available():
        devices.append(torch.accelerator.current_accelerator().type)
    return devices


@pytest.mark.parametrize(
    ("case", "dtype", "training"), module_params("test_multiple_device_transfer")
)
def test_multiple_device_transfer(case, dtype, training):
    """Forward, move, forward again, for every device there is (upstream: an accelerator and
    the CPU; here the CPU alone unless torch sees an accelerator)."""
    inputs = {device: case.module_input(dtype, training, device=device) for device in _devices()}
    with freeze_rng_state():
        module = case.build(inputs[DEVICE], dtype, training)
        for device in [*inputs, DEVICE, *inputs]:
            module.to(device)
            args, kwargs = forward_args(inputs[device])
            module(*args, **kwargs)
            assert_placed(module, device, dtype)


@pytest.mark.parametrize(("case", "dtype", "training"), module_params("test_repr"))
def test_repr(case, dtype, training):
    module = case.build(case.module_input(dtype, training), dtype, training)
    repr(module)
    str(module)


@pytest.mark.parametrize(("case", "dtype", "training"), module_params("test_save_load"))
def test_save_load(case, dtype, training):
    """A saved and loaded module gives the same output; a state dict survives saving, also when
    loaded with ``weights_only=True``."""
    module_input = case.module_input(dtype, training)
    with freeze_rng_state():
        module = case.build(module_input, dtype, training)
        state = module.state_dict()
        args, kwargs = forward_args(module_input)
        output = module(*args, **kwargs)

        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # a whole module: needs pickle
        torch.testing.assert_close(loaded(*args, **kwargs), output)

        buffer = io.BytesIO()
        torch.save(state, buffer)
        for weights_only in (False, True):
            buffer.seek(0)
            torch.testing.assert_close(torch.load(buffer, weights_only=weights_only), state)


@pytest.mark.parametrize(
    ("case", "dtype", "training"),
    module_params("test_device_ctx_init", test_class="TestModuleCPUOnly"),
)
def test_device_ctx_init(case, dtype, training):
    """Built under ``torch.device("meta")``, parameters and buffers are meta tensors with the
    metadata (shape, dtype, strides, requires_grad...) of the CPU-built module's."""
    on_cpu = case.module_input(dtype, training)
    with torch.device("meta"):
        on_meta = case.module_input(dtype, training, device=None)
    cpu_module = case.our_cls(*on_cpu.constructor_input.args, **on_cpu.constructor_input.kwargs)
    with torch.device("meta"):
        meta_module = case.our_cls(
            *on_meta.constructor_input.args, **on_meta.constructor_input.kwargs
        )

    def assert_equal(a, b, *args, **kwargs):
        assert a == b, f"{a!r} != {b!r}"

    pairs = itertools.chain(
        zip(meta_module.parameters(), cpu_module.parameters(), strict=True),
        zip(meta_module.buffers(), cpu_module.buffers(), strict=True),
    )
    for on_meta_tensor, on_cpu_tensor in pairs:
        assert on_meta_tensor.is_meta
        assert_metadata_eq(assert_equal, on_meta_tensor, on_cpu_tensor)


@pytest.mark.parametrize(
    ("case", "dtype", "training", "swap", "set_grad"),
    module_params(
        "test_to", dtypes=[torch.float32], extra={"swap": [True, False], "set_grad": [True, False]}
    ),
)
def test_to(case, dtype, training, swap, set_grad):
    """``module.to(device, dtype)`` over the entry's dtypes keeps parameters ``Parameter``s,
    and either swaps their payload in place (swap) or assigns ``.data`` (no swap), grads too."""
    module_input = case.module_input(dtype, training)
    args, kwargs = forward_args(module_input)
    with common_utils.SwapTensorsGuard(swap):
        module = case.our_cls(
            *module_input.constructor_input.args, **module_input.constructor_input.kwargs
        )

        # placed by hand: .to() is what is under test
        for name, parameter in list(module.named_parameters(recurse=False)):
            fresh = torch.nn.Parameter(parameter.detach().clone().to(DEVICE, dtype))
            setattr(module, name, fresh)
            if set_grad:
                fresh.grad = torch.randn_like(fresh)
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.detach().clone().to(DEVICE, dtype))

        parameters = lambda: list(module.parameters())  # noqa: E731
        if swap and not set_grad and parameters():
            output = module(*args, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            output.sum().backward()
            module.to(dtype=torch.half)
            module.to(dtype=torch.float32)

        previous = (DEVICE, dtype)
        for device, target_dtype in itertools.product(_devices(), case.info.dtypes):
            grad_unchanged = (device, target_dtype) == previous
            previous = (device, target_dtype)
            ids = [id(p) for p in parameters()]
            payloads = [p._cdata for p in parameters()]
            if set_grad:
                grad_ids = [id(p.grad) for p in parameters()]
                grad_payloads = [p.grad._cdata for p in parameters()]

            module.to(device=device, dtype=target_dtype)

            assert all(isinstance(p, torch.nn.Parameter) for p in parameters())
            assert all(p.device.type == device for p in parameters())
            assert all(p.dtype == target_dtype for p in parameters())
            assert [id(p) for p in parameters()] == ids
            new_payloads = [p._cdata for p in parameters()]
            if set_grad:
                assert all(p.grad.device.type == device for p in parameters())
                assert all(p.grad.dtype == target_dtype for p in parameters())
                new_grad_payloads = [p.grad._cdata for p in parameters()]
            if swap:
                assert all(a != b for a, b in zip(payloads, new_payloads, strict=True))
                if set_grad:
                    same = [a == b for a, b in zip(grad_payloads, new_grad_payloads, strict=True)]
                    assert all(s == grad_unchanged for s in same)
            else:
                assert new_payloads == payloads
                if set_grad:
                    assert new_grad_payloads == grad_payloads
                    assert [id(p.grad) for p in parameters()] == grad_ids


@pytest.mark.parametrize(
    ("case", "dtype", "training", "swap"),
    module_params("test_to_empty", dtypes=[torch.float32], extra={"swap": [True, False]}),
)
def test_to_empty(case, dtype, training, swap):
    """A module built on the meta device and moved with ``to_empty`` has real parameters
    (the same objects when swapping, new ones otherwise)."""
    with torch.device("meta"):
        module_input = case.module_input(dtype, training, device=None)
    with common_utils.SwapTensorsGuard(swap):
        with torch.device("meta"):
            module = case.our_cls(
                *module_input.constructor_input.args, **module_input.constructor_input.kwargs
            )
        ids = [id(p) for p in module.parameters()]
        payloads = [p._cdata for p in module.parameters()]
        module.to_empty(device=DEVICE)
        parameters = list(module.parameters())
        assert all(isinstance(p, torch.nn.Parameter) for p in parameters)
        assert all(p.device == torch.device(DEVICE) for p in parameters)
        assert all(p.dtype == dtype for p in parameters)
        assert all(a != b for a, b in zip(payloads, [p._cdata for p in parameters], strict=True))
        same_objects = [a == b for a, b in zip(ids, [id(p) for p in parameters], strict=True)]
        assert all(same_objects) if swap else not any(same_objects)


# ---------------------------------------------------------------------------------------------
# the mode flag, bad input


@pytest.mark.parametrize(
    ("case", "dtype", "training"),
    module_params("test_if_train_and_eval_modes_differ", modes=("train",)),
)
def test_if_train_and_eval_modes_differ(case, dtype, training):
    """The entry says train and eval differ; the forward must then read ``self.training``
    (deleting the attribute makes the forward fail on it), and if it reads it the entry's flag
    must say so."""
    module_input = case.module_input(dtype, training)
    module = case.build(module_input, dtype, training)
    del module.training
    args, kwargs = forward_args(module_input)
    try:
        module(*args, **kwargs)
    except AttributeError as error:
        if "'training'" not in str(error):
            raise
        assert case.info.train_and_eval_differ
    else:
        assert not case.info.train_and_eval_differ, "the forward never read self.training"


def _error_params():
    return [
        pytest.param(case, dtype, id=f"{case.name}-{case.desc}-{dtype_name(dtype)}")
        for case in ERROR_CASES
        for dtype in case.info.dtypes
    ]


def _raise_as_upstream(case, dtype):
    """Run the error input the way upstream does; return what was raised (None if nothing)."""
    error_input = case.error_input(dtype)
    module_input = error_input.module_error_input
    c_args, c_kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        try:
            case.our_cls(*c_args, **c_kwargs)
        except Exception as error:
            return error_input, error
        return error_input, None
    assert error_input.error_on == ModuleErrorEnum.FORWARD_ERROR
    # upstream builds the module outside its assertRaises: an error here fails the test
    try:
        module = case.our_cls(*c_args, **c_kwargs)
    except Exception as error:
        pytest.fail(
            f"construction raised {type(error).__name__}: {error}; torch constructs the module "
            f"and raises {error_input.error_type.__name__} at the forward"
        )
    f_args, f_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
    try:
        module(*f_args, **f_kwargs)
    except Exception as error:
        return error_input, error
    return error_input, None


@pytest.mark.parametrize(("case", "dtype"), _error_params())
def test_errors(case, dtype):
    """The entry's bad inputs raise, at the step torch raises at (construction or forward),
    an exception catchable as the type torch's test expects. The message is checked apart
    (``test_errors_message``): ours are our own."""
    error_input, error = _raise_as_upstream(case, dtype)
    assert error is not None, f"nothing raised; torch raises {error_input.error_type.__name__}"
    assert isinstance(error, error_input.error_type), (
        f"raised {type(error).__name__}: {error}; torch's test expects a "
        f"{error_input.error_type.__name__}"
    )


@pytest.mark.parametrize(("case", "dtype"), _error_params())
def test_errors_message(case, dtype):
    """The message matches torch's regex, as upstream's ``assertRaisesRegex`` requires."""
    error_input, error = _raise_as_upstream(case, dtype)
    assert error is not None
    assert re.search(error_input.error_regex, str(error)), (
        f"torch's test expects a message matching {error_input.error_regex!r}, ours: {error}"
    )


# ---------------------------------------------------------------------------------------------
# gradients, layouts


def _make_non_contiguous(obj):
    def spread(tensor):
        if tensor.dim() == 0:
            return tensor
        # every value twice along the last axis, then every other one: same values, strided
        strided = tensor.repeat_interleave(2, dim=-1)[..., ::2].detach()
        strided.requires_grad_(tensor.requires_grad)
        return strided

    return map_tensors(obj, spread)


def _grads(obj):
    return map_tensors(obj, lambda tensor: tensor.grad if tensor.requires_grad else None)


def _clear_grads(obj):
    def clear(tensor):
        tensor.grad = None

    map_tensors(obj, clear)


@pytest.mark.parametrize(
    ("case", "dtype", "training"), module_params("test_non_contiguous_tensors")
)
def test_non_contiguous_tensors(case, dtype, training):
    """Strided inputs and output gradients give the outputs and gradients of contiguous ones."""
    module_input = case.module_input(dtype, training, requires_grad=True)
    args, kwargs = forward_args(module_input)
    module = case.build(module_input, dtype, training)
    map_tensors((args, kwargs), lambda t: t.retain_grad() if t.requires_grad else None)

    with freeze_rng_state():
        expected_output = module(*args, **kwargs)
        grad_output = expected_output.detach().clone().normal_()
        expected_output.backward(grad_output, retain_graph=True)
    expected_input_grads = copy.deepcopy(_grads((args, kwargs)))
    expected_param_grads = copy.deepcopy([p.grad for p in module.parameters()])

    inputs = [(args, kwargs), _make_non_contiguous((args, kwargs))]
    grad_outputs = [grad_output, _make_non_contiguous(grad_output)]
    for (in_args, in_kwargs), g in itertools.product(inputs, grad_outputs):
        _clear_grads((in_args, in_kwargs))
        _clear_grads(list(module.parameters()))
        with freeze_rng_state():
            output = module(*in_args, **in_kwargs)
            output.backward(copy.deepcopy(g), retain_graph=True)
        torch.testing.assert_close(output, expected_output)
        torch.testing.assert_close(
            _grads((in_args, in_kwargs)), expected_input_grads, atol=1e-4, rtol=0
        )
        torch.testing.assert_close([p.grad for p in module.parameters()], expected_param_grads)


def _gradient_check(case, dtype, training, check, fast_mode=None):
    """``check`` (gradcheck or gradgradcheck) of the output against the input and all
    parameters together, then against the input with each parameter on its own. ``fast_mode``
    None is the entry's choice (torch's wrapper then defaults to the fast check)."""
    module_input = case.module_input(dtype, training, requires_grad=True)
    module = case.build(module_input, dtype, training)
    parameters = tuple(module.parameters())
    args, kwargs = forward_args(module_input)
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    other_kwargs = {k: v for k, v in kwargs.items() if k not in tensor_kwargs}

    def run(*flat):
        grouped = pytree.tree_unflatten(list(flat), spec)
        new_args, new_kwargs = grouped[0], dict(zip(tensor_kwargs, grouped[2], strict=True))
        with freeze_rng_state():
            return pytree.tree_leaves(module(*new_args, **new_kwargs, **other_kwargs))

    def checked():
        nonlocal spec
        flat, spec = pytree.tree_flatten((args, parameters, tuple(tensor_kwargs.values())))
        mode = case.info.gradcheck_fast_mode if fast_mode is None else fast_mode
        assert check(run, flat, nondet_tol=0.0, fast_mode=mode)

    spec = None
    checked()  # the total derivative
    wanted = [t.requires_grad for t in (*parameters, *tensor_kwargs.values())]
    for tensor in (*parameters, *tensor_kwargs.values()):
        tensor.requires_grad_(False)
    for tensor, wants in zip((*parameters, *tensor_kwargs.values()), wanted, strict=True):
        tensor.requires_grad_(wants)  # one partial derivative at a time
        checked()
        tensor.requires_grad_(False)


@pytest.mark.parametrize(
    ("case", "dtype", "training"), module_params("test_grad", dtypes=[torch.float64])
)
def test_grad(case, dtype, training):
    _gradient_check(case, dtype, training, gradcheck)


@pytest.mark.parametrize(
    ("case", "dtype", "training"), module_params("test_gradgrad", dtypes=[torch.float64])
)
def test_gradgrad(case, dtype, training):
    assert case.info.supports_gradgrad
    _gradient_check(case, dtype, training, gradgradcheck)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "dtype", "training"), module_params("test_grad", dtypes=[torch.float64])
)
def test_grad_full_jacobian(case, dtype, training):
    """test_grad as upstream's slow-gradcheck CI runs it (PYTORCH_TEST_WITH_SLOW_GRADCHECK=1):
    every column of the Jacobian instead of one random projection."""
    _gradient_check(case, dtype, training, gradcheck, fast_mode=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "dtype", "training"), module_params("test_gradgrad", dtypes=[torch.float64])
)
def test_gradgrad_full_jacobian(case, dtype, training):
    """test_gradgrad with the full Jacobian (see test_grad_full_jacobian)."""
    _gradient_check(case, dtype, training, gradgradcheck, fast_mode=False)


# torch's forward-AD decompositions script functions when first used (a torch deprecation)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("case", "dtype", "training"), module_params("test_forward_mode_ad", dtypes=[torch.float64])
)
def test_forward_mode_ad(case, dtype, training):
    """Forward-mode AD (jvp) agrees with finite differences, against input and parameters."""
    module_input = case.module_input(dtype, training, requires_grad=True)
    module = case.build(module_input, dtype, training)
    args, kwargs = forward_args(module_input)
    names = [name for name, _ in module.named_parameters()]
    inputs = (*args, *module.parameters())

    def run(*flat):
        with freeze_rng_state():
            parameters = dict(zip(names, flat[len(args):], strict=True))
            return torch.func.functional_call(module, parameters, flat[: len(args)], kwargs)

    assert gradcheck(
        run, inputs, check_forward_ad=True, check_backward_ad=False, check_batched_grad=False,
        check_undefined_grad=False,
    )


def _memory_formats(module_input):
    """(input formats, module formats) as upstream: channels_last for 4D, _3d for 5D."""
    dims = {t.dim() for t in pytree.tree_leaves(module_input.forward_input.args)
            if isinstance(t, torch.Tensor)}
    special = (
        torch.channels_last if 4 in dims else torch.channels_last_3d if 5 in dims else None
    )
    inputs = [torch.contiguous_format] + ([special] if special else [])
    modules = [torch.preserve_format, torch.contiguous_format] + ([special] if special else [])
    return inputs, modules


def _to_memory_format(obj, memory_format):
    def convert(tensor):
        fits = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(memory_format)
        copied = tensor.clone()
        if fits is None or tensor.dim() == fits:
            copied = copied.to(memory_format=memory_format)
        return copied.detach().requires_grad_(tensor.requires_grad)

    return map_tensors(obj, convert)


def _assert_output_format(obj, input_format, module_format, module_affects_output):
    def check(tensor):
        for dim, special in ((4, torch.channels_last), (5, torch.channels_last_3d)):
            if tensor.dim() == dim and (
                input_format == special or (module_format == special and module_affects_output)
            ):
                assert tensor.is_contiguous(memory_format=special), f"not {special}"
                return
        assert tensor.is_contiguous(), "output not contiguous"

    map_tensors(obj, check)


@pytest.mark.parametrize(("case", "dtype", "training"), module_params("test_memory_format"))
def test_memory_format(case, dtype, training):
    """channels_last inputs (and modules) give the contiguous result, in the input's layout;
    in training the gradients too."""
    module_input = case.module_input(dtype, training, requires_grad=True)
    input_formats, module_formats = _memory_formats(module_input)
    affects = case.info.module_memformat_affects_out

    def differentiable(tree):
        leaves = pytree.tree_leaves(tree)
        return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

    with freeze_rng_state():
        module = case.build(module_input, dtype, training)
        args, kwargs = forward_args(module_input)
        expected = module(*args, **kwargs)
        outputs = differentiable(expected)
        if training and outputs:
            grad_outputs = [torch.rand_like(t) for t in outputs]
            expected_grads = torch.autograd.grad(
                outputs, differentiable((args, kwargs, list(module.parameters()))), grad_outputs
            )
        for input_format in input_formats:
            f_args = _to_memory_format(module_input.forward_input.args, input_format)
            f_kwargs = _to_memory_format(module_input.forward_input.kwargs, input_format)
            for module_format in module_formats:
                module.to(memory_format=module_format)
                output = module(*f_args, **f_kwargs)
                changed = (input_format, module_format) != (torch.contiguous_format,) * 2
                if changed:
                    torch.testing.assert_close(output, expected)
                _assert_output_format(output, input_format, module_format, affects)
                outputs = differentiable(output)
                if training and outputs:
                    same_grads = [
                        torch.empty_like(o).copy_(g)
                        for o, g in zip(outputs, grad_outputs, strict=True)
                    ]
                    grads = torch.autograd.grad(
                        outputs,
                        differentiable((f_args, f_kwargs, list(module.parameters()))),
                        same_grads,
                    )
                    if changed:
                        torch.testing.assert_close(grads, expected_grads)
                    _assert_output_format(grads, input_format, module_format, affects)


# ---------------------------------------------------------------------------------------------
# ours: the same input through torch's module


def _randomize_affine(module, generator):
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator))


@pytest.mark.parametrize(("case", "dtype", "training"), module_params("test_matches_torch"))
def test_matches_torch(case, dtype, training):
    """Our module and torch's, built from the same arguments and holding the same state, give
    the same repr, state-dict keys, outputs, running statistics and gradients over two steps."""
    module_input = case.module_input(dtype, training, requires_grad=True)
    ours = case.build(module_input, dtype, training)
    theirs = case.build(module_input, dtype, training, cls=case.torch_cls)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomize_affine(ours, torch.Generator().manual_seed(1))
    theirs.load_state_dict(ours.state_dict())

    (x,), _ = forward_args(module_input)
    for step in range(2):
        x_ours = (x.detach() + step).requires_grad_()
        x_theirs = x_ours.detach().clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        assert y_ours.dtype == y_theirs.dtype and y_ours.shape == y_theirs.shape
        assert_close(y_ours, y_theirs, dtype)
        for name, buffer in theirs.named_buffers():
            if buffer.is_floating_point():
                assert_close(ours.get_buffer(name), buffer, dtype)
            else:
                assert torch.equal(ours.get_buffer(name), buffer), name
        grad_output = torch.randn_like(y_theirs)
        ours_grads = torch.autograd.grad(y_ours, [x_ours, *ours.parameters()], grad_output)
        theirs_grads = torch.autograd.grad(y_theirs, [x_theirs, *theirs.parameters()], grad_output)
        for ours_grad, theirs_grad in zip(ours_grads, theirs_grads, strict=True):
            assert_close(ours_grad, theirs_grad, dtype)
