r"""Numba CPU kernels for batch norm, optionally fused with a ReLU and a residual add.

Every input is seen as one C-contiguous array ``(N, C, S)``: NCHW, (N, C, L) and
(N, C, D, H, W) as they are, (N, C) with ``S = 1``, and channels_last as ``(N*H*W, C, 1)``.
Two traversals cover every shape, each with one reduction, one normalizing pass and one
input-gradient pass:

- **columns**, for short planes (``S <= COLUMNS_UP_TO``, rows and channels_last included): each
  of the N rows of ``C * S`` values is swept as a whole, with per-column coefficients (a
  channel's coefficient repeated over its S columns), so the inner loop runs over a long
  contiguous row that LLVM vectorizes whatever S is. The work is shared by blocks of rows (many
  rows: per-block partial sums, joined before the elementwise pass) or by ranges of channels
  (few rows: each thread owns its channels from statistics to output, with no join).
- **segments**, for long planes: one thread owns a channel and sweeps its N segments of S
  values, so the statistics pass and the normalizing pass run back to back on data that is
  still in the core's cache, with no synchronisation in between.

Statistics. Sums are taken about a per-channel shift :math:`k_c` (the channel's first value):
:math:`S_1 = \sum (x - k)`, :math:`S_2 = \sum (x - k)^2`, then :math:`\mu = k + S_1/n`,
:math:`\sigma^2 = S_2/n - (S_1/n)^2`. Short blocks (``PLANE_BLOCK`` values of a segment, or
``ROW_BLOCK`` rows of a column) are summed in the input's dtype and the block sums are joined in
float64: a float32 block of at most 512 terms, vectorized into 32 lanes of 16 terms each,
carries a relative error of order 1e-6, and the float64 totals add nothing further, so the
error no longer grows with n (converting every value to float64 instead made the statistics
pass compute-bound, about half as fast). The subtraction :math:`S_2/n - (S_1/n)^2` loses at
most a factor :math:`(\mu - k)^2/\sigma^2 \le n` of float64's precision, since the shift is one
of the n values (it contributes :math:`(k-\mu)^2 \le n\sigma^2` to the sum of squared
deviations), and :math:`x - k` is exact in the input's dtype when x and k are within a factor 2
of each other (Sterbenz), the case where cancellation would otherwise hurt: a channel with mean
1e4 and standard deviation 1 in float32 keeps its variance to about 1e-6 relative, where
:math:`E[x^2] - E[x]^2` in float32 loses every digit. All partial sums of a channel (row
blocks, and the S columns of a channel) use the same shift, so they join by addition: Chan's
pairwise merge (``batchnorm.core.moments``) reduces to a sum when the partial moments are taken
about a common point.

Normalizing computes :math:`z = (x - \mu) s + \beta\,[+ r]` with :math:`s = \gamma/\sqrt{\sigma^2
+ \epsilon}`, then the activation in place; centring before scaling keeps the output exact when
:math:`|\mu| \gg \sigma`.

Backward, with :math:`g = \partial L/\partial y` and :math:`d = g\,f'(z)` for the activation
:math:`f` (identity or ReLU; :math:`z` is recomputed from the input, never stored), the same
reduction as the statistics' gives :math:`\sum d` and :math:`\sum d (x - \mu)` (see
:func:`_pair`), and one elementwise pass

.. math::
    \partial_x L = d\,\gamma s_0 - (x - \mu)\,\gamma s_0^3 \tfrac{1}{n}\sum d(x-\mu)
                  - \gamma s_0 \tfrac{1}{n}\sum d, \qquad s_0 = 1/\sqrt{\sigma^2+\epsilon}

(the last two terms vanish with fixed statistics), and :math:`\partial_r L = d`.

Reductions are compiled with ``reassoc`` so LLVM may vectorize them (the summation order then
depends on the vector width, not on the data); elementwise passes use strict IEEE arithmetic.
NaN and inf propagate to the statistics, so the caller's non-finite check still sees them.

Each pass is written once, over the terms of :func:`_pair`, and called with constant
``kind``/``act``/``has_res`` through Numba's inlining, so LLVM compiles one branch-free loop per
case (a runtime flag inside the loop kept it from vectorizing).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# The activations fused here are those whose value and slope are a select, which vectorizes.
# Smooth ones (silu, gelu) need exp or erf per value, which Numba cannot vectorize without a
# vector math library: computed here one value at a time they made the fused layer 4-10x slower
# than torch's batch norm followed by its activation, so the backend applies torch's vectorized
# activation around these kernels instead (``batchnorm.backends.cpu``).
IDENTITY, RELU = 0, 1
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU}

# What a reduction sums (see :func:`_pair`): the shifted moments of x, or the gradient sums.
MOMENTS, GRADIENTS = 0, 1


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


# Options of the reductions (sums may be reassociated and contracted into fused multiply-adds)
# and of the parallel drivers.
_REDUCE = {"fastmath": {"reassoc", "contract"}}
_PARALLEL = {"parallel": True}

# Reductions sum blocks of this many values (segments) or rows (columns) in the input's dtype
# and join the block sums in float64 (see the module docstring on the error this bounds).
PLANE_BLOCK = 512
ROW_BLOCK = 32

# Planes of at most this many values are swept as columns, longer ones as segments (see the
# module docstring): a short segment's loop is mostly its scalar remainder. Backend calls, one
# thread, float32, median of interleaved rounds under load, against the kernels before the
# columns took short planes: 4x1024x2x2 train 0.60-0.80, eval 0.45-0.62, backward 0.55-0.80;
# 4x512x4x4 train 0.77-1.12, eval 0.54-0.85, backward 0.70-1.06. With 64 here (7x7 and 8x8 as
# columns) 8x2048x7x7 took 3.7-5.8x as long: the per-column partial sums outgrow the cache.
COLUMNS_UP_TO = 16

# The ReLU backward reads the gradient only where the pre-activation is positive, which LLVM
# vectorizes as masked loads; masked loads leave the hardware prefetcher idle, so on gradients
# that do not stay in the cache the column passes prefetch the rows ahead themselves
# (``PREFETCH_AHEAD_BYTES`` ahead of the row being read). Below ``PREFETCH_ABOVE_BYTES`` the
# hints only cost issue slots. Kernel alone, 2 threads, relu backward with/without the hints:
# 0.47-0.53 on (100352, 64), 0.80-0.81 on (25088, 256), 0.84-0.87 on (6272, 512), 1.01-1.03 on
# (1024, 4096); 1.02-1.21 on the 0.8-6.4 MB arrays, which stay in the cache in such a loop.
PREFETCH_ABOVE_BYTES = 8 << 20
PREFETCH_AHEAD_BYTES = 2048


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
    """Whether the column passes prefetch ``grad``, and how many rows ahead of the row being read
    (see ``PREFETCH_ABOVE_BYTES``). Counted from the row being read, the hints of a four-row sweep
    partly repeat lines already asked for; starting them past the sweep measured no better
    (0.96-1.08 of this)."""
    wanted = act == RELU and grad.size * grad.itemsize > PREFETCH_ABOVE_BYTES
    return wanted, max(1, PREFETCH_AHEAD_BYTES // (grad.shape[1] * grad.itemsize))


# -- the terms, one position at a time ------------------------------------------------------------


@_jit(inline="always")
def _pair(kind, act, has_res, u, xv, rv, k, s, b, zero):
    """The two terms a reduction sums at one position, about the centre ``k``:

    - ``MOMENTS``: ``(x - k, (x - k)^2)``, ``k`` the channel's shift (``u`` unused);
    - ``GRADIENTS``: ``(d, d (x - k))`` with ``d = u f'(z)``, ``u`` the output gradient, ``k``
      the mean and ``z = (x - k) s + b [+ r]`` the pre-activation.

    Scalars only (arrays passed per element pay reference counting, 70x slower) and inlined,
    so with constant ``kind``/``act``/``has_res`` the unused operands are never loaded."""
    centred = xv - k
    if kind == MOMENTS:
        return centred, centred * centred
    if act == RELU:
        z = centred * s + b
        if has_res:
            z += rv
        u = u if z > 0 else zero  # NaN z: no gradient, as torch's relu backward
    return u, u * centred


# -- per-channel coefficients ---------------------------------------------------------------------


@_jit(inline="always")
def _channel_coefficients(mean, var, weight, bias, eps, c):
    """(inverse std, scale gamma*invstd, shift beta) of channel c in float64; empty weight/bias
    mean 1/0."""
    invstd = 1.0 / math.sqrt(var[c] + eps)
    gamma = np.float64(weight[c]) if weight.shape[0] > 0 else 1.0
    beta = np.float64(bias[c]) if bias.shape[0] > 0 else 0.0
    return invstd, gamma * invstd, beta


@_jit(inline="always")
def _moments(shift, s1, s2, count):
    """(mean, biased variance) from sums about ``shift``; a negative rounding clamps to 0 and
    NaN stays NaN."""
    centre = s1 / count
    variance = s2 / count - centre * centre
    return shift + centre, (0.0 if variance < 0 else variance)


@_jit(inline="always")
def _gradient_terms(sum_d, sum_dxc, count, invstd, scale, train):
    """(dweight, dbias, k_centred, k_offset) of a channel from its gradient sums: the input
    gradient is ``d scale + (x - mean) k_centred + k_offset``."""
    k_centred = -scale * invstd * invstd * sum_dxc / count if train else 0.0
    k_offset = -scale * sum_d / count if train else 0.0
    return sum_dxc * invstd, sum_d, k_centred, k_offset


@_jit(inline="always")
def _unsigned(start, stop):
    """Loop bounds as unsigned integers. Numba wraps a negative index around (a select per
    access) unless it can tell the index is not negative, which it can for ``range(n)`` but not
    for a loop from a start it is given; the selects kept the column loops from vectorizing
    (2x slower). Unsigned indices have none."""
    return np.uint64(start), np.uint64(stop)


@_jit(inline="always")
def _spread(array, c, size, value):
    """``array`` over the ``size`` columns of channel ``c`` receives ``value``."""
    j0, j1 = _unsigned(c * size, (c + 1) * size)
    for j in range(j0, j1):
        array[j] = value


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


# -- columns: (N, C * S) rows with per-column coefficients ---------------------------------------
#
# Rows are indexed as x[r, j] directly (no per-row views, no per-row scratch, no per-row helper
# taking arrays) so that the inner loop over columns is a plain strided-by-one loop LLVM
# vectorizes; row-view helpers and a scratch array allocated per row made these kernels 2-5x
# slower than torch on channels_last inputs. Each pass takes a block of rows [r0, r1) and of
# columns [j0, j1), so one function serves the serial call, row blocks and channel ranges.


@_jit(inline="always")
def _column_sums_of(kind, act, has_res, u, x, r, k, s, b, r0, r1, j0, j1, s1, s2, prefetch,
                    ahead):
    """Adds into the float64 ``s1[j]``, ``s2[j]`` the sums of :func:`_pair`'s terms over rows
    [r0, r1) of columns [j0, j1). Blocks of ``ROW_BLOCK`` rows are summed in x's dtype, eight
    rows per sweep over the columns (the block accumulators are loaded and stored an eighth as
    often; against four rows per sweep, measured 0.67x the time on (100352, 64) and 0.8x on
    (1024, 4096), the same elsewhere), then four, then one. ``prefetch``: hint the rows of
    ``u`` ``ahead``."""
    # both block accumulators in one local array: measured 10-20% faster on (100352, 64) than
    # two separate ones, with the same sums
    j0, j1 = _unsigned(j0, j1)
    t = np.empty((2, j1 - j0), dtype=x.dtype)
    zero = x.dtype.type(0)
    for block in range(r0, r1, ROW_BLOCK):
        end = min(block + ROW_BLOCK, r1)
        t[:] = 0
        i = block
        while i + 8 <= end:
            if prefetch:
                _prefetch_rows(u, i + ahead, 8)
            for j in range(j0, j1):
                kj, sj, bj = k[j], s[j], b[j]
                a0, p0 = _pair(kind, act, has_res, u[i, j], x[i, j], r[i, j], kj, sj, bj, zero)
                a1, p1 = _pair(kind, act, has_res, u[i + 1, j], x[i + 1, j], r[i + 1, j], kj, sj,
                               bj, zero)
                a2, p2 = _pair(kind, act, has_res, u[i + 2, j], x[i + 2, j], r[i + 2, j], kj, sj,
                               bj, zero)
                a3, p3 = _pair(kind, act, has_res, u[i + 3, j], x[i + 3, j], r[i + 3, j], kj, sj,
                               bj, zero)
                a4, p4 = _pair(kind, act, has_res, u[i + 4, j], x[i + 4, j], r[i + 4, j], kj, sj,
                               bj, zero)
                a5, p5 = _pair(kind, act, has_res, u[i + 5, j], x[i + 5, j], r[i + 5, j], kj, sj,
                               bj, zero)
                a6, p6 = _pair(kind, act, has_res, u[i + 6, j], x[i + 6, j], r[i + 6, j], kj, sj,
                               bj, zero)
                a7, p7 = _pair(kind, act, has_res, u[i + 7, j], x[i + 7, j], r[i + 7, j], kj, sj,
                               bj, zero)
                t[0, j - j0] += ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
                t[1, j - j0] += ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
            i += 8
        if i + 4 <= end:  # a batch of 4 is common: one sweep for its four rows
            for j in range(j0, j1):
                kj, sj, bj = k[j], s[j], b[j]
                a0, p0 = _pair(kind, act, has_res, u[i, j], x[i, j], r[i, j], kj, sj, bj, zero)
                a1, p1 = _pair(kind, act, has_res, u[i + 1, j], x[i + 1, j], r[i + 1, j], kj, sj,
                               bj, zero)
                a2, p2 = _pair(kind, act, has_res, u[i + 2, j], x[i + 2, j], r[i + 2, j], kj, sj,
                               bj, zero)
                a3, p3 = _pair(kind, act, has_res, u[i + 3, j], x[i + 3, j], r[i + 3, j], kj, sj,
                               bj, zero)
                t[0, j - j0] += (a0 + a1) + (a2 + a3)
                t[1, j - j0] += (p0 + p1) + (p2 + p3)
            i += 4
        for tail in range(i, end):
            if prefetch:
                _prefetch_rows(u, tail + ahead, 1)
            for j in range(j0, j1):
                a, p = _pair(kind, act, has_res, u[tail, j], x[tail, j], r[tail, j], k[j], s[j],
                             b[j], zero)
                t[0, j - j0] += a
                t[1, j - j0] += p
        for j in range(j0, j1):
            s1[j] += t[0, j - j0]
            s2[j] += t[1, j - j0]


@_jit(**_REDUCE)
def _column_sums(kind, act, has_res, u, x, r, k, s, b, r0, r1, j0, j1, s1, s2, prefetch, ahead):
    """:func:`_column_sums_of` with its flags as constants: one loop per case."""
    if kind == MOMENTS:
        _column_sums_of(MOMENTS, IDENTITY, False, x, x, x, k, k, k, r0, r1, j0, j1, s1, s2,
                        False, ahead)
    elif act == IDENTITY:
        _column_sums_of(GRADIENTS, IDENTITY, False, u, x, x, k, s, b, r0, r1, j0, j1, s1, s2,
                        prefetch, ahead)
    elif has_res:
        _column_sums_of(GRADIENTS, RELU, True, u, x, r, k, s, b, r0, r1, j0, j1, s1, s2,
                        prefetch, ahead)
    else:
        _column_sums_of(GRADIENTS, RELU, False, u, x, x, k, s, b, r0, r1, j0, j1, s1, s2,
                        prefetch, ahead)


@_jit()
def _column_normalize(act, has_res, x, r, m, s, b, out, r0, r1, j0, j1):
    """``out = f((x - m) s + b [+ r])`` over rows [r0, r1) of columns [j0, j1)."""
    j0, j1 = _unsigned(j0, j1)
    for i in range(r0, r1):
        if has_res:
            for j in range(j0, j1):
                out[i, j] = (x[i, j] - m[j]) * s[j] + b[j] + r[i, j]
        else:
            for j in range(j0, j1):
                out[i, j] = (x[i, j] - m[j]) * s[j] + b[j]
        if act == RELU:
            for j in range(j0, j1):
                v = out[i, j]
                out[i, j] = 0 if v < 0 else v  # NaN stays NaN, as in torch.relu


@_jit(inline="always")
def _column_grad_input_of(act, has_res, g, x, r, m, s, b, k_centred, k_offset, need_input,
                          grad_input, need_residual, grad_residual, r0, r1, j0, j1, prefetch,
                          ahead):
    """``dx = d s + (x - m) k_centred + k_offset`` and ``dr = d`` over a block (as in
    :func:`_column_normalize`)."""
    j0, j1 = _unsigned(j0, j1)
    zero = x.dtype.type(0)
    for i in range(r0, r1):
        if prefetch:
            _prefetch_rows(g, i + ahead, 1)
        if need_input:
            for j in range(j0, j1):
                d, _ = _pair(GRADIENTS, act, has_res, g[i, j], x[i, j], r[i, j], m[j], s[j], b[j],
                             zero)
                grad_input[i, j] = d * s[j] + (x[i, j] - m[j]) * k_centred[j] + k_offset[j]
        if need_residual:
            for j in range(j0, j1):
                d, _ = _pair(GRADIENTS, act, has_res, g[i, j], x[i, j], r[i, j], m[j], s[j], b[j],
                             zero)
                grad_residual[i, j] = d


@_jit()
def _column_grad_input(act, has_res, g, x, r, m, s, b, k_centred, k_offset, need_input,
                       grad_input, need_residual, grad_residual, r0, r1, j0, j1, prefetch, ahead):
    """:func:`_column_grad_input_of` with its flags as constants."""
    if act == IDENTITY:
        _column_grad_input_of(IDENTITY, False, g, x, x, m, s, b, k_centred, k_offset, need_input,
                              grad_input, need_residual, grad_residual, r0, r1, j0, j1, prefetch,
                              ahead)
    elif has_res:
        _column_grad_input_of(RELU, True, g, x, r, m, s, b, k_centred, k_offset, need_input,
                              grad_input, need_residual, grad_residual, r0, r1, j0, j1, prefetch,
                              ahead)
    else:
        _column_grad_input_of(RELU, False, g, x, x, m, s, b, k_centred, k_offset, need_input,
                              grad_input, need_residual, grad_residual, r0, r1, j0, j1, prefetch,
                              ahead)


# -- segments: (N, C, S) with long planes, a channel per thread ------------------------------------
#
# Planes are handed to the passes as (N * C, S) arrays (views of the same memory), a channel's
# segments being rows n * C + c, indexed directly: an array view per segment handed to a helper
# cost reference counting on the array that both threads share (on 7x7 planes the normalizing
# pass was 3x slower); each pass over a segment is one flat loop of more than ``COLUMNS_UP_TO``
# values that LLVM vectorizes.


@_jit(inline="always")
def _segments(x):
    """A (N, C, S) array as (N * C, S) (both are views of the same C-contiguous memory)."""
    return x.reshape((x.shape[0] * x.shape[1], x.shape[2]))


@_jit(**_REDUCE)
def _run_sums(kind, act, has_res, u, x, r, k, s, b):
    """The sums of :func:`_pair`'s terms over one run of values (1D views), in x's dtype: a
    flat loop of its own, which LLVM vectorizes (the same loop inside the caller, with bounds
    computed per block, was left scalar: 3-15x slower)."""
    zero = x.dtype.type(0)
    t1 = zero
    t2 = zero
    for i in range(x.shape[0]):
        a, p = _pair(kind, act, has_res, u[i], x[i], r[i], k, s, b, zero)
        t1 += a
        t2 += p
    return t1, t2


@_jit(inline="always")
def _segment_sums_of(kind, act, has_res, u, x, r, c, k, s, b):
    """The float64 sums of :func:`_pair`'s terms over channel c of (N, C, S) arrays, in blocks
    of at most ``PLANE_BLOCK`` values summed in x's dtype; ``k``, ``s``, ``b``: the channel's
    scalars in x's dtype. Planes of one block are indexed directly (as the segment passes)."""
    batch, _, size = x.shape
    zero = x.dtype.type(0)
    s1 = 0.0
    s2 = 0.0
    if size <= PLANE_BLOCK:
        for n in range(batch):
            t1 = zero
            t2 = zero
            for i in range(size):
                a, p = _pair(kind, act, has_res, u[n, c, i], x[n, c, i], r[n, c, i], k, s, b,
                             zero)
                t1 += a
                t2 += p
            s1 += t1
            s2 += t2
        return s1, s2
    for n in range(batch):
        for start in range(0, size, PLANE_BLOCK):
            stop = start + PLANE_BLOCK
            t1, t2 = _run_sums(kind, act, has_res, u[n, c, start:stop], x[n, c, start:stop],
                               r[n, c, start:stop], k, s, b)
            s1 += t1
            s2 += t2
    return s1, s2


