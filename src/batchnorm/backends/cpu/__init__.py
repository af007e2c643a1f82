"""The CPU kernel backend: fused Numba kernels (``batchnorm.backends.cpu.kernels``) behind the
backend interface of ``batchnorm.dispatch``, plus the batch norm + activation entry points (ReLU
fused into the kernels, silu and gelu applied around them by torch's vectorized operators).

Tensors are handed to the kernels as zero-copy NumPy views in one of two canonical layouts:
``(N, C, S)`` for contiguous inputs and ``(R, C)`` for (N, C) and channels_last inputs. Outputs
are allocated with the input's memory format. float16/bfloat16 inputs are computed in float32;
the returned statistics are in the accumulation dtype, as on the eager path.

Compiled code is cached on disk (next to the kernels, or in the user's cache folder), so only
the first process after an installation pays the compilation; ``warm_up()`` compiles or loads
every specialisation ahead of time.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import torch
from numba.np.ufunc import parallel as numba_parallel

from batchnorm.backends import smooth
from batchnorm.backends.cpu import kernels
from batchnorm.backends.cpu import native as native_path
from batchnorm.core import running
from batchnorm.core.context import (
    is_functorch_wrapped,
    is_legacy_batched,
    is_opaque,
    transforms_active,
)
from batchnorm.core.errors import BatchNormValueError

name = "cpu"

# Activations the kernels fuse (a select per value), and smooth ones applied by torch's
# vectorized operators around the kernels (``batchnorm.backends.smooth``).
ACTIVATIONS = (*kernels.ACTIVATIONS, *smooth.ACTIVATIONS)
_COMPUTE_DTYPE = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}
# the dtype of the arrays an entry point builds, carried by a NumPy scalar
_LIKE = {torch.float32: np.float32(0), torch.float64: np.float64(0)}
_is_wrapped = is_opaque
_IDENTITY = kernels.ACTIVATIONS["identity"]


def supports(x: torch.Tensor) -> bool:
    """Plain (not vmapped, not traced) CPU tensors of a floating dtype with at least 2 dims.

    Under a torch.func transform the eager path runs even when ``x`` itself is plain: an
    ensemble vmapped over the parameters with a shared input hands the kernels batched weights
    that have no storage to view."""
    return (
        not torch.compiler.is_compiling()  # first: the tracer must not see the checks below
        and x.is_cpu  # (device.type costs 0.26 us, is_cpu 0.05)
        and x.dtype in _COMPUTE_DTYPE
        and x.dim() >= 2
        and x.numel() > 0
        and not transforms_active()
        # (is_opaque's two questions asked here: a call less, see batchnorm.modules.batchnorm)
        and not is_functorch_wrapped(x)
        and not is_legacy_batched(x)
    )


# The automatic choice runs these kernels on every CPU input ``supports`` accepts. Measured with
# ``batchnorm bench --rounds 9`` per backend (2-core AMD EPYC, float32, 2 threads; ratios
# ours/torch, kernels vs eager): rows inputs ((N, C) and channels_last) and planes from 14x14 up
# win in training and eval; 7x7 planes, which went to the eager path until the kernels indexed
# them directly, now win too (layer4.bn3 NCHW train 1.22 vs 2.53, eval 1.16 vs 1.92; layer4.bn1
# eval 1.58 vs 1.72). The tiny 60x100 layer is Python overhead on both paths (train 2.82 vs
# 2.52, eval 1.88 vs 1.99: within the run-to-run spread).


# -- layouts ----------------------------------------------------------------------------------


def _layout(x: torch.Tensor) -> torch.memory_format | None:
    """The memory format ``x`` is dense in, among those the kernels read; None for others."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _input(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format, int, int, int, bool]:
    """``x`` in its compute dtype, with a layout the kernels read directly (``x`` itself in the
    common case: the kernels read its memory by address, which needs no detached view), and its
    geometry for the ``kernels.*_at`` entry points: ``(xc, layout, batch, channels, size,
    planes)``, ``size`` values per plane, seen as (N, C, S) planes (contiguous with S > 1) or
    as (N * S, C) rows.

    One function for all of it: in a model, where each batch norm's Python runs with cold
    caches between convolutions, every call on the path costs microseconds (see
    ``batchnorm.modules.batchnorm``)."""
    if not x.is_cpu:  # (a meta tensor's address is 0: the kernels would read from there)
        raise BatchNormValueError(
            f"cpu kernels: expected an input in CPU memory, got one on {x.device}"
        )
    if x.dtype in _LIKE and not x.is_neg() and x.is_contiguous():
        layout = _CONTIGUOUS
    else:
        x, layout = _converted(x)
    shape = x.shape
    batch, channels = shape[0], shape[1]
    size = x.numel() // (batch * channels)
    return x, layout, batch, channels, size, size > 1 and layout is _CONTIGUOUS


