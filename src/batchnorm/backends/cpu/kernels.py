r"""Numba CPU kernels for batch norm, optionally fused with a ReLU and a residual add.

Every input is seen in one of two canonical layouts, so a handful of kernels covers them all:

- **planes** ``(N, C, S)`` contiguous: NCHW, (N, C, L), (N, C, D, H, W). The work is split over
  channels; one thread owns a whole channel, so the statistics pass and the normalizing pass run
  back to back on data that is still in the core's cache, with no synchronisation in between.
- **rows** ``(R, C)`` contiguous: (N, C), and channels_last seen as (N*H*W, C). The work is split
  over blocks of rows; each block accumulates per-channel partial sums, which are joined before
  the elementwise pass.

Statistics. Sums are taken about a per-channel shift :math:`k_c` (the channel's first value):
:math:`S_1 = \sum (x - k)`, :math:`S_2 = \sum (x - k)^2`, then :math:`\mu = k + S_1/n`,
:math:`\sigma^2 = S_2/n - (S_1/n)^2`. Short blocks (``PLANE_BLOCK`` values of a plane, or
``ROW_BLOCK`` rows) are summed in the input's dtype and the block sums are joined in float64:
a float32 block of at most 512 terms, vectorized into 32 lanes of 16 terms each, carries a
relative error of order 1e-6, and the float64 totals add nothing further, so the error no longer
grows with n (converting every value to float64 instead made the statistics pass
compute-bound, about half as fast). The subtraction :math:`S_2/n - (S_1/n)^2` loses at most a
factor :math:`(\mu - k)^2/\sigma^2 \le n` of float64's precision, since the shift is one of the
n values (it contributes :math:`(k-\mu)^2 \le n\sigma^2` to the sum of squared deviations), and
:math:`x - k` is exact in the input's dtype when x and k are within a factor 2 of each other
(Sterbenz), the case where cancellation would otherwise hurt: a channel with mean 1e4 and
standard deviation 1 in float32 keeps its variance to about 1e-6 relative, where
:math:`E[x^2] - E[x]^2` in float32 loses every digit. All row blocks use the same shift, so
their partial sums join by addition: Chan's pairwise merge (``batchnorm.core.moments``) reduces
to a sum when the partial moments are taken about a common point.

Normalizing computes :math:`z = (x - \mu) s + \beta\,[+ r]` with :math:`s = \gamma/\sqrt{\sigma^2
+ \epsilon}`, then the activation in place; centring before scaling keeps the output exact when
:math:`|\mu| \gg \sigma`.

Backward, with :math:`g = \partial L/\partial y` and :math:`d = g\,f'(z)` for the activation
:math:`f` (identity or ReLU; :math:`z` is recomputed from the input, never stored), one fused
reduction pass gives
:math:`\sum d` and :math:`\sum d (x - \mu)`, and one elementwise pass

.. math::
    \partial_x L = d\,\gamma s_0 - (x - \mu)\,\gamma s_0^3 \tfrac{1}{n}\sum d(x-\mu)
                  - \gamma s_0 \tfrac{1}{n}\sum d, \qquad s_0 = 1/\sqrt{\sigma^2+\epsilon}

(the last two terms vanish with fixed statistics), and :math:`\partial_r L = d`.

Reductions are compiled with ``reassoc`` so LLVM may vectorize them (the summation order then
depends on the vector width, not on the data); elementwise kernels use strict IEEE arithmetic.
NaN and inf propagate to the statistics, so the caller's non-finite check still sees them.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils, sigutils
from numba.core import options as numba_options
from numba.core.ccallback import CFunc
from numba.extending import intrinsic
from numba.np.ufunc import parallel as numba_parallel

# The activations fused here are those whose value and slope are a select, which vectorizes.
# Smooth ones (silu, gelu) need exp or erf per value, which Numba cannot vectorize without a
# vector math library: computed here one value at a time they made the fused layer 4-10x slower
# than torch's batch norm followed by its activation, so the backend applies torch's vectorized
# activation around these kernels instead (``batchnorm.backends.cpu``).
IDENTITY, RELU = 0, 1
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU}


def _jit(**options):
    """``numba.njit`` with an on-disk cache where one can be written.

    Numba caches next to this file (or, when that folder is read-only, in the user's cache
    folder); if neither is writable the kernels are still compiled, just not cached.
    """

    # IEEE division, as in torch (1/0 is inf, 0/0 is nan): Python's error model raised
    # ZeroDivisionError on eps=0 with a zero variance, and its check on every division kept the
    # per-channel loops from vectorizing (5x slower).
    options = {"error_model": "numpy", **options}

    def decorate(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # no writable cache location
            return numba.njit(cache=False, **options)(function)

    return decorate


# Options of the serial reduction loops (inlined into the parallel kernels that call them) and of
# the parallel entry points. The compiled path's serial ranges and blocks take _PARALLEL too,
# though they have no parallel loop: compiled without it, the same loops measured 1.7-2x the time
# of a parallel kernel on one block (backward and training forward on 8x672x6x6, kernel alone).
_REDUCE = {"fastmath": {"reassoc", "contract"}}
_PARALLEL = {"parallel": True}
# Functions called once per channel or per segment of planes are compiled without Numba's
# reference counting (its private ``_nrt`` option; they allocate nothing and return no array of
# their own). With it, every call of such a function took a reference to each of its array
# arguments on entry and dropped it on exit, eight calls into Numba's runtime per channel for the
# backward's sums. Kernel alone, one thread, without/with (``python scripts/kernels_ab.py``, two
# runs): backward 0.62-0.64 on (4, 1024, 36), 0.62-0.66 on (4, 512, 36), 0.75-0.83 on
# (8, 1024, 49), 0.88-0.97 on (4, 448, 144), 0.94-0.95 on (8, 256, 784); forward unchanged; same
# bits.
_NO_NRT = {"_nrt": False} if hasattr(numba_options.DefaultOptions, "_nrt") else {}
_PLANE_REDUCE = {**_REDUCE, **_NO_NRT}

# Reductions sum blocks of this many values (planes) or rows (rows) in the input's dtype and
# join the block sums in float64 (see the module docstring on the error this bounds).
PLANE_BLOCK = 512
ROW_BLOCK = 32

# The ReLU backward on rows reads the gradient only where the pre-activation is positive, which
# LLVM vectorizes as masked loads; masked loads leave the hardware prefetcher idle, so on
# gradients that do not stay in the cache the kernels prefetch the rows ahead themselves
# (``PREFETCH_AHEAD_BYTES`` ahead of the row being read). Below ``PREFETCH_ABOVE_BYTES`` the
# hints only cost issue slots. Kernel alone, 2 threads, relu backward with/without the hints:
# 0.47-0.53 on (100352, 64), 0.80-0.81 on (25088, 256), 0.84-0.87 on (6272, 512), 1.01-1.03 on
# (1024, 4096); 1.02-1.21 on the 0.8-6.4 MB arrays, which stay in the cache in such a loop.
PREFETCH_ABOVE_BYTES = 8 << 20
PREFETCH_AHEAD_BYTES = 2048


# -- the activation's gradient, one value at a time ---------------------------------------------


@_jit()
def _grad_value(g, xv, rv, has_res, m, s, b, act, zero):
    """d = g f'(z) at one position (a select that vectorizes). Scalars only: a helper called per
    element with array arguments pays reference counting each call (measured 70x slower)."""
    if act == IDENTITY:
        return g
    z = (xv - m) * s + b
    if has_res:
        z += rv
    return g if z > 0 else zero


@_jit(inline="always")
def _pair_term(u, xv, rv, has_res, kc, mc, sc, bc, act, moments, zero):
    """One value's terms ``(a, a (x - k))`` of the reductions (rows and planes): with
    ``moments`` the statistics' ``a = x - k`` (``u`` unused), else the backward's ``a = d =
    u f'(z)``, ``u`` the gradient. Every caller passes ``act`` and ``moments`` (and, in the rows'
    sweeps, ``has_res``) as constants, so the inlined reduction keeps only its own branch:
    one generic reduction taking them at run time measured 1.2-2.9x the time of these sums."""
    if moments:
        d = xv - kc
        return d, d * d
    d = _grad_value(u, xv, rv, has_res, mc, sc, bc, act, zero)
    return d, d * (xv - kc)


# -- software prefetch --------------------------------------------------------------------------


@intrinsic
def _prefetch(typingctx, array, row, column):
    """A cache hint for the line holding ``array[row, column]`` of a C-contiguous 2D array:
    ``llvm.prefetch`` for reading, into every cache level. It changes no value."""
    signature = types.void(array, row, column)

    def codegen(context, builder, signature, arguments):
        view = context.make_array(signature.args[0])(context, builder, arguments[0])
        width = builder.extract_value(view.shape, 1)
        flat = builder.add(builder.mul(arguments[1], width), arguments[2])
        byte_pointer = ir.IntType(8).as_pointer()
        address = builder.bitcast(builder.gep(view.data, [flat]), byte_pointer)
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]),
            "llvm.prefetch",  # unmangled: LLVM names the pointer type itself (any version)
        )
        builder.call(prefetch, [address, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return signature, codegen


@_jit(inline="always")
def _prefetch_rows(a, first, count):
    """Prefetch rows [first, first + count) of ``a`` (those that exist), one hint a line."""
    line = max(1, 64 // a.itemsize)
    for row in range(first, min(first + count, a.shape[0])):
        for c in range(0, a.shape[1], line):
            _prefetch(a, row, c)


@_jit(inline="always")
def _prefetches(grad, act):
    """Whether the rows kernels prefetch ``grad``, and how many rows ahead of the row being read
    (see ``PREFETCH_ABOVE_BYTES``). Counted from the row being read, the hints of a four-row sweep
    partly repeat lines already asked for; starting them past the sweep measured no better
    (0.96-1.08 of this)."""
    wanted = act == RELU and grad.size * grad.itemsize > PREFETCH_ABOVE_BYTES
    return wanted, max(1, PREFETCH_AHEAD_BYTES // (grad.shape[1] * grad.itemsize))


# -- scratch arrays ---------------------------------------------------------------------------
#
# Inside a function compiled with ``parallel=True``, Numba turns ``np.zeros`` (and any array
# expression) into a parallel loop of its own, launched on the thread pool even on one thread.
# The rows training forward on a (1, 256) input (two such arrays) took 5.9 us with them and 2.7
# without (eval, which has none, 1.9; kernel alone, one thread). Scratch arrays are therefore
# made by this plain loop.


@_jit(inline="always")
def _zeros(rows, columns):
    """A float64 (rows, columns) array of zeros, filled by a plain loop (see above)."""
    return _zeros_in(rows, columns, 0, columns)


@_jit(inline="always")
def _zeros_in(rows, columns, lo, hi):
    """A float64 (rows, columns) array whose columns [lo, hi) are zeros (the others unset)."""
    out = np.empty((rows, columns), dtype=np.float64)
    for r in range(rows):
        for c in range(_u(lo), _u(hi)):  # unsigned: see _u
            out[r, c] = 0.0
    return out


# -- per-channel coefficients -----------------------------------------------------------------


@_jit(inline="always")
def _channel_coefficients(mean, var, weight, bias, eps, c):
    """(inverse std, scale gamma*invstd, shift beta) of channel c; empty weight/bias mean 1/0."""
    invstd = 1.0 / math.sqrt(var[c] + eps)
    gamma = np.float64(weight[c]) if weight.shape[0] > 0 else 1.0
    beta = np.float64(bias[c]) if bias.shape[0] > 0 else 0.0
    return invstd, gamma * invstd, beta


@_jit(inline="always")
def _coefficients(x, mean, var, weight, bias, eps):
    """Per-channel (mean, scale, shift) arrays in x's dtype, for ``(x - mean) * scale + shift``
    (a loop LLVM vectorizes, with :func:`_channel_coefficients` inlined)."""
    channels = mean.shape[0]
    mean_x = np.empty(channels, dtype=x.dtype)
    scale_x = np.empty(channels, dtype=x.dtype)
    shift_x = np.empty(channels, dtype=x.dtype)
    for c in range(channels):
        _, scale, beta = _channel_coefficients(mean, var, weight, bias, eps, c)
        mean_x[c] = mean[c]
        scale_x[c] = scale
        shift_x[c] = beta
    return mean_x, scale_x, shift_x


@_jit(inline="always")
def _moments(shift, s1, s2, count):
    """(mean, biased variance) from the float64 sums ``s1``, ``s2`` of ``count`` values taken
    about ``shift`` (see the module docstring); a variance rounded below 0 is 0, NaN stays NaN.
    Every training forward finishes its statistics here."""
    centre = s1 / count
    variance = s2 / count - centre * centre
    return shift + centre, (0.0 if variance < 0 else variance)


@_jit(inline="always")
def _gradient_terms(mean, var, weight, bias, eps, c, sum_d, sum_dxc, count, train, grad_weight,
                    grad_bias):
    """Channel c's parameter gradients from its sums of d and d (x - mean), written into
    ``grad_weight``/``grad_bias``; returns the coefficients of its input gradient
    ``dx = d gain + (x - mean) k_centred + k_offset`` as ``(gain, k_centred, k_offset)`` (the
    last two 0 with fixed statistics). Every backward finishes its sums here."""
    invstd, gain, _ = _channel_coefficients(mean, var, weight, bias, eps, c)
    grad_weight[c] = sum_dxc * invstd
    grad_bias[c] = sum_d
    k_centred = -gain * invstd * invstd * sum_dxc / count if train else 0.0
    k_offset = -gain * sum_d / count if train else 0.0
    return gain, k_centred, k_offset


@_jit()
def running_update(running_mean, running_var, mean, var, bessel, momentum, out_mean, out_var):
    """The running-statistics update of ``batchnorm.core.running`` in one call: ``out`` receives
    ``(1 - m) running + m batch`` (the variance with Bessel's factor), or the old values when a
    batch statistic is not finite; returns which. ``out`` may be ``running`` itself."""
    channels = mean.shape[0]
    ok = True
    for c in range(channels):
        batch_mean = out_mean.dtype.type(mean[c])
        batch_var = out_var.dtype.type(np.float64(var[c]) * bessel)
        if not (np.isfinite(batch_mean) and np.isfinite(batch_var)):
            ok = False
            break
    for c in range(channels):
        if ok:
            out_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * np.float64(
                out_mean.dtype.type(mean[c]))
            out_var[c] = (1.0 - momentum) * np.float64(running_var[c]) + momentum * np.float64(
                out_var.dtype.type(np.float64(var[c]) * bessel))
        else:
            out_mean[c] = running_mean[c]
            out_var[c] = running_var[c]
    return ok


# -- planes (N, C, S) -------------------------------------------------------------------------
#
# The loops index x[n, c, i] directly. An array view per (sample, channel) segment, handed to a
# helper, costs reference counting on the array that both threads share; on 7x7 planes that made
# the normalizing pass 3x slower than the direct loops below. Views remain only where a loop
# runs over PLANE_BLOCK values or more (long planes).


@_jit(inline="always")
def _normalize_segment(x, residual, has_res, m, s, b, act, out, j):
    """``out[j] = f((x[j] - m) s + b [+ r[j]])`` for one (sample, channel) segment ``j`` of planes
    seen as (N * C, S) arrays (inlined where it is called, so no call passes arrays per
    segment; indexing the (N, C, S) arrays by sample and channel instead measured 1.3x slower
    in eval on 8x2048x7x7)."""
    size = x.shape[1]
    if has_res:
        for i in range(size):
            out[j, i] = (x[j, i] - m) * s + b + residual[j, i]
    else:
        for i in range(size):
            out[j, i] = (x[j, i] - m) * s + b
    if act == RELU:
        for i in range(size):
            v = out[j, i]
            out[j, i] = 0 if v < 0 else v  # NaN stays NaN, as in torch.relu


@_jit(inline="always")
def _segments(x):
    """A (N, C, S) array as (N * C, S) (both are views of the same C-contiguous memory)."""
    return x.reshape((x.shape[0] * x.shape[1], x.shape[2]))


@_jit(inline="always")
def _segment_pair_sums(us, xs, k, moments):
    """The sums of a and a (x - k) (see :func:`_pair_term`) of one segment, in x's dtype."""
    zero = xs.dtype.type(0)
    t1 = zero
    t2 = zero
    for i in range(xs.shape[0]):
        a, q = _pair_term(us[i], xs[i], zero, False, k, k, k, k, IDENTITY, moments, zero)
        t1 += a
        t2 += q
    return t1, t2


# The segments' sums are functions of their own, called on a slice: one flat loop LLVM
# vectorizes (a loop with computed bounds inside the caller was left scalar, 15x slower).
@_jit(**_PLANE_REDUCE)
def _segment_sums(xs, shift):
    """(sum(x - shift), sum((x - shift)^2)) of one segment."""
    return _segment_pair_sums(xs, xs, shift, True)


@_jit(**_PLANE_REDUCE)
def _segment_grad_sums(ds, xs, centre):
    """(sum d, sum d (x - centre)) of one segment."""
    return _segment_pair_sums(ds, xs, centre, False)


@_jit(**_NO_NRT)
def _plane_grad_pre_activation(gs, xs, rs, has_res, m, s, b, act, buffer):
    """d = g * f'(z) for one segment (``gs`` itself when there is no activation)."""
    if act == IDENTITY:
        return gs
    zero = xs.dtype.type(0)
    for i in range(xs.shape[0]):
        buffer[i] = _grad_value(gs[i], xs[i], rs[i], has_res, m, s, b, act, zero)
    return buffer


# The planes' statistics and gradient sums share the term (_pair_term) and the segment loop
# (_segment_pair_sums) but keep a loop over segments each. One function for both, inlined into
# these per-channel functions, first paid its array arguments' reference counts on every channel
# (training forward, kernel alone, one thread: 1.14-1.27x the time on (4, 128, 36) and
# (8, 1024, 49)); inlined again once these were compiled without them (_PLANE_REDUCE), the
# training forward on (8, 512, 196) without activation still took 1.14-1.23x the time in five
# runs. One compiled per kind of terms from a closure: 1.1-1.6x.
@_jit(**_PLANE_REDUCE)
def _plane_sums(x, c):
    """Shifted sums of channel c: (shift, sum(x - shift), sum((x - shift)^2)), the shift its
    first value, in float64 over blocks of at most ``PLANE_BLOCK`` values summed in x's dtype
    (segments of at most a block indexed directly, longer ones a block at a time)."""
    batch, _, size = x.shape
    shift = x[0, c, 0]
    zero = x.dtype.type(0)
    s1 = 0.0
    s2 = 0.0
    if size <= PLANE_BLOCK:
        for n in range(batch):
            t1 = zero
            t2 = zero
            for i in range(size):
                xv = x[n, c, i]
                a, q = _pair_term(xv, xv, zero, False, shift, shift, shift, shift, IDENTITY,
                                  True, zero)
                t1 += a
                t2 += q
            s1 += t1
            s2 += t2
        return np.float64(shift), s1, s2
    for n in range(batch):
        xs = x[n, c]
        for start in range(0, size, PLANE_BLOCK):
            t1, t2 = _segment_sums(xs[start:start + PLANE_BLOCK], shift)
            s1 += t1
            s2 += t2
    return np.float64(shift), s1, s2


@_jit(inline="always")
def _train_forward_channel(x, weight, bias, eps, act, rs, has_res, xs, outs, mean, var, c):
    """Statistics of channel c into ``mean[c]``/``var[c]``, then its normalized output."""
    batch, channels, size = x.shape
    count = batch * size
    shift, s1, s2 = _plane_sums(x, c)
    # stored in the compute dtype, as the backward will read them
    mean[c], var[c] = _moments(shift, s1, s2, count)
    _, scale, beta = _channel_coefficients(mean, var, weight, bias, eps, c)
    # the coefficients in the input's dtype
    mc = x.dtype.type(mean[c])
    sc = x.dtype.type(scale)
    bc = x.dtype.type(beta)
    for n in range(batch):  # the segment unsigned: see _u
        _normalize_segment(xs, rs, has_res, mc, sc, bc, act, outs, _u(n * channels + c))


# -- short planes, on the calling thread --------------------------------------------------------
#
# Planes of at most SHORT_PLANE values (3x3, 4x4) are seen as rows: an (N, C, S) input is an
# (N, C * S) one whose every column is one position of one channel, so the rows kernels serve,
# with each channel's coefficients repeated over its S columns; the per-column sums they return
# are then joined per channel. A loop per (sample, channel) segment of 9 values spends more
# entering its vector loop, and on the horizontal sum of a reduction, than on the values. Eval,
# kernel alone, serial, segments against the flat run: (4, 512, 3, 3) 16.6 vs 9.0 us,
# (4, 1024, 3, 3) 25.5 vs 17.9; (4, 128, 6, 6) 5.8 vs 7.1 and (4, 512, 6, 6) 14.6 vs 24.9, so 6x6
# planes stay on segments.
#
# On several threads (training forward and backward) each thread takes a range of channels, whose
# columns are contiguous in every row, so no thread needs another's sums (split by rows instead,
# the flat loops had measured 2-3x slower on two threads than on one). Kernel alone, 2 threads,
# backward, segments against channel ranges: (8, 1152, 3, 3) 110 vs 79 us, (4, 1024, 3, 3) 72 vs
# 59, (8, 2048, 2, 2) 145 vs 72, (16, 576, 2, 2) 64 vs 31; training forward (8, 2048, 2, 2) 85 vs
# 52; but (8, 1024, 4, 4) 104 vs 116 (forward 64 vs 84), so 4x4 planes keep the segments there.
SHORT_PLANE = 16
SHORT_PLANE_PARALLEL = 9


@_jit(inline="always")
def _repeated(v, size, c0, c1):
    """Each value of the per-channel vector ``v`` repeated ``size`` times, channel after
    channel (the coefficient of every column of the (N, C * size) view), for channels
    [c0, c1) (the other columns unset)."""
    out = np.empty(v.shape[0] * size, dtype=v.dtype)
    n = _u(size)
    for c in range(_u(c0), _u(c1)):  # unsigned: see _u
        value = v[c]
        base = c * n
        for i in range(n):
            out[base + i] = value
    return out


@_jit(inline="always")
def _as_rows(x):
    """A (N, C, S) array as the (N, C * S) rows it is in memory."""
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]))


