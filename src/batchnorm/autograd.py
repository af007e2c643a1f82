"""Autograd Functions: batch norm's forward and its closed-form backward.

Both Functions call the backend that ``batchnorm.dispatch`` selects. The backward is the closed
form from ``batchnorm.core.normalize``, not autograd through the forward's operations.

Double backward: when the backward itself runs with grad enabled (``create_graph=True``, as in a
gradient penalty), the statistics are recomputed from the saved input with differentiable
operations and the closed-form gradient is built from torch operations, so autograd can
differentiate it again, including the dependence of the batch mean and variance on the input.

The Functions use the ``setup_context`` form with ``generate_vmap_rule``, so they compose with
``torch.func`` (vmap, grad, functional_call). That form binds its arguments with ``inspect`` on
every call, which costs more than a small batch norm itself, so outside ``torch.func``
transforms :func:`apply_train` and :func:`apply_eval` use twins in the classic ``ctx`` form
that share the same forward, context and backward.

A training call that also updates running statistics, outside transforms, compile and
forward-mode AD (every training step of a model), takes :func:`apply_train_update`: one
Function whose forward computes the output and batch statistics and writes the running
statistics in place, and returns the output alone (with the finiteness flag, a plain value).
It has the same backward; it spares a Function that returns three tensors and the hops around
it, which on small layers cost more than the arithmetic.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from batchnorm.backends import eager
from batchnorm.core import tangents
from batchnorm.core.context import (
    is_functorch_wrapped,
    is_legacy_batched,
    is_opaque,
    transforms_active,
)
from batchnorm.core.moments import batch_moments
from batchnorm.dispatch import select_backend

try:  # the CPU kernels' backend: its compiled call path hands some backwards back here
    from batchnorm.backends import cpu as _cpu
except Exception:  # noqa: BLE001 - as batchnorm.dispatch: no kernels, the eager backend serves
    _cpu = None


def _cast_grads(grads, inputs):
    """Each gradient in its input's dtype (the kernels may return the accumulation dtype)."""
    if all(g is None or g.dtype == t.dtype for g, t in zip(grads, inputs, strict=True)):
        return grads  # the usual case: nothing to cast, no new tuple
    return tuple(
        grad if grad is None or grad.dtype == tensor.dtype else grad.to(tensor.dtype)
        for grad, tensor in zip(grads, inputs, strict=True)
    )