_CONTIGUOUS = torch.contiguous_format


def _converted(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format]:
    """``x`` detached, in its compute dtype, dense in a layout the kernels read."""
    layout = _layout(x)
    if x.dtype in _LIKE and not x.is_neg() and layout is not None:
        return x, layout
    compute = _COMPUTE_DTYPE[x.dtype]
    if x.requires_grad:
        x = x.detach()
    if x.dtype != compute:
        x = x.to(compute)
    if x.is_neg():  # a lazily negated view (the imaginary part of a conjugate): its memory
        x = x.resolve_neg()  # holds the values' negatives
    layout = _layout(x)
    if layout is None:
        return x.contiguous(), _CONTIGUOUS
    return x, layout


def _conformed(t: torch.Tensor, like: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``t`` (a gradient or residual) in ``like``'s dtype and the given layout.

    Read by address as a tensor of ``like``'s shape: any other shape or memory is refused (a
    wrapper without memory of its own is refused by its ``data_ptr()``, as in
    :func:`_vectors`)."""
    if t.shape != like.shape or not t.is_cpu:
        raise BatchNormValueError(
            f"cpu kernels: expected a tensor of the input's shape {tuple(like.shape)} in CPU "
            f"memory, got shape {tuple(t.shape)} on {t.device}"
        )
    if t.dtype is like.dtype and not t.is_neg() and t.is_contiguous(memory_format=layout):
        return t
    if _is_wrapped(t):
        raise BatchNormValueError(
            "cpu kernels: expected a tensor with memory of its own, got a torch.func wrapper"
        )
    if t.requires_grad:
        t = t.detach()
    if t.dtype != like.dtype:
        t = t.to(like.dtype)
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous(memory_format=layout)


def _vectors(dtype: torch.dtype, channels: int, *vectors: torch.Tensor | None) -> list:
    """Per-channel parameters or statistics as dense tensors of the compute dtype (to pass by
    address with :func:`_address` and :func:`_length`; None stays None).

    The kernels read ``channels`` values from each address: a shorter vector, or one whose
    memory is not this process's CPU memory (a ``meta`` tensor has none), is refused here too,
    whatever called the backend (the functional forms have validated already; this is the last
    line). A torch.func wrapper or a batched tensor has no memory of its own either: its
    ``data_ptr()`` raises, so the common case does not ask (that question cost 0.3 us of the 0.9
    this check took per vector)."""
    dense = []
    for t in vectors:
        if t is not None and not (
            t.dtype is dtype
            and t.is_cpu
            and t.dim() == 1
            and t.shape[0] == channels
            and t.is_contiguous()
            and not t.is_neg()
        ):
            t = _converted_vector(t, dtype, channels)
        dense.append(t)
    return dense


def _converted_vector(t: torch.Tensor, dtype: torch.dtype, channels: int) -> torch.Tensor:
    if t.dim() != 1 or t.shape[0] != channels or not t.is_cpu or _is_wrapped(t):
        raise BatchNormValueError(
            f"cpu kernels: expected a per-channel vector of shape ({channels},) in CPU memory, "
            f"got shape {tuple(t.shape)} on {t.device}"
        )
    if t.dtype != dtype:
        t = t.detach().to(dtype)
    if t.is_neg():
        t = t.resolve_neg()
    return t if t.is_contiguous() else t.contiguous()


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _length(t: torch.Tensor | None) -> int:
    """The length an entry point sees: 0 for an absent vector."""
    return 0 if t is None else t.shape[0]


# Below this many elements a parallel launch costs more than it saves (torch's own grain size
# is of the same order); such inputs run on the calling thread.
SERIAL_BELOW = 1 << 16
# The backward on planes (NCHW) goes parallel from fewer values: it reads two tensors and writes
# a third, and inside a model it finds them out of cache, where one core's bandwidth decides.
# Kernel alone, 2 threads, with a torch matrix product and a 4 MB write before each call (as a
# model's convolutions run between its batch norms), one block against two, torch's backward in
# brackets (`python scripts/backward_threshold.py kernel ...`): (4, 128, 6, 6) 20.4 vs 12.8 us
# (25.1), (8, 112, 6, 6) 27.6 vs 17.3 (34.5), (4, 416, 6, 6) 55.1 vs 27.3 (35.1). Inside
# densenet121 and efficientnet_b0 the backward of their 6x6 layers of 16384-65535 values went
# from 1.39-1.54x and 1.56-1.59x torch's time to 1.19-1.34x and 1.15-1.20x. 3x3 planes follow
# since their parallel calls run on torch's threads: timed side by side in one process (`python
# scripts/backward_threshold.py models --below 65536 ...`), the 3x3 layers of 16384-65535 values
# took 0.70-0.88x the time on two blocks that they took on one inside densenet121 (seven runs),
# and 0.71-0.88x inside both efficientnet_b0s (four); below 16384 values two blocks gained
# nothing (1.00, 0.96 at cuts of 8192 and 4096). Rows ((N, C), channels_last) keep
# SERIAL_BELOW: there one block measured faster up to 32768 values, (64, 256) 13.3 us against
# 14.7 on two blocks, channels_last (4, 128, 6, 6) 19.6 against 22.4.
BACKWARD_PLANES_SERIAL_BELOW = 1 << 14


def _numba_threads() -> int:
    """Numba's thread count for the calling thread. ``numba.get_num_threads`` makes sure the
    pool is running on every call (a lock, 0.6 us); once it has, Numba's C getter answers alone
    (0.14 us), so the first call swaps it in."""
    global _numba_threads
    count = numba.get_num_threads()
    _numba_threads = getattr(numba_parallel, "_get_num_threads", numba.get_num_threads)
    return count


_pool_started = False  # whether Numba's thread pool has started (see _run)

# The compiled call path (``batchnorm.backends.cpu.native``), loaded where built once the pool has
# started (its entry points need it), else None: ``batchnorm.functional``'s common calls offer
# it each call first.
compiled = None
_native_tried = False


def _load_native() -> None:
    global compiled, _native_tried
    _native_tried = True
    try:
        compiled = native_path.load(SERIAL_BELOW, BACKWARD_PLANES_SERIAL_BELOW,
                                    numba.config.NUMBA_NUM_THREADS)
    except Exception as error:  # noqa: BLE001 - whatever keeps the build from loading here
        # (an extension built against another torch, entry points Numba cannot load), the
        # Python path serves every call
        warnings.warn(f"batchnorm: the compiled call path did not load ({error}); the Python "
                      "path serves every call", RuntimeWarning, stacklevel=2)
        compiled = None


def _run(entry, numel: int, units: int, *arguments, serial_below: int = SERIAL_BELOW):
    """Call ``entry`` on threads for an input of ``numel`` values (one below the grain size,
    else torch's own thread count, so ``torch.set_num_threads`` governs our kernels too, within
    Numba's pool), appending its number of blocks: one per thread, at most one per unit of work
    (row, plane segment or channel); 1 runs the kernel on the calling thread. Returns what
    ``entry`` returns.

    One block never reaches the pool (every kernel runs ``blocks == 1`` without ``prange``), so
    once the pool has started such a call leaves Numba's and torch's thread counts alone:
    setting Numba's to 1 for a small layer and back for the next large one cost two calls of
    ``numba.set_num_threads`` whenever a model alternated sizes. The first call of a kernel
    starts the pool even on one block, and that start resets the OpenMP thread count torch
    shares: the first call of the process therefore takes the full path, which puts it back."""
    global _pool_started
    if numel < serial_below and _pool_started:
        return entry(*arguments, 1)
    torch_threads = torch.get_num_threads()
    threads = 1 if numel < serial_below else min(torch_threads, numba.config.NUMBA_NUM_THREADS)
    if threads > 1 and _numba_threads() != threads:
        numba.set_num_threads(threads)  # per calling thread in Numba; left set for the next call
    result = entry(*arguments, max(1, min(threads, units)))
    # Numba's OpenMP layer, when it starts, resets the OpenMP thread count that torch shares:
    # put back what the user chose.
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _pool_started = True
    if not _native_tried:
        _load_native()
    return result


# -- entry points -----------------------------------------------------------------------------


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    mean: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    activation: str = "identity",
    residual: torch.Tensor | None = None,
    compute_dtype: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``f(BN(x) [+ residual])``: batch statistics when ``mean`` is None, else the given ones.

    Returns ``(y, batch_mean, batch_biased_variance)``; the statistics are None in eval.
    """
    if activation in smooth.ACTIVATIONS:
        return smooth.forward(forward, x, weight, bias, eps, activation, mean, variance, residual)
    return _forward(x, weight, bias, eps, mean, variance, activation, residual, compute_dtype)[:3]


def _forward(x, weight, bias, eps, mean, variance, activation, residual, compute_dtype,
             running=None, checked=False):
    """:func:`forward` for the activations the kernels fuse, returning ``(y, batch_mean,
    batch_biased_variance, finite)``. ``running``: ``(running_mean, running_var, bessel,
    momentum, tracked)``, dense vectors of the compute dtype and two floats, updated in place
    by the same kernel call in training (``finite`` then says whether the batch statistics were
    finite; else it is None), and the count of batches (a one-value int64 CPU tensor, or None)
    that the same call adds 1 to when they were. ``checked``: the per-channel tensors are
    dense vectors of the input's dtype (:func:`_common_layout` has said so)."""
    xc, layout, batch, channels, size, planes = _input(x)
    dtype = xc.dtype
    out = torch.empty_like(xc)
    like = _LIKE[dtype]
    if residual is not None:
        residual = _conformed(residual, xc, layout)
    xp = xc.data_ptr()
    rp = xp if residual is None else residual.data_ptr()
    if checked:
        w, b = weight, bias
    else:
        w, b, mean, variance = _vectors(dtype, channels, weight, bias, mean, variance)
    act = kernels.ACTIVATIONS[activation]
    numel = xc.numel()
    # work is shared by channel for planes in training, else by row or by plane segment
    units = channels if planes else batch * size
    finite = None
    if mean is None:
        # batch statistics in the compute dtype, which is the accumulation dtype of x
        batch_mean = torch.empty(channels, dtype=dtype)
        batch_var = torch.empty(channels, dtype=dtype)
        arguments = (
            like, batch, channels, size, planes, xp, _address(w), _length(w), _address(b),
            _length(b), float(eps), act, rp, residual is not None, out.data_ptr(),
            batch_mean.data_ptr(), batch_var.data_ptr(),
        )
        if running is None:
            _run(kernels.train_forward_at, numel, units, *arguments)
        else:
            running_mean, running_var, bessel, momentum, tracked = running
            finite = _run(kernels.train_forward_update_at, numel, units, *arguments,
                          running_mean.data_ptr(), running_var.data_ptr(), bessel, momentum,
                          _address(tracked))
        y = out if compute_dtype or dtype is x.dtype else out.to(x.dtype)
        return y, batch_mean, batch_var, finite
    _run(kernels.eval_forward_at, numel, batch * channels if planes else units, like, batch,
         channels, size, planes, xp, mean.data_ptr(), variance.data_ptr(), _address(w),
         _length(w), _address(b), _length(b), float(eps), act, rp, residual is not None,
         out.data_ptr())
    return (out if compute_dtype or dtype is x.dtype else out.to(x.dtype)), None, None, None


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    needs: tuple[bool, bool, bool],
    *,
    train: bool,
    activation: str = "identity",
    residual: torch.Tensor | None = None,
    need_residual: bool = False,
    checked: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``f(BN(x) [+ residual])``: (dx, dweight, dbias, dresidual).

    ``train``: the statistics were the batch's own (they depend on x) or fixed ones.
    ``checked``: ``x`` and the per-channel tensors are those a common call accepted
    (:func:`_common_layout`; the statistics its kernel wrote), so they are not asked again;
    the incoming gradient is, as always.
    """
    if activation in smooth.ACTIVATIONS:
        return smooth.backward(forward, backward, grad_out, x, mean, variance, weight, bias, eps,
                               needs, train, activation, residual, need_residual, checked)
    need_input, need_weight, need_bias = needs
    xc, layout, batch, channels, size, planes = _input(x)
    grad_out = _conformed(grad_out, xc, layout)
    residual = None if residual is None else _conformed(residual, xc, layout)
    grad_input = torch.empty_like(xc) if need_input else None
    grad_residual = torch.empty_like(xc) if need_residual else None
    # the parameter gradients are summed in float64 and stored in the compute dtype, which is
    # the accumulation dtype of x
    grad_weight = torch.empty(channels, dtype=xc.dtype)
    grad_bias = torch.empty(channels, dtype=xc.dtype)
    if checked:
        w, b = weight, bias
    else:
        mean, variance, w, b = _vectors(xc.dtype, channels, mean, variance, weight, bias)
    xp = xc.data_ptr()
    _run(
        kernels.backward_at, xc.numel(), channels if planes else batch * size, _LIKE[xc.dtype],
        batch, channels, size, planes, grad_out.data_ptr(), xp,
        xp if residual is None else residual.data_ptr(), residual is not None, mean.data_ptr(),
        variance.data_ptr(), _address(w), _length(w), _address(b), _length(b), float(eps),
        kernels.ACTIVATIONS[activation], train, need_input,
        xp if grad_input is None else grad_input.data_ptr(),
        xp if grad_residual is None else grad_residual.data_ptr(), need_residual,
        grad_weight.data_ptr(), grad_bias.data_ptr(),
    )
    return (
        None if grad_input is None else _in_dtype(grad_input, x.dtype),
        grad_weight if need_weight and weight is not None else None,
        grad_bias if need_bias else None,
        None if grad_residual is None else _in_dtype(grad_residual, x.dtype),
    )


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def train_forward(x, weight, bias, eps):
    return _forward(x, weight, bias, eps, None, None, "identity", None, False)[:3]


def eval_forward(x, mean, variance, weight, bias, eps):
    return _forward(x, weight, bias, eps, mean, variance, "identity", None, False)[0]


def eval_common(x, mean, variance, weight, bias, eps, activation="identity"):
    """:func:`eval_forward` (followed by ``activation``) for the common inference call, or None
    to send the call to the general path (``batchnorm.functional.normalize_common``, which has
    asked the context and the autograd questions): an input of float32 or float64, contiguous
    or channels_last, with every per-channel tensor a dense vector of its dtype and channel
    count in CPU memory, and an activation the kernels fuse or torch applies in place after
    them (``batchnorm.backends.smooth``).

    Accepting the call is its validation: what this asks of the per-channel tensors is more
    than the functional forms' checks ask, and a call it declines is validated in full. In a
    model each batch norm runs with caches the layers before it have filled, and there every
    Python call and tensor query on the path costs a microsecond or more; so the common call
    asks each question once, in one function: inside torchvision's efficientnet_b0 (batch 8,
    96x96, 2 threads) the median eval call of its layers under 65536 values went from 92 us to
    49, where torch's took 40 to 51 in the same runs (the kernel call alone: 34 to 38)."""
    act = kernels.ACTIVATIONS.get(activation)
    after = None
    if act is None:
        after = smooth.ACTIVATIONS.get(activation)
        if after is None:
            return None
        act = _IDENTITY
    accepted = _common_layout(x, mean, variance, weight, bias)
    if accepted is None:
        return None
    like, contiguous = accepted
    numel = x.numel()
    if numel == 0:
        return None
    shape = x.shape
    channels = shape[1]
    batch = shape[0]
    size = numel // (batch * channels)
    planes = contiguous and size > 1
    out = torch.empty_like(x)
    xp = x.data_ptr()
    arguments = (
        like, batch, channels, size, planes, xp, mean.data_ptr(), variance.data_ptr(),
        weight.data_ptr(), channels, bias.data_ptr(), channels, eps, act, xp, False,
        out.data_ptr(),
    )
    if numel < SERIAL_BELOW and _pool_started:  # _run's first case, asked here: a frame less
        kernels.eval_forward_at(*arguments, 1)
    else:
        _run(kernels.eval_forward_at, numel, batch * channels if planes else batch * size,
             *arguments)
    if after is not None:
        after[0](out)
    return out