@_jit(**_REDUCE)
def _segment_sums(kind, act, has_res, u, x, r, c, k, s, b):
    """:func:`_segment_sums_of` with its flags as constants: one loop per case."""
    if kind == MOMENTS:
        return _segment_sums_of(MOMENTS, IDENTITY, False, x, x, x, c, k, k, k)
    if act == IDENTITY:
        return _segment_sums_of(GRADIENTS, IDENTITY, False, u, x, x, c, k, s, b)
    if has_res:
        return _segment_sums_of(GRADIENTS, RELU, True, u, x, r, c, k, s, b)
    return _segment_sums_of(GRADIENTS, RELU, False, u, x, x, c, k, s, b)


@_jit(inline="always")
def _segment_normalize(act, has_res, xs, rs, m, s, b, outs, j):
    """``out[j] = f((x[j] - m) s + b [+ r[j]])`` for segment ``j``."""
    size = xs.shape[1]
    if has_res:
        for i in range(size):
            outs[j, i] = (xs[j, i] - m) * s + b + rs[j, i]
    else:
        for i in range(size):
            outs[j, i] = (xs[j, i] - m) * s + b
    if act == RELU:
        for i in range(size):
            v = outs[j, i]
            outs[j, i] = 0 if v < 0 else v  # NaN stays NaN, as in torch.relu