class BatchNormTrain(torch.autograd.Function):
    """Normalize with the batch's own statistics. Outputs (y, mean, biased variance)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps, mask=None):
        if mask is None:
            return select_backend(x).train_forward(x, weight, bias, eps)
        return select_backend(x, mask).train_forward(x, weight, bias, eps, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, mask = inputs
        _, mean, variance = output
        ctx.save_for_backward(x, weight, bias, mean, variance, mask)
        ctx.save_for_forward(x, weight, mean, variance, mask)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, variance)
        # the statistics never carry a gradient: no zero tensors made up for them every step
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        return (*_train_grads(ctx, grad_out), None, None)

    @staticmethod
    def jvp(ctx, x_tangent, weight_tangent, bias_tangent, _eps_tangent, _mask_tangent):
        x, weight, mean, variance, mask = ctx.saved_tensors
        tangent = tangents.train_output_tangent(
            x, weight, mean, variance, ctx.eps, x_tangent, weight_tangent, bias_tangent, mask
        )
        return tangent, None, None


def _train_grads(ctx, grad_out):
    """(dx, dweight, dbias) of a training Function whose context saved
    ``(x, weight, bias, mean, variance, mask)`` and ``eps``."""
    if grad_out is None:  # no gradient reached the output (gradcheck tries this case)
        return None, None, None
    x, weight, bias, mean, variance, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        mean, variance = batch_moments(x, mask)
    args = (grad_out, x, mean, variance, weight, ctx.eps, needs)
    if mask is not None:
        args = (*args, mask)
    grads = _run_backward("train_backward", args, grad_out, x, mask,
                          getattr(ctx, "backend", None))
    return _cast_grads(grads, (x, weight, bias))


class _BatchNormTrainUpdate(torch.autograd.Function):
    """Normalize with the batch's statistics and update the running statistics in place, in
    one Function (classic form: no transforms, compile or forward-mode AD come here). Outputs
    ``(y, finite)``, the flag as the backend returns it (a bool, or a 0-dim bool tensor)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rest):
        # all but the differentiable inputs travel as one tuple: Function.apply walks every
        # argument (the mask needs no gradient: it is saved, not an input)
        eps, mask, backend, running_mean, running_var, momentum, count, checked, tracked = rest
        fused = getattr(backend, "train_forward_update", None) if mask is None else None
        if checked:  # the backend accepted the call (its train_common): nothing asked again
            output, mean, variance, finite = fused(
                x, weight, bias, eps, running_mean, running_var, momentum, count, checked=True,
                tracked=tracked,
            )
        elif fused is not None:  # one backend call for the output and both statistics
            output, mean, variance, finite = fused(
                x, weight, bias, eps, running_mean, running_var, momentum, count
            )
        else:
            if mask is None:
                output, mean, variance = backend.train_forward(x, weight, bias, eps)
            else:
                output, mean, variance = backend.train_forward(x, weight, bias, eps, mask)
            _, _, finite = backend.updated_running_stats(
                running_mean, running_var, mean, variance, momentum, count, in_place=True
            )
        if checked:  # (weight and bias are dense vectors of x's dtype: the backward's casts
            # and mask have nothing to do, and bias no part in the gradients)
            ctx.save_for_backward(x, weight, mean, variance)
        else:
            ctx.save_for_backward(x, weight, bias, mean, variance, mask)
        ctx.eps, ctx.backend, ctx.checked = eps, backend, checked
        if isinstance(finite, torch.Tensor):
            ctx.mark_non_differentiable(finite)
        ctx.set_materialize_grads(False)
        return output, finite

    @staticmethod
    def backward(ctx, grad_out, _grad_finite):
        if not ctx.checked:
            return (*_train_grads(ctx, grad_out), None)
        # A common step (its backend accepted the step; it saved x, weight, mean, variance):
        # the backend's own ``backward_common`` for a first-order backward (grad disabled),
        # outside torch.func transforms, of a gradient with memory of its own; any other
        # (double backward, a batched gradient) takes the general path. The questions are
        # asked here, not in a helper: inside a model each Python frame on this path runs with
        # cold caches (see ``call_backward_directly``), and this one is on every backward.
        # (``batchnorm.modules.norm_act`` asks the same of its fused step.)
        if grad_out is not None and not (
            torch.is_grad_enabled()
            or transforms_active()
            or is_functorch_wrapped(grad_out)
            or is_legacy_batched(grad_out)
        ):
            x, weight, mean, variance = ctx.saved_tensors
            return (*ctx.backend.backward_common(grad_out, x, mean, variance, weight, None,
                                                 ctx.eps, ctx.needs_input_grad[:3]), None)
        return (*_common_grads(ctx, grad_out), None)


def _common_grads(ctx, grad_out):
    """(dx, dweight, dbias) of a common training step, which saved ``(x, weight, mean,
    variance)``, where its backend's ``backward_common`` does not apply (see
    ``_BatchNormTrainUpdate.backward``): the general path, as :func:`_train_grads` takes it."""
    if grad_out is None:
        return None, None, None
    x, weight, mean, variance = ctx.saved_tensors
    return _general_common_grads(grad_out, x, weight, mean, variance, ctx.eps,
                                 ctx.needs_input_grad[:3])


def _general_common_grads(grad_out, x, weight, mean, variance, eps, needs):
    if torch.is_grad_enabled():
        mean, variance = batch_moments(x, None)
    grads = _run_backward("train_backward", (grad_out, x, mean, variance, weight, eps, needs),
                          grad_out, x)
    return _cast_grads(grads, (x, weight, weight))  # (bias has weight's dtype here)


