"""Entry points into the compiled kernels that receive tensors by address.

Handing a tensor to Numba as a NumPy view (``Tensor.numpy()``) costs about 0.6 us, and a
training step used to hand over some twenty: on a 60x100 layer, about an eighth of the step.
These entry points take each tensor's ``data_ptr()`` (0.06 us) and the input's geometry, build
the arrays inside compiled code, where a view costs nothing, and call the kernels of
:mod:`batchnorm.backends.cpu.kernels`.

The geometry ``(batch, channels, size)`` is that of an input (N, C, *spatial) with ``size``
values per plane; ``planes`` says which canonical view the kernels get: ``(N, C, S)`` planes, or
``(N * S, C)`` rows ((N, C) inputs and channels_last).

The caller's contract (``batchnorm.backends.cpu`` keeps it): each address is that of a dense
CPU tensor, laid out as the view says, of the dtype of ``like`` (a NumPy scalar that only
carries the dtype), alive until the call returns. An absent per-channel vector (no weight, no
bias) has length 0 and its address is never read.
"""

from __future__ import annotations

import numba
from numba import types
from numba.extending import intrinsic

from batchnorm.backends.cpu import kernels
from batchnorm.backends.cpu.kernels import _jit


@intrinsic
def _pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to values of ``like``'s type."""
    signature = types.CPointer(like)(address, like)

    def codegen(context, builder, signature, arguments):
        return builder.inttoptr(arguments[0], context.get_value_type(signature.return_type))

    return signature, codegen


@_jit(inline="always")
def _at(address, shape, like):
    """The C-contiguous array of ``shape`` at ``address``."""
    return numba.carray(_pointer(address, like), shape)


@_jit(inline="always")
def _vector(address, length, like):
    return _at(address, (length,), like)


@_jit()
def train_forward(like, batch, channels, size, planes, x, weight, weight_length, bias,
                  bias_length, eps, act, residual, has_res, out, mean, var, blocks):
    """:func:`kernels.train_forward_planes` or :func:`kernels.train_forward_rows`."""
    w = _vector(weight, weight_length, like)
    b = _vector(bias, bias_length, like)
    m, v = _vector(mean, channels, like), _vector(var, channels, like)
    if planes:
        shape = (batch, channels, size)
        kernels.train_forward_planes(_at(x, shape, like), w, b, eps, act,
                                     _at(residual, shape, like), has_res, _at(out, shape, like),
                                     m, v, blocks)
    else:
        shape2 = (batch * size, channels)
        kernels.train_forward_rows(_at(x, shape2, like), w, b, eps, act,
                                   _at(residual, shape2, like), has_res, _at(out, shape2, like),
                                   m, v, blocks)


@_jit()
def eval_forward(like, batch, channels, size, planes, x, mean, var, weight, weight_length,
                 bias, bias_length, eps, act, residual, has_res, out, blocks):
    """:func:`kernels.eval_forward_planes` or :func:`kernels.eval_forward_rows`."""
    m, v = _vector(mean, channels, like), _vector(var, channels, like)
    w = _vector(weight, weight_length, like)
    b = _vector(bias, bias_length, like)
    if planes:
        shape = (batch, channels, size)
        kernels.eval_forward_planes(_at(x, shape, like), m, v, w, b, eps, act,
                                    _at(residual, shape, like), has_res, _at(out, shape, like),
                                    blocks)
    else:
        shape2 = (batch * size, channels)
        kernels.eval_forward_rows(_at(x, shape2, like), m, v, w, b, eps, act,
                                  _at(residual, shape2, like), has_res, _at(out, shape2, like),
                                  blocks)


@_jit()
def backward(like, batch, channels, size, planes, grad, x, residual, has_res, mean, var, weight,
             weight_length, bias, bias_length, eps, act, train, need_input, grad_input,
             grad_residual, need_residual, grad_weight, grad_bias, blocks):
    """:func:`kernels.backward_planes` or :func:`kernels.backward_rows`."""
    m, v = _vector(mean, channels, like), _vector(var, channels, like)
    w = _vector(weight, weight_length, like)
    b = _vector(bias, bias_length, like)
    gw, gb = _vector(grad_weight, channels, like), _vector(grad_bias, channels, like)
    if planes:
        shape = (batch, channels, size)
        kernels.backward_planes(_at(grad, shape, like), _at(x, shape, like),
                                _at(residual, shape, like), has_res, m, v, w, b, eps, act, train,
                                need_input, _at(grad_input, shape, like),
                                _at(grad_residual, shape, like), need_residual, gw, gb, blocks)
    else:
        shape2 = (batch * size, channels)
        kernels.backward_rows(_at(grad, shape2, like), _at(x, shape2, like),
                              _at(residual, shape2, like), has_res, m, v, w, b, eps, act, train,
                              need_input, _at(grad_input, shape2, like),
                              _at(grad_residual, shape2, like), need_residual, gw, gb, blocks)


@_jit()
def running_update(channels, running_mean, mean_like, running_var, var_like, mean,
                   batch_mean_like, var, batch_var_like, bessel, momentum, out_mean, out_var):
    """:func:`kernels.running_update`; each statistic in its own dtype, ``out_mean`` and
    ``out_var`` in those of ``running_mean`` and ``running_var``."""
    return kernels.running_update(
        _vector(running_mean, channels, mean_like), _vector(running_var, channels, var_like),
        _vector(mean, channels, batch_mean_like), _vector(var, channels, batch_var_like),
        bessel, momentum, _vector(out_mean, channels, mean_like),
        _vector(out_var, channels, var_like),
    )