@_jit(inline="always")
def _segment_grad_input_of(act, has_res, gs, xs, rs, m, s, b, k_centred, k_offset, need_input,
                           grad_input, need_residual, grad_residual, j):
    """``dx = d s + (x - m) k_centred + k_offset`` and ``dr = d`` for segment ``j``."""
    zero = xs.dtype.type(0)
    size = xs.shape[1]
    if need_input:
        for i in range(size):
            d, _ = _pair(GRADIENTS, act, has_res, gs[j, i], xs[j, i], rs[j, i], m, s, b, zero)
            grad_input[j, i] = d * s + (xs[j, i] - m) * k_centred + k_offset
    if need_residual:
        for i in range(size):
            d, _ = _pair(GRADIENTS, act, has_res, gs[j, i], xs[j, i], rs[j, i], m, s, b, zero)
            grad_residual[j, i] = d


# -- one channel, or one range of channels, from statistics to output ------------------------------


@_jit(inline="always")
def _train_forward_segment(x, residual, has_res, out, weight, bias, eps, act, mean, var, c):
    """Statistics of channel c into ``mean[c]``/``var[c]``, then its normalized output."""
    batch, channels, size = x.shape
    xs, rs, outs = _segments(x), _segments(residual), _segments(out)
    count = batch * size
    shift = x[0, c, 0]
    s1, s2 = _segment_sums(MOMENTS, IDENTITY, False, x, x, x, c, shift, shift, shift)
    # stored in the compute dtype, as the backward will read them
    mean[c], var[c] = _moments(np.float64(shift), s1, s2, count)
    _, scale, beta = _channel_coefficients(mean, var, weight, bias, eps, c)
    m, s, b = xs.dtype.type(mean[c]), xs.dtype.type(scale), xs.dtype.type(beta)
    for j in range(c, xs.shape[0], channels):
        _segment_normalize(act, has_res, xs, rs, m, s, b, outs, j)