def native_step_grads(grad_out, x, weight, bias, mean, variance, eps, needs):
    """(dx, dweight, dbias) of a common training step taken by the compiled call path
    (``batchnorm.backends.cpu.native``), whose autograd node hands back what its kernel call
    does not take: a double backward, a batched or opaque gradient, a transform active, a
    gradient of another layout. The same answers as the Python step's backward
    (``_BatchNormTrainUpdate.backward``) gives."""
    if not (
        torch.is_grad_enabled()
        or transforms_active()
        or is_functorch_wrapped(grad_out)
        or is_legacy_batched(grad_out)
    ):
        return _cpu.backward_common(grad_out, x, mean, variance, weight, None, eps,
                                                 needs)
    return _general_common_grads(grad_out, x, weight, mean, variance, eps, needs)


if _cpu is not None:
    _cpu.native_path.register_backward_fallback(0, native_step_grads)  # (identity)


def call_backward_directly(function: type[torch.autograd.Function]) -> None:
    """Have autograd run ``function.backward`` as its node's ``apply``.

    Autograd calls a Python Function's backward through the node's ``apply``, which torch
    writes in Python (``BackwardCFunction.apply``): two more frames that find the user's
    backward and check it against ``vjp`` before calling it. Inside a model every Python frame
    on this path runs with caches the layers before have filled, so for the Functions of the
    common training step (a backward and no ``vjp``, gradients not boxed) the node's ``apply``
    is the backward itself: the same arguments, the same results, two frames fewer (about 7%
    of the backward of a 4x128x6x6 layer inside a conv stack, ``scripts/backward_floor.py``).
    A torch without that node class, or a Function that is not of that kind, is left as it
    is."""
    node = getattr(function, "_backward_cls", None)
    backward = function.__dict__.get("backward")
    if (
        node is None
        or not isinstance(backward, staticmethod)  # (a Function written with vjp has none)
        or getattr(function, "boxed_grads_call", False)
        or not callable(getattr(node, "apply", None))
    ):
        return
    node.apply = backward.__func__


call_backward_directly(_BatchNormTrainUpdate)


# The common training step applies the Function without ``Function.apply``'s Python wrapper,
# whose work (a closure, the setup_context question, the transforms question, unwrapping dead
# torch.func wrappers) the common call has no use for: the backend accepted plain tensors
# outside transforms. What remains is torch's own apply, bound to the class.
try:
    _apply_common_step = super(torch.autograd.Function, _BatchNormTrainUpdate).apply
except AttributeError:  # a torch whose Function has no C apply below it
    _apply_common_step = _BatchNormTrainUpdate.apply


def apply_train_update(x, weight, bias, eps, mask, backend, running_mean, running_var,
                       momentum, count, checked=False, tracked=None):
    """``(output, finite)`` with the running statistics updated in place, for a call that
    needs gradients; None where this path does not serve (compile, transforms, forward-mode
    AD): the caller then takes :func:`apply_train` and updates apart.

    ``checked``: the caller has asked those questions and the backend has accepted the call as
    its common one (``batchnorm.functional.train_common``), with ``tracked``, the count of
    batches it counts (or None)."""
    if checked:
        return _apply_common_step(
            x, weight, bias,
            (eps, mask, backend, running_mean, running_var, momentum, count, checked, tracked),
        )
    if torch.compiler.is_compiling() or transforms_active() or forward_ad._current_level >= 0:
        return None
    return _BatchNormTrainUpdate.apply(
        x, weight, bias,
        (eps, mask, backend, running_mean, running_var, momentum, count, checked, tracked),
    )