def _common_layout(x, *vectors) -> tuple[np.generic, bool] | None:
    """What the common calls (:func:`eval_common`, :func:`train_common`) accept, asked once
    each: an input of float32 or float64 in CPU memory with values (not a lazily negated
    view, not a torch.func wrapper), contiguous or channels_last, and every one of ``vectors``
    a dense vector of its dtype and channel count in CPU memory. Returns ``(like, contiguous)``
    (the dtype's NumPy scalar for the entry points, and whether the input is contiguous rather
    than channels_last), or None."""
    dtype = x.dtype
    like = _LIKE.get(dtype)
    if like is None or not x.is_cpu or x.is_neg():
        return None
    if x.is_contiguous():
        contiguous = True
    elif x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else
                         torch.channels_last_3d):
        contiguous = False
    else:
        return None
    vector_shape = (x.shape[1],)
    for t in vectors:
        if not (
            t is not None
            and t.dtype is dtype
            and t.is_cpu
            and t.shape == vector_shape
            and t.is_contiguous()
            and not t.is_neg()
        ):
            return None
    if is_functorch_wrapped(x) or is_legacy_batched(x):
        return None
    return like, contiguous


def train_common(x, weight, bias, running_mean, running_var, tracked=None) -> int:
    """Whether a training call with these tensors is the common one, for
    :func:`train_forward_update` with ``checked=True``: the values per channel of ``x``, or 0
    to send the call to the general path (``batchnorm.functional.train_common``, which has
    asked the context questions and checked eps and momentum).

    The common call: what :func:`eval_common` accepts, the running statistics needing no
    gradient (they are written in place by address), and more than one value per channel (one
    is refused, or normalized with the running statistics, by the general path), and
    ``tracked``, the count of batches where given, one int64 value in CPU memory (the kernel
    adds to it by address). As there, accepting the call is its validation, asked once."""
    if (
        running_mean.requires_grad
        or running_var.requires_grad
        # (inference tensors: the general path's checks refuse their update outside inference
        # mode before anything is written)
        or running_mean.is_inference()
        or running_var.is_inference()
        or _common_layout(x, weight, bias, running_mean, running_var) is None
        or not (
            tracked is None
            or (tracked.dtype is torch.int64 and tracked.is_cpu and tracked.numel() == 1
                and not tracked.is_inference())
        )
    ):
        return 0
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    return count if count > 1 else 0