@_jit(inline="always")
def _backward_segment(grad, x, residual, has_res, mean, var, weight, bias, eps, act, train,
                      need_input, grad_input, need_residual, grad_residual, grad_weight, grad_bias,
                      c):
    """The gradients of channel c."""
    batch, channels, size = x.shape
    gs, xs, rs = _segments(grad), _segments(x), _segments(residual)
    gis, grs = _segments(grad_input), _segments(grad_residual)
    count = batch * size
    invstd, scale, beta = _channel_coefficients(mean, var, weight, bias, eps, c)
    m, s, b = xs.dtype.type(mean[c]), xs.dtype.type(scale), xs.dtype.type(beta)
    sum_d, sum_dxc = _segment_sums(GRADIENTS, act, has_res, grad, x, residual, c, m, s, b)
    grad_weight[c], grad_bias[c], k_centred, k_offset = _gradient_terms(
        sum_d, sum_dxc, count, invstd, scale, train)
    if not (need_input or need_residual):
        return
    kc, ko = xs.dtype.type(k_centred), xs.dtype.type(k_offset)
    for j in range(c, xs.shape[0], channels):
        if act == IDENTITY:
            _segment_grad_input_of(IDENTITY, False, gs, xs, xs, m, s, b, kc, ko, need_input,
                                   gis, need_residual, grs, j)
        elif has_res:
            _segment_grad_input_of(RELU, True, gs, xs, rs, m, s, b, kc, ko, need_input,
                                   gis, need_residual, grs, j)
        else:
            _segment_grad_input_of(RELU, False, gs, xs, xs, m, s, b, kc, ko, need_input,
                                   gis, need_residual, grs, j)