class BatchNormEval(torch.autograd.Function):
    """Normalize with given (running) statistics. The statistics receive no gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mean, variance, weight, bias, eps):
        return select_backend(x).eval_forward(x, mean, variance, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, variance, weight, bias, eps = inputs
        ctx.save_for_backward(x, mean, variance, weight, bias)
        ctx.save_for_forward(x, mean, variance, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, variance, weight, bias = ctx.saved_tensors
        needs_input, _, _, needs_weight, needs_bias, _ = ctx.needs_input_grad
        needs = (needs_input, needs_weight, needs_bias)
        args = (grad_out, x, mean, variance, weight, ctx.eps, needs)
        grads = _run_backward("eval_backward", args, grad_out, x)
        dx, dw, db = _cast_grads(grads, (x, weight, bias))
        return dx, None, None, dw, db, None

    @staticmethod
    def jvp(ctx, x_tangent, _mean_tangent, _var_tangent, weight_tangent, bias_tangent, _eps):
        x, mean, variance, weight = ctx.saved_tensors
        return tangents.eval_output_tangent(
            x, mean, variance, weight, ctx.eps, x_tangent, weight_tangent, bias_tangent
        )


def _run_backward(entry: str, args: tuple, grad_out, x, mask=None, backend=None):
    """Call a backward entry on the right backend (``backend``: the one the forward ran on,
    when it said; else chosen here).

    Double backward (grad enabled) takes the eager path, whose operations autograd
    differentiates. A batched incoming gradient (a vmapped backward, as
    ``autograd.grad(..., is_grads_batched=True)``, vectorized Jacobians and gradcheck's batched
    check run it) has no memory a kernel could read, and the older vmap that gradcheck uses has
    no batching rule for the in-place and ``out=`` forms the eager path takes outside autograd:
    it runs the eager path's differentiable (out-of-place) form on detached operands."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return getattr(eager, entry)(*args)
    if backend is not None and not (
        # (is_opaque's two questions asked here: one call less on every backward, see
        # batchnorm.modules.batchnorm on the cost of each call inside a model)
        transforms_active() or is_functorch_wrapped(grad_out) or is_legacy_batched(grad_out)
    ):
        return getattr(backend, entry)(*args)
    if is_opaque(grad_out) or transforms_active():
        args = tuple(
            a.detach() if isinstance(a, torch.Tensor) and not is_opaque(a) else a for a in args
        )
        with torch.enable_grad():  # selects the out-of-place form; nothing here records
            return getattr(eager, entry)(*args)
    if backend is None:
        backend = select_backend(x, mask)
    return getattr(backend, entry)(*args)


def _classic(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function in the classic form (forward takes ctx), without argument binding."""

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    return type(
        function.__name__ + "Classic",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(function.backward),
            "jvp": staticmethod(function.jvp),
        },
    )


def _without_jvp(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function without its ``jvp``, for ``torch.compile``: Dynamo refuses to trace a
    Function that defines one (forward-mode AD and compile do not meet in practice)."""
    return type(
        function.__name__ + "Compiled",
        (torch.autograd.Function,),
        {
            "generate_vmap_rule": True,
            "forward": staticmethod(function.forward),
            "setup_context": staticmethod(function.setup_context),
            "backward": staticmethod(function.backward),
        },
    )


_BatchNormTrainClassic = _classic(BatchNormTrain)
_BatchNormEvalClassic = _classic(BatchNormEval)
_BatchNormTrainCompiled = _without_jvp(BatchNormTrain)
_BatchNormEvalCompiled = _without_jvp(BatchNormEval)


def apply_train(x, weight, bias, eps, mask=None):
    if torch.compiler.is_compiling():
        return _BatchNormTrainCompiled.apply(x, weight, bias, eps, mask)
    if transforms_active():
        return BatchNormTrain.apply(x, weight, bias, eps, mask)
    return _BatchNormTrainClassic.apply(x, weight, bias, eps, mask)


def apply_eval(x, mean, variance, weight, bias, eps):
    if torch.compiler.is_compiling():
        return _BatchNormEvalCompiled.apply(x, mean, variance, weight, bias, eps)
    if transforms_active():
        return BatchNormEval.apply(x, mean, variance, weight, bias, eps)
    return _BatchNormEvalClassic.apply(x, mean, variance, weight, bias, eps)