def backward_common(grad_out, x, mean, variance, weight, bias, eps, needs,
                    activation="identity"):
    """The backward of a common training step (:func:`train_common` accepted ``x``,
    ``weight`` and ``bias``; ``mean`` and ``variance`` are the batch statistics its kernel
    wrote; ``bias`` may be None without an activation, which alone reads it): ``(dx,
    dweight, dbias)`` of ``f(BN(x))`` for an activation the kernels fuse, or
    None for one they do not (then :func:`backward` answers, with ``checked=True``). Only the
    incoming gradient is asked about, and it is read as it is when it has the input's dtype
    and strides, as autograd hands it over in a model.

    The shortest path from autograd to the kernel: inside a model each Python call and tensor
    query here runs with cold caches (see ``batchnorm.modules.batchnorm``), and the general
    :func:`backward` spent more on them than its kernel took (torchvision's densenet121 at
    batch 4, layers of 4x128x6x6: 36 us of checks, allocations and arguments beside a 30 us
    kernel call, where torch's whole backward took 30)."""
    act = kernels.ACTIVATIONS.get(activation)
    if act is None:
        return None
    need_input, need_weight, need_bias = needs
    shape = x.shape
    batch, channels = shape[0], shape[1]
    numel = x.numel()
    size = numel // (batch * channels)
    planes = size > 1 and x.is_contiguous()
    if not (
        grad_out.dtype is x.dtype
        and grad_out.shape == shape
        and grad_out.stride() == x.stride()  # dense like x (dense), in its layout
        and grad_out.is_cpu
        and not grad_out.is_neg()
    ):
        grad_out = _conformed(grad_out, x, _layout(x))
    grad_input = torch.empty_like(x) if need_input else None
    grad_weight = torch.empty(channels, dtype=x.dtype)
    grad_bias = torch.empty(channels, dtype=x.dtype)
    xp = x.data_ptr()
    arguments = (
        _LIKE[x.dtype], batch, channels, size, planes, grad_out.data_ptr(), xp, xp, False,
        mean.data_ptr(), variance.data_ptr(), weight.data_ptr(), channels, _address(bias),
        _length(bias), eps, act, True, need_input,
        xp if grad_input is None else grad_input.data_ptr(), xp, False, grad_weight.data_ptr(),
        grad_bias.data_ptr(),
    )
    serial_below = BACKWARD_PLANES_SERIAL_BELOW if planes else SERIAL_BELOW
    if numel < serial_below and _pool_started:  # _run's first case, asked here: a frame less
        kernels.backward_at(*arguments, 1)
    else:
        _run(kernels.backward_at, numel, channels if planes else batch * size, *arguments,
             serial_below=serial_below)
    return (grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None)