@_jit(inline="always")
def _coefficient_columns(mean, var, weight, bias, eps, size, m, s, b, c0, c1):
    """The (mean, scale, shift) of channels [c0, c1) over their ``size`` columns each."""
    for c in range(c0, c1):
        _, scale, beta = _channel_coefficients(mean, var, weight, bias, eps, c)
        _spread(m, c, size, mean[c])
        _spread(s, c, size, scale)
        _spread(b, c, size, beta)


@_jit(inline="always")
def _channel_total(sums, c, size):
    """The sum of channel c's ``size`` column sums."""
    total = 0.0
    j0, j1 = _unsigned(c * size, (c + 1) * size)
    for j in range(j0, j1):
        total += sums[j]
    return total


@_jit()
def _train_forward_columns(x, r, has_res, out, shift, s1, s2, m, s, b, weight, bias, eps, act,
                           mean, var, size, c0, c1, summed):
    """Channels [c0, c1) of (N, C * S) rows: their sums over every row (unless ``summed``:
    already in s1, s2), statistics, coefficients and output."""
    rows = x.shape[0]
    j0, j1 = c0 * size, c1 * size
    if not summed:
        _column_sums(MOMENTS, IDENTITY, False, x, x, x, shift, shift, shift, 0, rows, j0, j1, s1,
                     s2, False, 1)
    for c in range(c0, c1):
        mean[c], var[c] = _moments(np.float64(shift[c * size]), _channel_total(s1, c, size),
                                   _channel_total(s2, c, size), rows * size)
    _coefficient_columns(mean, var, weight, bias, eps, size, m, s, b, c0, c1)
    if not summed:
        _column_normalize(act, has_res, x, r, m, s, b, out, 0, rows, j0, j1)