@_jit(inline="always")
def _eval_short_planes(x, m, s, b, act, residual, has_res, out):
    """Eval on planes of at most ``SHORT_PLANE`` values, on the calling thread, by the rows
    kernel's normalizing pass."""
    channels, size = x.shape[1], x.shape[2]
    xf = _as_rows(x)
    _normalize_row_block(xf, _repeated(m, size, 0, channels), _repeated(s, size, 0, channels),
                         _repeated(b, size, 0, channels), act, _as_rows(residual), has_res,
                         _as_rows(out), 0, xf.shape[0], 0, xf.shape[1])


@_jit(inline="always")
def _train_short_planes(x, weight, bias, eps, act, residual, has_res, out, mean, var, blocks):
    """:func:`train_forward_planes` on short planes (see ``SHORT_PLANE``), seen as rows:
    the rows kernel's shifted sums per column (the shift is each channel's first value, as in
    :func:`_plane_sums`), joined per channel, then its normalizing pass. Each of ``blocks``
    threads owns a range of channels, so its sums need no other thread's."""
    channels, size = x.shape[1], x.shape[2]
    xf, rf, outf = _as_rows(x), _as_rows(residual), _as_rows(out)
    if blocks == 1:
        _train_short_channels(xf, weight, bias, eps, act, rf, has_res, outf, mean, var, size, 0,
                              channels)
        return
    for k in prange(blocks):
        _train_short_channels(xf, weight, bias, eps, act, rf, has_res, outf, mean, var, size,
                              k * channels // blocks, (k + 1) * channels // blocks)


@_jit(inline="always")
def _train_short_channels(xf, weight, bias, eps, act, rf, has_res, outf, mean, var, size, c0,
                          c1):
    """:func:`_train_short_planes` for channels [c0, c1), columns [c0 * size, c1 * size), with
    its own scratch (full-width arrays, of which it fills and uses only those columns)."""
    batch, width = xf.shape
    lo, hi = c0 * size, c1 * size
    shift = np.empty(width, dtype=np.float64)
    for c in range(c0, c1):
        for i in range(c * size, (c + 1) * size):
            shift[i] = xf[0, c * size]
    columns = _zeros_in(2, width, lo, hi)
    coefficients = np.empty((3, width), dtype=xf.dtype)  # per column: mean, scale, shift
    _row_sums(xf, shift, 0, batch, columns[0], columns[1], lo, hi)
    count = batch * size
    for c in range(c0, c1):
        s1 = 0.0
        s2 = 0.0
        for i in range(c * size, (c + 1) * size):
            s1 += columns[0, i]
            s2 += columns[1, i]
        mean[c], var[c] = _moments(shift[c * size], s1, s2, count)
        _, scale, beta = _channel_coefficients(mean, var, weight, bias, eps, c)
        for i in range(c * size, (c + 1) * size):
            coefficients[0, i] = mean[c]
            coefficients[1, i] = scale
            coefficients[2, i] = beta
    _normalize_row_block(xf, coefficients[0], coefficients[1], coefficients[2], act, rf, has_res,
                         outf, 0, batch, lo, hi)


@_jit(inline="always")
def _backward_short_planes(grad, x, residual, has_res, mean, var, weight, bias, eps, act, train,
                           need_input, grad_input, grad_residual, need_residual, grad_weight,
                           grad_bias, blocks):
    """:func:`backward_planes` on short planes (see ``SHORT_PLANE``), seen as rows: the rows
    kernel's sums of d and d (x - mean) per column, joined per channel, then its pass for the
    input and residual gradients; each of ``blocks`` threads owns a range of channels."""
    channels, size = x.shape[1], x.shape[2]
    gf, xf, rf = _as_rows(grad), _as_rows(x), _as_rows(residual)
    gif, grf = _as_rows(grad_input), _as_rows(grad_residual)
    if blocks == 1:
        _backward_short_channels(gf, xf, rf, has_res, mean, var, weight, bias, eps, act, train,
                                 need_input, gif, grf, need_residual, grad_weight, grad_bias,
                                 size, 0, channels)
        return
    for k in prange(blocks):
        _backward_short_channels(gf, xf, rf, has_res, mean, var, weight, bias, eps, act, train,
                                 need_input, gif, grf, need_residual, grad_weight, grad_bias,
                                 size, k * channels // blocks, (k + 1) * channels // blocks)


@_jit(inline="always")
def _backward_short_channels(gf, xf, rf, has_res, mean, var, weight, bias, eps, act, train,
                             need_input, gif, grf, need_residual, grad_weight, grad_bias, size,
                             c0, c1):
    """:func:`_backward_short_planes` for channels [c0, c1), columns [c0 * size, c1 * size),
    with its own scratch (full-width arrays, of which it fills and uses only those columns)."""
    batch, width = xf.shape
    lo, hi = c0 * size, c1 * size
    m, s, b = _coefficients(xf, mean, var, weight, bias, eps)
    me = _repeated(m, size, c0, c1)
    se = _repeated(s, size, c0, c1)
    be = _repeated(b, size, c0, c1)
    columns = _zeros_in(2, width, lo, hi)
    terms = np.empty((2, width), dtype=xf.dtype)  # per column: k_centred, k_offset
    _row_grad_sums(gf, xf, rf, has_res, me, me, se, be, act, 0, batch, columns[0], columns[1],
                   False, 1, lo, hi)
    count = batch * size
    for c in range(c0, c1):
        sum_d = 0.0
        sum_dxc = 0.0
        for i in range(c * size, (c + 1) * size):
            sum_d += columns[0, i]
            sum_dxc += columns[1, i]
        _, k_centred, k_offset = _gradient_terms(mean, var, weight, bias, eps, c, sum_d, sum_dxc,
                                                 count, train, grad_weight, grad_bias)
        for i in range(c * size, (c + 1) * size):
            terms[0, i] = k_centred
            terms[1, i] = k_offset
    if not (need_input or need_residual):
        return
    _row_grad_input_block(gf, xf, rf, has_res, me, se, be, act, se, terms[0], terms[1],
                          need_input, gif, need_residual, grf, 0, batch, False, 1, lo, hi)


# -- planes kernels ---------------------------------------------------------------------------


@_jit(**_PARALLEL)
def train_forward_planes(x, weight, bias, eps, act, residual, has_res, out, mean, var, blocks):
    """Batch statistics into ``mean``/``var`` (biased, x's dtype) and ``out = f(BN(x) [+ r])``.

    Channels are shared among threads; ``blocks == 1`` runs them on the calling thread (as in
    every kernel here: a parallel loop costs about 1.3 us to launch even on one thread, a tenth
    of a small layer's kernel time)."""
    channels = x.shape[1]
    if x.shape[2] <= (SHORT_PLANE if blocks == 1 else SHORT_PLANE_PARALLEL):
        _train_short_planes(x, weight, bias, eps, act, residual, has_res, out, mean, var, blocks)
        return
    xs, rs, outs = _segments(x), _segments(residual), _segments(out)
    if blocks == 1:
        for c in range(channels):
            _train_forward_channel(x, weight, bias, eps, act, rs, has_res, xs, outs, mean, var, c)
        return
    for c in prange(channels):
        _train_forward_channel(x, weight, bias, eps, act, rs, has_res, xs, outs, mean, var, c)


@_jit(**_PARALLEL)
def eval_forward_planes(x, mean, var, weight, bias, eps, act, residual, has_res, out, blocks):
    """``out = f(BN(x) [+ r])`` with given statistics, in memory order: each of ``blocks``
    threads streams one contiguous run of (sample, channel) segments. Against a loop over
    channels, each thread jumping between samples, this measured 0.76-0.87x the time on 8x1024x14x14
    and the same on 7x7 and on longer planes (kernel alone, 2 threads)."""
    batch, channels, size = x.shape
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    if size <= SHORT_PLANE and blocks == 1:
        _eval_short_planes(x, m, s, b, act, residual, has_res, out)
        return
    segments = batch * channels
    xs, rs, outs = _segments(x), _segments(residual), _segments(out)
    # The channel of segment j is j % channels: computed once per block and then stepped, since
    # a division per segment shows on short planes (3x3 ones have 9 values each).
    if blocks == 1:
        c = 0
        for j in range(segments):
            _normalize_segment(xs, rs, has_res, m[c], s[c], b[c], act, outs, j)
            c = 0 if c == channels - 1 else c + 1
        return
    for k in prange(blocks):
        start = k * segments // blocks
        c = start % channels
        for j in range(_u(start), _u((k + 1) * segments // blocks)):  # unsigned: see _u
            _normalize_segment(xs, rs, has_res, m[c], s[c], b[c], act, outs, j)
            c = 0 if c == channels - 1 else c + 1


@_jit(**_PLANE_REDUCE)
def _plane_grad_sums(grad, x, residual, has_res, c, centre_of, m, s, b, act, buffer):
    """(sum d, sum d (x - centre)) of channel c, blocked as in :func:`_plane_sums`; on long
    segments d is first materialized into ``buffer`` (relu)."""
    batch, _, size = x.shape
    centre = x.dtype.type(centre_of)
    zero = x.dtype.type(0)
    sum_d = 0.0
    sum_dxc = 0.0
    if size <= PLANE_BLOCK:
        for n in range(batch):
            t1 = zero
            t2 = zero
            if act == IDENTITY:  # d = g: neither the residual nor the coefficients read
                for i in range(size):
                    a, q = _pair_term(grad[n, c, i], x[n, c, i], zero, False, centre, m, s, b,
                                      IDENTITY, False, zero)
                    t1 += a
                    t2 += q
            else:
                for i in range(size):
                    a, q = _pair_term(grad[n, c, i], x[n, c, i], residual[n, c, i], has_res,
                                      centre, m, s, b, act, False, zero)
                    t1 += a
                    t2 += q
            sum_d += t1
            sum_dxc += t2
        return sum_d, sum_dxc
    for n in range(batch):
        ds = _plane_grad_pre_activation(grad[n, c], x[n, c], residual[n, c], has_res, m, s, b,
                                        act, buffer)
        xs = x[n, c]
        for start in range(0, size, PLANE_BLOCK):
            stop = start + PLANE_BLOCK
            t1, t2 = _segment_grad_sums(ds[start:stop], xs[start:stop], centre)
            sum_d += t1
            sum_dxc += t2
    return sum_d, sum_dxc


@_jit(inline="always")
def _plane_grad_input(grad, x, residual, has_res, m, s, b, act, g, kc, ko, need_input,
                      grad_input, need_residual, grad_residual, c):
    """dx = d g + (x - m) kc + ko and dr = d for channel c."""
    batch, _, size = x.shape
    if act == IDENTITY:  # d = g: its own loops, without the residual (as in the rows kernels)
        for n in range(batch):
            if need_input:
                for i in range(size):
                    grad_input[n, c, i] = grad[n, c, i] * g + (x[n, c, i] - m) * kc + ko
            if need_residual:
                for i in range(size):
                    grad_residual[n, c, i] = grad[n, c, i]
        return
    zero = x.dtype.type(0)
    for n in range(batch):
        if need_input:
            for i in range(size):
                xv = x[n, c, i]
                d = _grad_value(grad[n, c, i], xv, residual[n, c, i], has_res, m, s, b, act, zero)
                grad_input[n, c, i] = d * g + (xv - m) * kc + ko
        if need_residual:
            for i in range(size):
                grad_residual[n, c, i] = _grad_value(grad[n, c, i], x[n, c, i], residual[n, c, i],
                                                     has_res, m, s, b, act, zero)


@_jit(inline="always")
def _backward_channel(grad, x, residual, has_res, mean, var, weight, bias, eps, act, train,
                      need_input, grad_input, grad_residual, need_residual, grad_weight,
                      grad_bias, buffer, c):
    """The gradients of channel c (``buffer``: a scratch segment, or an empty array where the
    activation's gradient is applied inline)."""
    batch, _, size = x.shape
    count = batch * size
    _, scale, beta = _channel_coefficients(mean, var, weight, bias, eps, c)
    # the coefficients in the input's dtype
    m = x.dtype.type(mean[c])
    s = x.dtype.type(scale)
    b = x.dtype.type(beta)
    sum_d, sum_dxc = _plane_grad_sums(grad, x, residual, has_res, c, mean[c], m, s, b, act,
                                      buffer)
    _, k_centred, k_offset = _gradient_terms(mean, var, weight, bias, eps, c, sum_d, sum_dxc,
                                             count, train, grad_weight, grad_bias)
    if not (need_input or need_residual):
        return
    _plane_grad_input(grad, x, residual, has_res, m, s, b, act, s, x.dtype.type(k_centred),
                      x.dtype.type(k_offset), need_input, grad_input, need_residual,
                      grad_residual, c)


@_jit(**_PARALLEL)
def backward_planes(
    grad, x, residual, has_res, mean, var, weight, bias, eps, act, train, need_input,
    grad_input, grad_residual, need_residual, grad_weight, grad_bias, blocks,
):
    """Gradients of ``f(BN(x) [+ r])``; ``grad_weight``/``grad_bias`` (x's dtype, summed in float64)
    receive sum(d * x_hat) and sum(d). ``blocks == 1``: on the calling thread."""
    channels, size = x.shape[1], x.shape[2]
    if size <= (SHORT_PLANE if blocks == 1 else SHORT_PLANE_PARALLEL):
        _backward_short_planes(grad, x, residual, has_res, mean, var, weight, bias, eps, act,
                               train, need_input, grad_input, grad_residual, need_residual,
                               grad_weight, grad_bias, blocks)
        return
    # a scratch segment only where d = g f'(z) is materialized (relu on long planes), one per
    # channel; elsewhere one empty array for all channels (allocating one per channel, with the
    # per-channel call of the input-gradient loop (now inlined) and the residual read on the
    # identity path, made this backward 1.15-1.4x slower on 7x7 and 14x14 planes)
    direct = act == IDENTITY or size <= PLANE_BLOCK
    no_buffer = np.empty(0, dtype=x.dtype)
    if blocks == 1:
        buffer = no_buffer if direct else np.empty(size, dtype=x.dtype)
        for c in range(channels):
            _backward_channel(grad, x, residual, has_res, mean, var, weight, bias, eps, act,
                              train, need_input, grad_input, grad_residual, need_residual,
                              grad_weight, grad_bias, buffer, c)
        return
    for c in prange(channels):
        buffer = no_buffer if direct else np.empty(size, dtype=x.dtype)
        _backward_channel(grad, x, residual, has_res, mean, var, weight, bias, eps, act, train,
                          need_input, grad_input, grad_residual, need_residual, grad_weight,
                          grad_bias, buffer, c)


# -- planes, one range of channels or segments on the calling thread --------------------------
#
# The compiled call path launches a parallel call with torch's ``at::parallel_for``, not with the
# parallel loops above: each of torch's threads calls one of these on its share of the units,
# which are those loops' units (channels; eval: segments). Every unit's result depends on
# that unit alone, so they give the kernels' results bit for bit on any split. Only for calls
# that the kernels above run on more than one block: the short-plane cut is the parallel one.


@_jit(**_PARALLEL)
def train_planes_range(x, weight, bias, eps, act, out, mean, var, c0, c1):
    """:func:`train_forward_planes` on several blocks, for channels [c0, c1) only."""
    size = x.shape[2]
    if size <= SHORT_PLANE_PARALLEL:
        _train_short_channels(_as_rows(x), weight, bias, eps, act, _as_rows(x), False,
                              _as_rows(out), mean, var, size, c0, c1)
        return
    xs, outs = _segments(x), _segments(out)
    for c in range(c0, c1):
        _train_forward_channel(x, weight, bias, eps, act, xs, False, xs, outs, mean, var, c)


@_jit(**_PARALLEL)
def eval_planes_range(x, mean, var, weight, bias, eps, act, out, j0, j1):
    """:func:`eval_forward_planes` on several blocks, for (sample, channel) segments [j0, j1)."""
    channels = x.shape[1]
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    xs, outs = _segments(x), _segments(out)
    c = j0 % channels
    for j in range(_u(j0), _u(j1)):  # unsigned segments: see _u
        _normalize_segment(xs, xs, False, m[c], s[c], b[c], act, outs, j)
        c = 0 if c == channels - 1 else c + 1


@_jit(**_PARALLEL)
def backward_planes_range(grad, x, mean, var, weight, bias, eps, act, need_input, grad_input,
                          grad_weight, grad_bias, c0, c1):
    """:func:`backward_planes` (training, no residual) on several blocks, for channels
    [c0, c1) only."""
    size = x.shape[2]
    if size <= SHORT_PLANE_PARALLEL:
        gf, xf, gif = _as_rows(grad), _as_rows(x), _as_rows(grad_input)
        _backward_short_channels(gf, xf, xf, False, mean, var, weight, bias, eps, act, True,
                                 need_input, gif, gif, False, grad_weight, grad_bias, size, c0,
                                 c1)
        return
    direct = act == IDENTITY or size <= PLANE_BLOCK
    buffer = np.empty(0 if direct else size, dtype=x.dtype)
    for c in range(c0, c1):
        _backward_channel(grad, x, x, False, mean, var, weight, bias, eps, act, True, need_input,
                          grad_input, grad_input, False, grad_weight, grad_bias, buffer, c)


# -- rows (R, C) ------------------------------------------------------------------------------
#
# Every loop over columns runs over a range [lo, hi) (all columns, or one thread's channels of
# short planes) counted in unsigned integers: with a signed start LLVM cannot rule out a negative
# index, keeps Numba's wraparound select on every access and leaves the loop scalar (measured
# 5-6x slower on (8, 16384) and (1024, 256)); unsigned indices have no wraparound. Rows are
# counted in unsigned integers too: a block's first row is a runtime value, and with it signed
# every row (every sweep, in the sums) paid the select and its set-up again. Kernel alone on one
# block of (100352, 64), one thread: the eval pass took 1.2-1.9x a copy with signed rows and
# 1.15-1.25x unsigned (about what the whole-call kernel got, its first row the constant 0);
# the training sums 0.87-0.89x the time of signed rows (0.96 on (25088, 256)). The planes'
# normalizing pass counts its (sample, channel) segments unsigned for the same reason (eval
# range alone, one thread: 0.81-0.87x the time on 8x1024x14x14, 0.90-0.91x on 8x2048x7x7).
_u = np.uint64
#
# Rows are indexed as x[r, c] directly (no per-row views, no per-row scratch allocation, no
# per-row helper taking arrays) so that the inner loop over channels is a plain strided-by-one
# loop LLVM vectorizes; row-view helpers and a scratch array allocated per row made these kernels
# 2-5x slower than torch on channels_last inputs. Each parallel loop runs over ``blocks``
# contiguous row blocks, one per kernel thread, so the per-block set-up is paid once.


@_jit(inline="always")
def _row_pair_sums(u, x, residual, has_res, k_of, m, s, b, act, moments, sweep, start, stop,
                   s1, s2, prefetch, ahead, lo, hi):
    """The rows' one reduction: the sums of ``a`` and ``a (x - k)`` (see :func:`_pair_term`)
    over rows [start, stop), columns [lo, hi), added into the float64 totals s1, s2 (as every
    rows function here, it reads and writes only those columns). Blocks of ``ROW_BLOCK`` rows
    are summed in x's dtype, ``sweep`` rows (8 or 4; 0: none) per sweep over the channels and
    the rest one at a time; ``prefetch``: hint the rows of ``u`` ``ahead`` (see
    ``PREFETCH_ABOVE_BYTES``)."""
    channels = x.shape[1]
    k = np.empty(channels, dtype=x.dtype)
    for c in range(_u(lo), _u(hi)):
        k[c] = k_of[c]
    # both block accumulators in one local array: measured 10-20% faster on (100352, 64) than
    # two separate ones, with the same sums
    t = np.empty((2, channels), dtype=x.dtype)
    zero = x.dtype.type(0)
    for block in range(_u(start), _u(stop), _u(ROW_BLOCK)):  # unsigned rows, as below
        end = min(block + _u(ROW_BLOCK), _u(stop))
        for c in range(_u(lo), _u(hi)):
            t[0, c] = 0
            t[1, c] = 0
        r = block
        while sweep > 0 and r + _u(sweep) <= end:
            if prefetch:
                _prefetch_rows(u, np.int64(r) + ahead, sweep)
            for c in range(_u(lo), _u(hi)):
                kc, mc, sc, bc = k[c], m[c], s[c], b[c]
                a0, q0 = _pair_term(u[r, c], x[r, c], zero, False, kc, mc, sc, bc, act, moments,
                                    zero)
                a1, q1 = _pair_term(u[r + _u(1), c], x[r + _u(1), c], zero, False, kc, mc, sc, bc,
                                    act, moments, zero)
                a2, q2 = _pair_term(u[r + _u(2), c], x[r + _u(2), c], zero, False, kc, mc, sc, bc,
                                    act, moments, zero)
                a3, q3 = _pair_term(u[r + _u(3), c], x[r + _u(3), c], zero, False, kc, mc, sc, bc,
                                    act, moments, zero)
                a = (a0 + a1) + (a2 + a3)
                q = (q0 + q1) + (q2 + q3)
                if sweep == 8:
                    a4, q4 = _pair_term(u[r + _u(4), c], x[r + _u(4), c], zero, False, kc, mc, sc,
                                        bc, act, moments, zero)
                    a5, q5 = _pair_term(u[r + _u(5), c], x[r + _u(5), c], zero, False, kc, mc, sc,
                                        bc, act, moments, zero)
                    a6, q6 = _pair_term(u[r + _u(6), c], x[r + _u(6), c], zero, False, kc, mc, sc,
                                        bc, act, moments, zero)
                    a7, q7 = _pair_term(u[r + _u(7), c], x[r + _u(7), c], zero, False, kc, mc, sc,
                                        bc, act, moments, zero)
                    a = a + ((a4 + a5) + (a6 + a7))
                    q = q + ((q4 + q5) + (q6 + q7))
                t[0, c] += a
                t[1, c] += q
            r += _u(sweep)
        for tail in range(r, end):
            if prefetch:
                _prefetch_rows(u, np.int64(tail) + ahead, 1)
            for c in range(_u(lo), _u(hi)):
                a, q = _pair_term(u[tail, c], x[tail, c], residual[tail, c], has_res, k[c], m[c],
                                  s[c], b[c], act, moments, zero)
                t[0, c] += a
                t[1, c] += q
        for c in range(_u(lo), _u(hi)):
            s1[c] += t[0, c]
            s2[c] += t[1, c]


@_jit(**_REDUCE)
def _row_sums(x, shift, start, stop, s1, s2, lo, hi):
    """Shifted sums of rows [start, stop), columns [lo, hi), into s1, s2: eight rows per sweep
    (the block accumulators are loaded and stored an eighth as often; against four rows per
    sweep, measured 0.67x the time on (100352, 64) and 0.8x on (1024, 4096), the same
    elsewhere)."""
    _row_pair_sums(x, x, x, False, shift, shift, shift, shift, IDENTITY, True, 8, start, stop,
                   s1, s2, False, 1, lo, hi)


@_jit(inline="always")
def _joined(s1, s2, c):
    """Column c of the per-block partial sums ``s1``, ``s2`` (blocks, channels), each joined
    over the blocks in block order (the order every rows kernel and the compiled path's blocks
    keep, so that they give the same bits)."""
    t1 = 0.0
    t2 = 0.0
    for k in range(s1.shape[0]):
        t1 += s1[k, c]
        t2 += s2[k, c]
    return t1, t2


@_jit()
def _normalize_row_block(x, m, s, b, act, residual, has_res, out, start, stop, lo, hi):
    for r in range(_u(start), _u(stop)):  # unsigned rows: see "rows" above
        if has_res:
            for c in range(_u(lo), _u(hi)):
                out[r, c] = (x[r, c] - m[c]) * s[c] + b[c] + residual[r, c]
        else:
            for c in range(_u(lo), _u(hi)):
                out[r, c] = (x[r, c] - m[c]) * s[c] + b[c]
        if act == RELU:
            for c in range(_u(lo), _u(hi)):
                v = out[r, c]
                out[r, c] = 0 if v < 0 else v  # NaN stays NaN, as in torch.relu


@_jit(**_PARALLEL)
def train_forward_rows(x, weight, bias, eps, act, residual, has_res, out, mean, var, blocks):
    """As :func:`train_forward_planes`; ``blocks`` row blocks accumulate partial sums."""
    rows, channels = x.shape
    shift = np.empty(channels, dtype=np.float64)
    for c in range(channels):
        shift[c] = x[0, c]
    s1 = _zeros(blocks, channels)
    s2 = _zeros(blocks, channels)
    if blocks == 1:
        _row_sums(x, shift, 0, rows, s1[0], s2[0], 0, channels)
    else:
        for k in prange(blocks):
            _row_sums(x, shift, k * rows // blocks, (k + 1) * rows // blocks, s1[k], s2[k], 0,
                      channels)
    for c in range(channels):
        t1, t2 = _joined(s1, s2, c)
        mean[c], var[c] = _moments(shift[c], t1, t2, rows)
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    _normalize_rows(x, m, s, b, act, residual, has_res, out, blocks)


@_jit(**_PARALLEL)
def eval_forward_rows(x, mean, var, weight, bias, eps, act, residual, has_res, out, blocks):
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    _normalize_rows(x, m, s, b, act, residual, has_res, out, blocks)


@_jit(inline="always")
def _normalize_rows(x, m, s, b, act, residual, has_res, out, blocks):
    """The elementwise pass over ``blocks`` row blocks (on the calling thread when 1)."""
    rows, channels = x.shape
    if blocks == 1:
        _normalize_row_block(x, m, s, b, act, residual, has_res, out, 0, rows, 0, channels)
        return
    for k in prange(blocks):
        _normalize_row_block(x, m, s, b, act, residual, has_res, out,
                             k * rows // blocks, (k + 1) * rows // blocks, 0, channels)


# The backward's sums, one compiled function per kind of terms: the three inlined into one
# function measured 1.19-1.31x the time of the earlier hand-written relu loop on (100352, 64),
# one thread (the same hot loops in the assembly); each in a function of its own, 0.87-1.02x.
# The whole relu backward on that shape, one thread, still read 0.99-1.12x (median 1.08) of
# the earlier kernels' time, 0.97-1.00x on two threads (scripts/kernels_ab.py).
@_jit(**_REDUCE)
def _row_identity_grad_sums(grad, x, centre_of, start, stop, s1, s2, lo, hi):
    """d = g: four rows per sweep (eight measured up to 1.19x the time, on (392, 2048))."""
    _row_pair_sums(grad, x, x, False, centre_of, centre_of, centre_of, centre_of, IDENTITY,
                   False, 4, start, stop, s1, s2, False, 1, lo, hi)


@_jit(**_REDUCE)
def _row_relu_grad_sums(grad, x, centre_of, m, s, b, start, stop, s1, s2, prefetch, ahead, lo,
                        hi):
    """d = g where z > 0 (no residual), the mask inline (no scratch row), four rows per
    sweep."""
    _row_pair_sums(grad, x, x, False, centre_of, m, s, b, RELU, False, 4, start, stop, s1, s2,
                   prefetch, ahead, lo, hi)


@_jit(**_REDUCE)
def _row_residual_grad_sums(grad, x, residual, has_res, centre_of, m, s, b, act, start, stop,
                            s1, s2, prefetch, ahead, lo, hi):
    """Any other case (an activation over a residual sum): one row at a time."""
    _row_pair_sums(grad, x, residual, has_res, centre_of, m, s, b, act, False, 0, start, stop,
                   s1, s2, prefetch, ahead, lo, hi)


@_jit(**_REDUCE)
def _row_grad_sums(grad, x, residual, has_res, centre_of, m, s, b, act, start, stop, s1, s2,
                   prefetch, ahead, lo, hi):
    """(sum d, sum d (x - centre)) of rows [start, stop), columns [lo, hi), into s1, s2."""
    if act == IDENTITY:
        _row_identity_grad_sums(grad, x, centre_of, start, stop, s1, s2, lo, hi)
    elif act == RELU and not has_res:
        _row_relu_grad_sums(grad, x, centre_of, m, s, b, start, stop, s1, s2, prefetch, ahead,
                            lo, hi)
    else:
        _row_residual_grad_sums(grad, x, residual, has_res, centre_of, m, s, b, act, start,
                                stop, s1, s2, prefetch, ahead, lo, hi)


@_jit()
def _row_grad_input_block(grad, x, residual, has_res, m, s, b, act, gain, k_centred, k_offset,
                          need_input, grad_input, need_residual, grad_residual, start, stop,
                          prefetch, ahead, lo, hi):
    zero = x.dtype.type(0)
    for r in range(_u(start), _u(stop)):  # unsigned rows: see "rows" above
        if prefetch:
            _prefetch_rows(grad, np.int64(r) + ahead, 1)
        if act == IDENTITY:  # its own loop: through _grad_value it measured 3-6% slower
            if need_input:
                for c in range(_u(lo), _u(hi)):
                    grad_input[r, c] = (grad[r, c] * gain[c] + (x[r, c] - m[c]) * k_centred[c]
                                        + k_offset[c])
            if need_residual:
                for c in range(_u(lo), _u(hi)):
                    grad_residual[r, c] = grad[r, c]
        elif act == RELU and not has_res and not need_residual:  # the mask inline, as above
            if need_input:
                for c in range(_u(lo), _u(hi)):
                    centred = x[r, c] - m[c]
                    d = grad[r, c] if centred * s[c] + b[c] > 0 else zero
                    grad_input[r, c] = d * gain[c] + centred * k_centred[c] + k_offset[c]
        else:
            if need_input:
                for c in range(_u(lo), _u(hi)):
                    xv = x[r, c]
                    d = _grad_value(grad[r, c], xv, residual[r, c], has_res, m[c], s[c], b[c],
                                    act, zero)
                    grad_input[r, c] = d * gain[c] + (xv - m[c]) * k_centred[c] + k_offset[c]
            if need_residual:
                for c in range(_u(lo), _u(hi)):
                    grad_residual[r, c] = _grad_value(grad[r, c], x[r, c], residual[r, c],
                                                      has_res, m[c], s[c], b[c], act, zero)


@_jit(**_PARALLEL)
def backward_rows(
    grad, x, residual, has_res, mean, var, weight, bias, eps, act, train, need_input,
    grad_input, grad_residual, need_residual, grad_weight, grad_bias, blocks,
):
    """As :func:`backward_planes`; ``blocks`` row blocks accumulate partial sums."""
    rows, channels = x.shape
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    prefetch, ahead = _prefetches(grad, act)
    s1 = _zeros(blocks, channels)
    s2 = _zeros(blocks, channels)
    if blocks == 1:
        _row_grad_sums(grad, x, residual, has_res, mean, m, s, b, act, 0, rows, s1[0], s2[0],
                       prefetch, ahead, 0, channels)
    else:
        for k in prange(blocks):
            _row_grad_sums(grad, x, residual, has_res, mean, m, s, b, act,
                           k * rows // blocks, (k + 1) * rows // blocks, s1[k], s2[k],
                           prefetch, ahead, 0, channels)
    gain = np.empty(channels, dtype=x.dtype)
    k_centred = np.empty(channels, dtype=x.dtype)
    k_offset = np.empty(channels, dtype=x.dtype)
    for c in range(channels):
        sum_d, sum_dxc = _joined(s1, s2, c)
        gain[c], k_centred[c], k_offset[c] = _gradient_terms(
            mean, var, weight, bias, eps, c, sum_d, sum_dxc, rows, train, grad_weight, grad_bias)
    if not (need_input or need_residual):
        return
    if blocks == 1:
        _row_grad_input_block(grad, x, residual, has_res, m, s, b, act, gain, k_centred,
                              k_offset, need_input, grad_input, need_residual, grad_residual,
                              0, rows, prefetch, ahead, 0, channels)
        return
    for k in prange(blocks):
        _row_grad_input_block(grad, x, residual, has_res, m, s, b, act, gain, k_centred,
                              k_offset, need_input, grad_input, need_residual, grad_residual,
                              k * rows // blocks, (k + 1) * rows // blocks, prefetch, ahead, 0,
                              channels)


# -- rows, one block on the calling thread ------------------------------------------------------
#
# As the planes' ranges above, for the compiled path's parallel calls on rows: block k of
# ``blocks`` is the rows kernels' block k, and the per-block partial sums go to a float64
# scratch array ``sums`` (2 * blocks, channels) that the caller allocates. The sums are joined in
# the kernels' order by every block (a few operations per channel) so that no block waits for
# another; block 0 alone writes the per-channel results.


@_jit(**_PARALLEL)
def rows_block_sums(x, sums, k, blocks):
    """Block k's shifted sums of :func:`train_forward_rows`, into ``sums[k]`` and
    ``sums[blocks + k]``."""
    rows, channels = x.shape
    shift = np.empty(channels, dtype=np.float64)
    for c in range(channels):
        shift[c] = x[0, c]
        sums[k, c] = 0.0
        sums[blocks + k, c] = 0.0
    _row_sums(x, shift, k * rows // blocks, (k + 1) * rows // blocks, sums[k], sums[blocks + k],
              0, channels)


@_jit(**_PARALLEL)
def rows_block_train(x, weight, bias, eps, act, out, mean, var, sums, k, blocks):
    """The rest of :func:`train_forward_rows` for block k, once every block's sums are in
    ``sums``: the statistics (written by block 0) and block k's output rows."""
    rows, channels = x.shape
    m = np.empty(channels, dtype=x.dtype)
    v = np.empty(channels, dtype=x.dtype)
    s1, s2 = sums[:blocks], sums[blocks:]
    for c in range(channels):
        t1, t2 = _joined(s1, s2, c)
        m[c], v[c] = _moments(np.float64(x[0, c]), t1, t2, rows)
    if k == 0:
        for c in range(channels):
            mean[c] = m[c]
            var[c] = v[c]
    rows_block_eval(x, m, v, weight, bias, eps, act, out, k, blocks)


@_jit(**_PARALLEL)
def rows_block_eval(x, mean, var, weight, bias, eps, act, out, k, blocks):
    """:func:`eval_forward_rows` for block k of ``blocks``."""
    rows = x.shape[0]
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    _normalize_row_block(x, m, s, b, act, x, False, out, k * rows // blocks,
                         (k + 1) * rows // blocks, 0, x.shape[1])


@_jit(**_PARALLEL)
def rows_block_grad_sums(grad, x, mean, var, weight, bias, eps, act, sums, k, blocks):
    """Block k's sums of :func:`backward_rows` into ``sums[k]``, ``sums[blocks + k]``."""
    rows, channels = x.shape
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    prefetch, ahead = _prefetches(grad, act)
    for c in range(channels):
        sums[k, c] = 0.0
        sums[blocks + k, c] = 0.0
    _row_grad_sums(grad, x, x, False, mean, m, s, b, act, k * rows // blocks,
                   (k + 1) * rows // blocks, sums[k], sums[blocks + k], prefetch, ahead, 0,
                   channels)


@_jit(**_PARALLEL)
def rows_block_grad_input(grad, x, mean, var, weight, bias, eps, act, need_input, grad_input,
                          grad_weight, grad_bias, sums, k, blocks):
    """The rest of :func:`backward_rows` (training, no residual) for block k, once every block's
    sums are in ``sums``: the parameter gradients (written by block 0) and block k's input
    gradient rows."""
    rows, channels = x.shape
    m, s, b = _coefficients(x, mean, var, weight, bias, eps)
    prefetch, ahead = _prefetches(grad, act)
    gain = np.empty(channels, dtype=x.dtype)
    k_centred = np.empty(channels, dtype=x.dtype)
    k_offset = np.empty(channels, dtype=x.dtype)
    gw = grad_weight if k == 0 else np.empty(channels, dtype=grad_weight.dtype)
    gb = grad_bias if k == 0 else np.empty(channels, dtype=grad_bias.dtype)
    s1, s2 = sums[:blocks], sums[blocks:]
    for c in range(channels):
        sum_d, sum_dxc = _joined(s1, s2, c)
        gain[c], k_centred[c], k_offset[c] = _gradient_terms(
            mean, var, weight, bias, eps, c, sum_d, sum_dxc, rows, True, gw, gb)
    if need_input:
        _row_grad_input_block(grad, x, x, False, m, s, b, act, gain, k_centred, k_offset, True,
                              grad_input, False, grad_input, k * rows // blocks,
                              (k + 1) * rows // blocks, prefetch, ahead, 0, channels)


# -- entry points by address --------------------------------------------------------------------
#
# Handing a tensor to Numba as a NumPy view (``Tensor.numpy()``) costs about 0.6 us, and a
# training step used to hand over some twenty: on a 60x100 layer, about an eighth of the step.
# These entry points take each tensor's ``data_ptr()`` (0.06 us) and the input's geometry, build
# the arrays inside compiled code, where a view costs nothing, and call the kernels above.
#
# The geometry ``(batch, channels, size)`` is that of an input (N, C, *spatial) with ``size``
# values per plane; ``planes`` says which canonical view the kernels get: ``(N, C, S)`` planes,
# or ``(N * S, C)`` rows ((N, C) inputs and channels_last).
#
# The caller's contract (``batchnorm.backends.cpu`` keeps it): each address is that of a dense
# CPU tensor, laid out as the view says, of the dtype of ``like`` (a NumPy scalar that only
# carries the dtype), alive until the call returns. An absent per-channel vector (no weight, no
# bias) has length 0 and its address is never read.
#
# They live in this file, not a module of their own, because Numba's disk cache checks only the
# source file of the function it caches: a compiled entry point in another file kept the code of
# the kernels it was compiled with after those kernels changed.


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
def train_forward_at(like, batch, channels, size, planes, x, weight, weight_length, bias,
                     bias_length, eps, act, residual, has_res, out, mean, var, blocks):
    """:func:`train_forward_planes` or :func:`train_forward_rows`."""
    w = _vector(weight, weight_length, like)
    b = _vector(bias, bias_length, like)
    m, v = _vector(mean, channels, like), _vector(var, channels, like)
    if planes:
        shape = (batch, channels, size)
        train_forward_planes(_at(x, shape, like), w, b, eps, act, _at(residual, shape, like),
                             has_res, _at(out, shape, like), m, v, blocks)
    else:
        shape2 = (batch * size, channels)
        train_forward_rows(_at(x, shape2, like), w, b, eps, act, _at(residual, shape2, like),
                           has_res, _at(out, shape2, like), m, v, blocks)


@_jit()
def train_forward_update_at(like, batch, channels, size, planes, x, weight, weight_length, bias,
                            bias_length, eps, act, residual, has_res, out, mean, var,
                            running_mean, running_var, bessel, momentum, tracked, blocks):
    """:func:`train_forward_at`, then :func:`running_update` of the running statistics (dense
    vectors of ``channels`` values of ``like``'s dtype, updated in place) from the batch's:
    a training step's forward in one call. Returns whether the batch statistics were finite;
    if they were, adds 1 to the int64 at ``tracked`` (the count of batches; 0: none)."""
    train_forward_at(like, batch, channels, size, planes, x, weight, weight_length, bias,
                     bias_length, eps, act, residual, has_res, out, mean, var, blocks)
    return running_update_counted_at(like, channels, mean, var, running_mean, running_var,
                                     bessel, momentum, tracked)


@_jit()
def running_update_counted_at(like, channels, mean, var, running_mean, running_var, bessel,
                              momentum, tracked):
    """:func:`running_update` in place of the running statistics from the batch's (every one a
    dense vector of ``channels`` values of ``like``'s dtype), and the count of batches: returns
    whether the batch statistics were finite; if they were, adds 1 to the int64 at ``tracked``
    (0: no count)."""
    rm, rv = _vector(running_mean, channels, like), _vector(running_var, channels, like)
    finite = running_update(rm, rv, _vector(mean, channels, like), _vector(var, channels, like),
                            bessel, momentum, rm, rv)
    if finite and tracked != 0:
        count = _vector(tracked, 1, np.int64(0))
        count[0] += 1
    return finite


@_jit()
def eval_forward_at(like, batch, channels, size, planes, x, mean, var, weight, weight_length,
                    bias, bias_length, eps, act, residual, has_res, out, blocks):
    """:func:`eval_forward_planes` or :func:`eval_forward_rows`."""
    m, v = _vector(mean, channels, like), _vector(var, channels, like)
    w = _vector(weight, weight_length, like)
    b = _vector(bias, bias_length, like)
    if planes:
        shape = (batch, channels, size)
        eval_forward_planes(_at(x, shape, like), m, v, w, b, eps, act, _at(residual, shape, like),
                            has_res, _at(out, shape, like), blocks)
    else:
        shape2 = (batch * size, channels)
        eval_forward_rows(_at(x, shape2, like), m, v, w, b, eps, act,
                          _at(residual, shape2, like), has_res, _at(out, shape2, like), blocks)


@_jit()
def backward_at(like, batch, channels, size, planes, grad, x, residual, has_res, mean, var,
                weight, weight_length, bias, bias_length, eps, act, train, need_input,
                grad_input, grad_residual, need_residual, grad_weight, grad_bias, blocks):
    """:func:`backward_planes` or :func:`backward_rows`."""
    m, v = _vector(mean, channels, like), _vector(var, channels, like)
    w = _vector(weight, weight_length, like)
    b = _vector(bias, bias_length, like)
    gw, gb = _vector(grad_weight, channels, like), _vector(grad_bias, channels, like)
    if planes:
        shape = (batch, channels, size)
        backward_planes(_at(grad, shape, like), _at(x, shape, like), _at(residual, shape, like),
                        has_res, m, v, w, b, eps, act, train, need_input,
                        _at(grad_input, shape, like), _at(grad_residual, shape, like),
                        need_residual, gw, gb, blocks)
    else:
        shape2 = (batch * size, channels)
        backward_rows(_at(grad, shape2, like), _at(x, shape2, like), _at(residual, shape2, like),
                      has_res, m, v, w, b, eps, act, train, need_input,
                      _at(grad_input, shape2, like), _at(grad_residual, shape2, like),
                      need_residual, gw, gb, blocks)


@_jit()
def running_update_at(channels, running_mean, mean_like, running_var, var_like, mean,
                      batch_mean_like, var, batch_var_like, bessel, momentum, out_mean, out_var):
    """:func:`running_update`; each statistic in its own dtype, ``out_mean`` and ``out_var`` in
    those of ``running_mean`` and ``running_var``."""
    return running_update(
        _vector(running_mean, channels, mean_like), _vector(running_var, channels, var_like),
        _vector(mean, channels, batch_mean_like), _vector(var, channels, batch_var_like),
        bessel, momentum, _vector(out_mean, channels, mean_like),
        _vector(out_var, channels, var_like),
    )


# -- entry points by C address ------------------------------------------------------------------
#
# The compiled call path (``batchnorm.backends.cpu.native``) calls these through plain C
# functions, made here with ``numba.cfunc`` on first use (:func:`c_entry_points`): the three
# entry points of a common call (the training forward with its running-statistics update, the
# inference forward, the training backward), with the arguments of the ``*_at`` entry points
# above less what the common call fixes (both per-channel vectors present, no residual), for
# calls on one block; and, for calls on several blocks, which it runs on torch's threads, the
# planes' ranges and the rows' blocks above and the running-statistics update. ``like`` is a
# value of the dtype, which selects the pointer type. They live in this file for the disk
# cache's sake (see above).


def _train_forward_c(like, batch, channels, size, planes, x, weight, bias, eps, act, out, mean,
                     var, running_mean, running_var, bessel, momentum, tracked, blocks):
    finite = train_forward_update_at(
        like, batch, channels, size, planes != 0, x, weight, channels, bias, channels, eps, act,
        x, False, out, mean, var, running_mean, running_var, bessel, momentum, tracked, blocks,
    )
    return 1 if finite else 0


def _eval_forward_c(like, batch, channels, size, planes, x, mean, var, weight, bias, eps, act,
                    out, blocks):
    eval_forward_at(like, batch, channels, size, planes != 0, x, mean, var, weight, channels,
                    bias, channels, eps, act, x, False, out, blocks)


def _backward_c(like, batch, channels, size, planes, grad, x, mean, var, weight, bias, eps, act,
                need_input, grad_input, grad_weight, grad_bias, blocks):
    backward_at(like, batch, channels, size, planes != 0, grad, x, x, False, mean, var, weight,
                channels, bias, channels, eps, act, True, need_input != 0, grad_input, grad_input,
                False, grad_weight, grad_bias, blocks)


def _train_range_c(like, batch, channels, size, x, weight, bias, eps, act, out, mean, var, c0,
                   c1):
    shape = (batch, channels, size)
    train_planes_range(_at(x, shape, like), _vector(weight, channels, like),
                       _vector(bias, channels, like), eps, act, _at(out, shape, like),
                       _vector(mean, channels, like), _vector(var, channels, like), c0, c1)


def _update_c(like, channels, mean, var, running_mean, running_var, bessel, momentum, tracked):
    finite = running_update_counted_at(like, channels, mean, var, running_mean, running_var,
                                       bessel, momentum, tracked)
    return 1 if finite else 0


def _eval_range_c(like, batch, channels, size, x, mean, var, weight, bias, eps, act, out, j0,
                  j1):
    shape = (batch, channels, size)
    eval_planes_range(_at(x, shape, like), _vector(mean, channels, like),
                      _vector(var, channels, like), _vector(weight, channels, like),
                      _vector(bias, channels, like), eps, act, _at(out, shape, like), j0, j1)


def _backward_range_c(like, batch, channels, size, grad, x, mean, var, weight, bias, eps, act,
                      need_input, grad_input, grad_weight, grad_bias, c0, c1):
    shape = (batch, channels, size)
    backward_planes_range(_at(grad, shape, like), _at(x, shape, like),
                          _vector(mean, channels, like), _vector(var, channels, like),
                          _vector(weight, channels, like), _vector(bias, channels, like), eps,
                          act, need_input != 0, _at(grad_input, shape, like),
                          _vector(grad_weight, channels, like),
                          _vector(grad_bias, channels, like), c0, c1)


def _rows_sums_c(like, rows, channels, x, sums, k, blocks):
    rows_block_sums(_at(x, (rows, channels), like),
                    _at(sums, (2 * blocks, channels), np.float64(0.0)), k, blocks)


def _rows_train_c(like, rows, channels, x, weight, bias, eps, act, out, mean, var, sums, k,
                  blocks):
    shape = (rows, channels)
    rows_block_train(_at(x, shape, like), _vector(weight, channels, like),
                     _vector(bias, channels, like), eps, act, _at(out, shape, like),
                     _vector(mean, channels, like), _vector(var, channels, like),
                     _at(sums, (2 * blocks, channels), np.float64(0.0)), k, blocks)


def _rows_eval_c(like, rows, channels, x, mean, var, weight, bias, eps, act, out, k, blocks):
    shape = (rows, channels)
    rows_block_eval(_at(x, shape, like), _vector(mean, channels, like),
                    _vector(var, channels, like), _vector(weight, channels, like),
                    _vector(bias, channels, like), eps, act, _at(out, shape, like), k, blocks)


def _rows_grad_sums_c(like, rows, channels, grad, x, mean, var, weight, bias, eps, act, sums, k,
                      blocks):
    shape = (rows, channels)
    rows_block_grad_sums(_at(grad, shape, like), _at(x, shape, like),
                         _vector(mean, channels, like), _vector(var, channels, like),
                         _vector(weight, channels, like), _vector(bias, channels, like), eps,
                         act, _at(sums, (2 * blocks, channels), np.float64(0.0)), k, blocks)


def _rows_grad_input_c(like, rows, channels, grad, x, mean, var, weight, bias, eps, act,
                       need_input, grad_input, grad_weight, grad_bias, sums, k, blocks):
    shape = (rows, channels)
    rows_block_grad_input(_at(grad, shape, like), _at(x, shape, like),
                          _vector(mean, channels, like), _vector(var, channels, like),
                          _vector(weight, channels, like), _vector(bias, channels, like), eps,
                          act, need_input != 0, _at(grad_input, shape, like),
                          _vector(grad_weight, channels, like),
                          _vector(grad_bias, channels, like),
                          _at(sums, (2 * blocks, channels), np.float64(0.0)), k, blocks)


def _c_signatures(like):
    i64, f64 = types.int64, types.float64
    return {
        _train_forward_c: types.int32(like, i64, i64, i64, i64, i64, i64, i64, f64, i64, i64, i64,
                                      i64, i64, i64, f64, f64, i64, i64),
        _eval_forward_c: types.void(like, i64, i64, i64, i64, i64, i64, i64, i64, i64, f64, i64,
                                    i64, i64),
        _backward_c: types.void(like, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, f64, i64,
                                i64, i64, i64, i64, i64),
        _train_range_c: types.void(like, i64, i64, i64, i64, i64, i64, f64, i64, i64, i64, i64,
                                   i64, i64),
        _update_c: types.int32(like, i64, i64, i64, i64, i64, f64, f64, i64),
        _eval_range_c: types.void(like, i64, i64, i64, i64, i64, i64, i64, i64, f64, i64, i64,
                                  i64, i64),
        _backward_range_c: types.void(like, i64, i64, i64, i64, i64, i64, i64, i64, i64, f64, i64,
                                      i64, i64, i64, i64, i64, i64),
        _rows_sums_c: types.void(like, i64, i64, i64, i64, i64, i64),
        _rows_train_c: types.void(like, i64, i64, i64, i64, i64, f64, i64, i64, i64, i64, i64,
                                  i64, i64),
        _rows_eval_c: types.void(like, i64, i64, i64, i64, i64, i64, i64, f64, i64, i64, i64, i64),
        _rows_grad_sums_c: types.void(like, i64, i64, i64, i64, i64, i64, i64, i64, f64, i64, i64,
                                      i64, i64),
        _rows_grad_input_c: types.void(like, i64, i64, i64, i64, i64, i64, i64, i64, f64, i64,
                                       i64, i64, i64, i64, i64, i64, i64),
    }


_C_ENTRY_POINTS: dict[str, tuple] = {}


def c_entry_points(dtype: str = "float32", compile: bool = True) -> tuple | None:
    """The C functions of :func:`_c_signatures`, in its order (the compiled path's ``set``
    reads them so), for ``dtype`` ("float32" or "float64"),
    loaded from the disk cache or, with ``compile``, compiled (several minutes for both dtypes
    on 2 cores), and kept alive here: their ``address`` is what the compiled call path calls.
    None where ``compile`` is false and one of them is not in the cache (or Numba's C callback
    objects no longer work as this expects): a call then never waits for a compilation."""
    functions = _C_ENTRY_POINTS.get(dtype)
    if functions is None:
        # a cached C function with parallel kernels links against the threading layer's
        # symbols, which only its launch loads (loading one without them aborts the process)
        numba_parallel._launch_threads()
        signatures = _c_signatures(getattr(types, dtype))
        made = []
        for python in signatures:
            with warnings.catch_warnings():
                # the ranges and blocks are compiled with parallel=True and have no parallel
                # loop, which Numba warns of: see _PARALLEL
                warnings.simplefilter("ignore", numba.NumbaPerformanceWarning)
                function = _c_function(python, signatures[python], compile)
            if function is None:
                return None
            made.append(function)
        functions = _C_ENTRY_POINTS[dtype] = tuple(made)
    return functions


def _c_function(python, signature, compile: bool):
    """``numba.cfunc(signature, cache=True)(python)``, or without ``compile`` what its cache
    holds (None if nothing): the decorator's own steps, with the compilation made optional."""
    function = CFunc(python, sigutils.normalize_signature(signature), locals={},
                     options={"error_model": "numpy"})
    try:
        function.enable_caching()
    except RuntimeError:  # no writable cache location
        if not compile:
            return None
    if compile:
        function.compile()
        return function
    try:
        # (what CFunc.compile does on a cache hit)
        result = function._cache.load_overload(function._sig,
                                               function._targetdescr.target_context)
        if result is None:
            return None
        function._library = result.library
        function._wrapper_name = result.fndesc.llvm_cfunc_wrapper_name
        function._wrapper_address = function._library.get_pointer_to_function(
            function._wrapper_name)
    except AttributeError:  # a Numba whose C callbacks are built otherwise
        return None
    return function