def train_backward(grad_out, x, mean, variance, weight, eps, needs):
    return backward(grad_out, x, mean, variance, weight, None, eps, needs, train=True)[:3]


def eval_backward(grad_out, x, mean, variance, weight, eps, needs):
    return backward(grad_out, x, mean, variance, weight, None, eps, needs, train=False)[:3]


def train_forward_update(x, weight, bias, eps, running_mean, running_var, momentum, count,
                         checked=False, tracked=None, activation="identity", residual=None):
    """A training step's forward and its in-place running-statistics update in one backend call
    (``batchnorm.dispatch``): ``(y, mean, biased variance, finite)``. Where the running
    statistics are dense vectors of the compute dtype and momentum a number (a model's every
    step), one kernel call computes all of it; else the update follows the forward (the batch
    statistics from :func:`forward` are dense and in the compute dtype, so only the running
    vectors are checked before the update kernel reads them by address).

    ``checked``: :func:`train_common` has accepted these tensors (and momentum is a float), so
    nothing is asked again; then ``tracked`` (the count of batches it accepted, or None) is
    counted by the same kernel call when the batch statistics are finite, as the module's
    ``num_batches_tracked += 1`` would (its version moves with the running statistics').

    ``activation`` and ``residual``: the fused layers' ``f(BN(x) + residual)``, as in
    :func:`forward` (a smooth activation applied in place on the kernel's output)."""
    dtype = _COMPUTE_DTYPE.get(x.dtype)
    after = smooth.ACTIVATIONS.get(activation)
    if checked:
        plain = True
    elif type(count) is not int or count < 2 or isinstance(momentum, torch.Tensor):
        plain = False
    else:
        channels = x.shape[1] if x.dim() >= 2 else -1
        plain = _plain_vector(running_mean, dtype, channels) and _plain_vector(
            running_var, dtype, channels
        )
    if plain:
        tracked = tracked if checked else None
        output, mean, variance, finite = _forward(
            x, weight, bias, eps, None, None, "identity" if after else activation, residual,
            after is not None,
            (running_mean, running_var, count / (count - 1), float(momentum), tracked), checked,
        )
        torch.autograd.graph.increment_version(
            (running_mean, running_var) if tracked is None or not finite
            else (running_mean, running_var, tracked)
        )
        if after is not None:  # on the output in the compute dtype, then in the input's
            after[0](output)
            output = _in_dtype(output, x.dtype)
        return output, mean, variance, finite
    output, mean, variance = forward(x, weight, bias, eps, activation=activation,
                                     residual=residual)
    _, _, finite = updated_running_stats(
        running_mean, running_var, mean, variance, momentum, count, in_place=True
    )
    return output, mean, variance, finite