@_jit()
def _backward_columns(g, x, r, has_res, m, s, b, s1, s2, k_centred, k_offset, mean, var, weight,
                      bias, eps, act, train, need_input, grad_input, need_residual, grad_residual,
                      grad_weight, grad_bias, size, c0, c1, summed):
    """Channels [c0, c1) of (N, C * S) rows: their gradient sums over every row (unless
    ``summed``), parameter gradients and input gradients."""
    rows = x.shape[0]
    j0, j1 = c0 * size, c1 * size
    if not summed:
        _column_sums(GRADIENTS, act, has_res, g, x, r, m, s, b, 0, rows, j0, j1, s1, s2, False, 1)
    for c in range(c0, c1):
        invstd, scale, _ = _channel_coefficients(mean, var, weight, bias, eps, c)
        grad_weight[c], grad_bias[c], k_c, k_o = _gradient_terms(
            _channel_total(s1, c, size), _channel_total(s2, c, size), rows * size, invstd, scale,
            train)
        _spread(k_centred, c, size, k_c)
        _spread(k_offset, c, size, k_o)
    if not summed and (need_input or need_residual):
        _column_grad_input(act, has_res, g, x, r, m, s, b, k_centred, k_offset, need_input,
                           grad_input, need_residual, grad_residual, 0, rows, j0, j1, False, 1)


@_jit(inline="always")
def _join(s1, s2):
    """Row-block partial sums (blocks, width) added into their first row."""
    for k in range(1, s1.shape[0]):
        for j in range(s1.shape[1]):
            s1[0, j] += s1[k, j]
            s2[0, j] += s2[k, j]


# -- the three passes: training forward, eval forward, backward ------------------------------------
#
# ``threads``: at most this many blocks of work, one per thread; 1 runs on the calling thread (a
# parallel loop costs about 1.3 us to launch even on one thread, a tenth of a small layer's
# kernel time). Columns go by row blocks where there are at least ``ROW_BLOCK`` rows per
# thread, else by ranges of channels; segments by channel.


@_jit(**_PARALLEL)
def train_forward(x, weight, bias, eps, act, residual, has_res, out, mean, var, threads):
    """Batch statistics into ``mean``/``var`` (biased, x's dtype) and ``out = f(BN(x) [+ r])``
    for (N, C, S) arrays."""
    batch, channels, size = x.shape
    if size > COLUMNS_UP_TO:
        if min(threads, channels) == 1:
            for c in range(channels):
                _train_forward_segment(x, residual, has_res, out, weight, bias, eps, act, mean,
                                       var, c)
        else:
            for c in prange(channels):
                _train_forward_segment(x, residual, has_res, out, weight, bias, eps, act, mean,
                                       var, c)
        return
    rows, width = batch, channels * size
    x2 = x.reshape((rows, width))
    r2, out2 = residual.reshape((rows, width)), out.reshape((rows, width))
    shift = np.empty(width, dtype=x.dtype)
    for c in range(channels):
        _spread(shift, c, size, x[0, c, 0])
    m, s, b = (np.empty(width, dtype=x.dtype), np.empty(width, dtype=x.dtype),
               np.empty(width, dtype=x.dtype))
    blocks = min(threads, rows // ROW_BLOCK)
    if blocks > 1:
        s1 = np.zeros((blocks, width), dtype=np.float64)
        s2 = np.zeros((blocks, width), dtype=np.float64)
        for k in prange(blocks):
            _column_sums(MOMENTS, IDENTITY, False, x2, x2, x2, shift, shift, shift,
                         k * rows // blocks, (k + 1) * rows // blocks, 0, width, s1[k], s2[k],
                         False, 1)
        _join(s1, s2)
        _train_forward_columns(x2, r2, has_res, out2, shift, s1[0], s2[0], m, s, b, weight, bias,
                               eps, act, mean, var, size, 0, channels, True)
        for k in prange(blocks):
            _column_normalize(act, has_res, x2, r2, m, s, b, out2, k * rows // blocks,
                              (k + 1) * rows // blocks, 0, width)
        return
    s1 = np.zeros(width, dtype=np.float64)
    s2 = np.zeros(width, dtype=np.float64)
    blocks = min(threads, channels)
    if blocks == 1:
        _train_forward_columns(x2, r2, has_res, out2, shift, s1, s2, m, s, b, weight, bias, eps,
                               act, mean, var, size, 0, channels, False)
        return
    for k in prange(blocks):
        _train_forward_columns(x2, r2, has_res, out2, shift, s1, s2, m, s, b, weight, bias, eps,
                               act, mean, var, size, k * channels // blocks,
                               (k + 1) * channels // blocks, False)


@_jit(**_PARALLEL)
def eval_forward(x, mean, var, weight, bias, eps, act, residual, has_res, out, threads):
    """``out = f(BN(x) [+ r])`` with given statistics, in memory order: each thread streams one
    contiguous run of segments or rows (against a loop over channels, each thread jumping
    between samples, this measured 0.76-0.87x the time on 8x1024x14x14 and the same on 7x7 and
    on longer planes, kernel alone, 2 threads); rows fewer than threads go by channel ranges."""
    batch, channels, size = x.shape
    if size > COLUMNS_UP_TO:
        m, s, b = (np.empty(channels, dtype=x.dtype), np.empty(channels, dtype=x.dtype),
                   np.empty(channels, dtype=x.dtype))
        _coefficient_columns(mean, var, weight, bias, eps, 1, m, s, b, 0, channels)
        segments = batch * channels
        xs, rs, outs = _segments(x), _segments(residual), _segments(out)
        blocks = min(threads, segments)
        if blocks == 1:
            for j in range(segments):
                c = j % channels
                _segment_normalize(act, has_res, xs, rs, m[c], s[c], b[c], outs, j)
            return
        for k in prange(blocks):
            for j in range(k * segments // blocks, (k + 1) * segments // blocks):
                c = j % channels
                _segment_normalize(act, has_res, xs, rs, m[c], s[c], b[c], outs, j)
        return
    rows, width = batch, channels * size
    x2 = x.reshape((rows, width))
    r2, out2 = residual.reshape((rows, width)), out.reshape((rows, width))
    m, s, b = (np.empty(width, dtype=x.dtype), np.empty(width, dtype=x.dtype),
               np.empty(width, dtype=x.dtype))
    _coefficient_columns(mean, var, weight, bias, eps, size, m, s, b, 0, channels)
    if threads == 1:
        _column_normalize(act, has_res, x2, r2, m, s, b, out2, 0, rows, 0, width)
    elif rows >= threads:
        for k in prange(threads):
            _column_normalize(act, has_res, x2, r2, m, s, b, out2, k * rows // threads,
                              (k + 1) * rows // threads, 0, width)
    else:
        blocks = min(threads, channels)
        for k in prange(blocks):
            _column_normalize(act, has_res, x2, r2, m, s, b, out2, 0, rows,
                              k * channels // blocks * size, (k + 1) * channels // blocks * size)


@_jit(**_PARALLEL)
def backward(grad, x, residual, has_res, mean, var, weight, bias, eps, act, train, need_input,
             grad_input, need_residual, grad_residual, grad_weight, grad_bias, threads):
    """Gradients of ``f(BN(x) [+ r])`` for (N, C, S) arrays; ``grad_weight``/``grad_bias``
    (x's dtype, summed in float64) receive sum(d * x_hat) and sum(d)."""
    batch, channels, size = x.shape
    if size > COLUMNS_UP_TO:
        if min(threads, channels) == 1:
            for c in range(channels):
                _backward_segment(grad, x, residual, has_res, mean, var, weight, bias, eps, act,
                                  train, need_input, grad_input, need_residual, grad_residual,
                                  grad_weight, grad_bias, c)
        else:
            for c in prange(channels):
                _backward_segment(grad, x, residual, has_res, mean, var, weight, bias, eps, act,
                                  train, need_input, grad_input, need_residual, grad_residual,
                                  grad_weight, grad_bias, c)
        return
    rows, width = batch, channels * size
    g2, x2, r2 = (grad.reshape((rows, width)), x.reshape((rows, width)),
                  residual.reshape((rows, width)))
    gi2, gr2 = grad_input.reshape((rows, width)), grad_residual.reshape((rows, width))
    m, s, b = (np.empty(width, dtype=x.dtype), np.empty(width, dtype=x.dtype),
               np.empty(width, dtype=x.dtype))
    _coefficient_columns(mean, var, weight, bias, eps, size, m, s, b, 0, channels)
    k_centred, k_offset = np.empty(width, dtype=x.dtype), np.empty(width, dtype=x.dtype)
    blocks = min(threads, rows // ROW_BLOCK)
    if blocks > 1:
        prefetch, ahead = _prefetches(g2, act)
        s1 = np.zeros((blocks, width), dtype=np.float64)
        s2 = np.zeros((blocks, width), dtype=np.float64)
        for k in prange(blocks):
            _column_sums(GRADIENTS, act, has_res, g2, x2, r2, m, s, b, k * rows // blocks,
                         (k + 1) * rows // blocks, 0, width, s1[k], s2[k], prefetch, ahead)
        _join(s1, s2)
        _backward_columns(g2, x2, r2, has_res, m, s, b, s1[0], s2[0], k_centred, k_offset, mean,
                          var, weight, bias, eps, act, train, need_input, gi2, need_residual, gr2,
                          grad_weight, grad_bias, size, 0, channels, True)
        if need_input or need_residual:
            for k in prange(blocks):
                _column_grad_input(act, has_res, g2, x2, r2, m, s, b, k_centred, k_offset,
                                   need_input, gi2, need_residual, gr2, k * rows // blocks,
                                   (k + 1) * rows // blocks, 0, width, prefetch, ahead)
        return
    s1 = np.zeros(width, dtype=np.float64)
    s2 = np.zeros(width, dtype=np.float64)
    blocks = min(threads, channels)
    if blocks == 1:
        _backward_columns(g2, x2, r2, has_res, m, s, b, s1, s2, k_centred, k_offset, mean, var,
                          weight, bias, eps, act, train, need_input, gi2, need_residual, gr2,
                          grad_weight, grad_bias, size, 0, channels, False)
        return
    for k in prange(blocks):
        _backward_columns(g2, x2, r2, has_res, m, s, b, s1, s2, k_centred, k_offset, mean, var,
                          weight, bias, eps, act, train, need_input, gi2, need_residual, gr2,
                          grad_weight, grad_bias, size, k * channels // blocks,
                          (k + 1) * channels // blocks, False)


# -- entry points by address --------------------------------------------------------------------
#
# Handing a tensor to Numba as a NumPy view (``Tensor.numpy()``) costs about 0.6 us, and a
# training step used to hand over some twenty: on a 60x100 layer, about an eighth of the step.
# These entry points take each tensor's ``data_ptr()`` (0.06 us) and the input's geometry
# ``(batch, channels, size)`` (an (N, C, S) view, channels_last given as (N * H * W, C, 1)),
# build the arrays inside compiled code, where a view costs nothing, and call the passes above.
#
# The caller's contract (``batchnorm.backends.cpu`` keeps it): each address is that of a dense
# CPU tensor, laid out as the view says, of the dtype of ``like`` (a NumPy scalar that only
# carries the dtype), alive until the call returns. Address 0 is an absent tensor (no weight, no
# bias, no residual, an input gradient not wanted): it is never read or written.
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
    """The vector of ``length`` at ``address``; empty at address 0."""
    return _at(address, (length if address != 0 else 0,), like)


@_jit()
def train_forward_at(like, batch, channels, size, x, weight, bias, residual, eps, act, out, mean,
                     var, threads):
    """:func:`train_forward`."""
    shape = (batch, channels, size)
    xa = _at(x, shape, like)
    train_forward(xa, _vector(weight, channels, like), _vector(bias, channels, like), eps, act,
                  _at(residual, shape, like) if residual != 0 else xa, residual != 0,
                  _at(out, shape, like), _vector(mean, channels, like),
                  _vector(var, channels, like), threads)


@_jit()
def eval_forward_at(like, batch, channels, size, x, mean, var, weight, bias, residual, eps, act,
                    out, threads):
    """:func:`eval_forward`."""
    shape = (batch, channels, size)
    xa = _at(x, shape, like)
    eval_forward(xa, _vector(mean, channels, like), _vector(var, channels, like),
                 _vector(weight, channels, like), _vector(bias, channels, like), eps, act,
                 _at(residual, shape, like) if residual != 0 else xa, residual != 0,
                 _at(out, shape, like), threads)


@_jit()
def backward_at(like, batch, channels, size, grad, x, residual, mean, var, weight, bias, eps, act,
                train, grad_input, grad_residual, grad_weight, grad_bias, threads):
    """:func:`backward`; ``grad_input``/``grad_residual`` at address 0 are not computed."""
    shape = (batch, channels, size)
    xa = _at(x, shape, like)
    backward(_at(grad, shape, like), xa, _at(residual, shape, like) if residual != 0 else xa,
             residual != 0, _vector(mean, channels, like), _vector(var, channels, like),
             _vector(weight, channels, like), _vector(bias, channels, like), eps, act, train,
             grad_input != 0, _at(grad_input, shape, like) if grad_input != 0 else xa,
             grad_residual != 0, _at(grad_residual, shape, like) if grad_residual != 0 else xa,
             _vector(grad_weight, channels, like), _vector(grad_bias, channels, like), threads)


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