def _plain_vector(t: torch.Tensor, dtype: torch.dtype | None = None, channels: int = -1) -> bool:
    """A dense CPU vector the update kernel may read and write by address (of ``dtype`` and
    ``channels`` values, where given)."""
    return (
        t.dtype in _LIKE and (dtype is None or t.dtype is dtype)
        and t.is_cpu and t.dim() == 1 and (channels < 0 or t.shape[0] == channels)
        and t.is_contiguous() and not t.requires_grad and not t.is_neg() and not _is_wrapped(t)
    )


def updated_running_stats(running_mean, running_var, batch_mean, batch_var, momentum,
                          count=None, in_place=False):
    """``batchnorm.core.running.updated_running_stats`` in one kernel call (same arguments and
    results, ``finite`` as a bool) for plain CPU vectors; other inputs go to the core's torch
    version. A handful of small torch operations cost more than a small layer's whole
    normalization.

    ``in_place``: write the update into ``running_mean`` and ``running_var`` and return them
    (their version counters move as with any in-place operation), so the caller's commit has
    nothing to copy; with non-finite batch statistics they keep their values.
    """
    if (
        torch.compiler.is_compiling()
        or not all(map(_plain_vector, (running_mean, running_var, batch_mean, batch_var)))
        or not running_mean.shape == running_var.shape == batch_mean.shape == batch_var.shape
        or (isinstance(momentum, torch.Tensor) and (momentum.dim() != 0 or _is_wrapped(momentum)))
    ):
        return running.updated_running_stats(
            running_mean, running_var, batch_mean, batch_var, momentum, count, in_place
        )
    if in_place:
        new_mean, new_var = running_mean, running_var
        torch.autograd.graph.increment_version((running_mean, running_var))
    else:
        new_mean, new_var = torch.empty_like(running_mean), torch.empty_like(running_var)
    finite = _update_into(running_mean, running_var, batch_mean, batch_var, momentum, count,
                          new_mean, new_var)
    return new_mean, new_var, finite


def _update_into(running_mean, running_var, batch_mean, batch_var, momentum, count, new_mean,
                 new_var) -> bool:
    """The update kernel on checked dense CPU vectors of one length: ``new_*`` (which may be the
    running tensors themselves) receive it; returns whether the batch statistics were finite."""
    bessel = 1.0 if count is None else count / (count - 1)
    return kernels.running_update_at(
        running_mean.shape[0], running_mean.data_ptr(), _LIKE[running_mean.dtype],
        running_var.data_ptr(), _LIKE[running_var.dtype], batch_mean.data_ptr(),
        _LIKE[batch_mean.dtype], batch_var.data_ptr(), _LIKE[batch_var.dtype], float(bessel),
        float(momentum), new_mean.data_ptr(), new_var.data_ptr(),
    )


def warm_up(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> None:
    """Compile (or load from the disk cache) the kernel specialisations of ``dtypes`` (float32
    and float64 by default; float16 and bfloat16 inputs use float32's), planes and rows
    layouts."""
    for dtype in dtypes:
        for size in ((4, 3), (4, 3, 5)):
            x = torch.randn(size, dtype=dtype)
            weight, bias = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
            y, mean, var = train_forward(x, weight, bias, 1e-5)
            train_forward_update(x, weight, bias, 1e-5, mean.clone(), var.clone(), 0.1,
                                 x.numel() // 3)
            eval_forward(x, mean, var, weight, bias, 1e-5)
            backward(y, x, mean, var, weight, bias, 1e-5, (True, True, True), train=True,
                     residual=x, need_residual=True)
