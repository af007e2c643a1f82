r"""The Triton kernels of batch norm: statistics, normalization and the backward, in tiles.

Every kernel sees its input as tiles of ``[BLOCK_A, BLOCK_B]`` values in one of two layouts:

- planes (``ROWS`` false): a contiguous ``(N, C, S)`` input with ``S > 1``. ``A`` is the sample
  (stride ``C * S``), ``B`` the position in the plane (stride 1). One program column per
  channel, so the per-channel values are scalars.
- rows (``ROWS`` true): ``(R, C)`` with the channel innermost: ``(N, C)`` inputs, ``S == 1`` and
  channels_last, read in place. ``A`` is the row (stride ``C``), ``B`` the channel. One program
  column per block of ``BLOCK_B`` channels, so the per-channel values are ``[1, BLOCK_B]``.

A column's tiles are numbered ``0 .. tiles - 1`` and cut into ``programs`` runs of
``tiles_per_program`` consecutive tiles; the grid is ``(columns, programs)``, the same for every
pass over the input. Reductions take two phases: each program writes one partial per channel
(``*_partials``, a ``[programs, C]`` table), one small kernel joins them (``*_finalize``), and the
elementwise kernels then read per-channel vectors only. So a small C with a huge N*H*W still
spreads over the whole GPU.

Statistics: each program sums ``d = x - k`` and ``d^2`` in float32 per lane, with ``k`` the mean
of its own first tile. That tile is part of the program's values, so
:math:`(k - \bar x)^2 \le \sigma^2 (n / n_{tile} - 1)`: the shifted sum of squares exceeds the
program's :math:`M_2` by at most the factor ``tiles_per_program``, which bounds the cancellation
in :math:`M_2 = \sum d^2 - (\sum d)^2 / n`. The partials ``(count, mean, M2)`` are joined with
Chan's formula in a form whose second pass adds non-negative terms only:

.. math::
    \bar x = \bar x_0 + \frac{1}{n}\sum_p n_p(\bar x_p - \bar x_0), \qquad
    M_2 = \sum_p M_{2,p} + n_p(\bar x_p - \bar x)^2 .

Backward, with :math:`\hat x = (x - \mu) s`, :math:`s = 1/\sqrt{\sigma^2 + \epsilon}` and the
gradient :math:`g` taken through the activation (ReLU's mask recomputed from :math:`x`, the
statistics and the residual, so the forward stores nothing extra):

.. math::
    \partial_\beta = \sum g, \quad \partial_\gamma = \sum g \hat x, \quad
    \partial_x = \gamma s \Big(g - \frac{\partial_\beta}{n} - \hat x\,\frac{\partial_\gamma}{n}
    \Big) \text{ (batch statistics)}, \quad \gamma s\, g \text{ (fixed statistics)}.

Values are loaded in their own dtype (float32, float16, bfloat16), computed in float32 and
stored in the output's dtype. Scalar offsets are int64; offsets inside a tile are int32 unless
``WIDE``.

The loops are ``while`` loops: Triton 3.6's interpreter turns a tensor bound of ``range`` into an
int with ``int(array)``, which NumPy >= 2.4 refuses for its 1-element arrays
(triton-lang/triton#9171); a ``while`` condition goes through ``bool``, which it accepts. Compiled,
both are the same loop.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _helper(function):
    """``triton.jit`` for the device functions the kernels call; under the interpreter the plain
    function, whose body then runs inside the interpreted kernel as it is (an interpreted
    ``jit`` function patches ``triton.language`` again on every call: a third of the time)."""
    return function if triton.knobs.runtime.interpret else triton.jit(function)


# Sizes that only bound loops and masks: not specialized on (a value of 1, a multiple of 16),
# so inputs of other sizes reuse the compiled kernel instead of compiling another.
_SIZES = ["a_len", "tiles_b", "tiles", "tiles_per_program"]

# -- tiles ------------------------------------------------------------------------------------


@_helper
def _local_offsets(stride_a, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, WIDE: tl.constexpr):
    """Offsets of a tile's values from its first one; the same for every tile."""
    a = tl.arange(0, BLOCK_A)
    if WIDE:
        a = a.to(tl.int64)
    return a[:, None] * stride_a + tl.arange(0, BLOCK_B)[None, :]


@_helper
def _first_tile(tiles_per_program, tiles, tiles_b):
    """``(a_block, b_block, count)``: this program's first tile and how many it has, a run of
    consecutive ones. int64, as all the arithmetic per tile (a few scalar operations, which the
    interpreter would otherwise check for int32 overflow one by one)."""
    first = tl.program_id(1).to(tl.int64) * tiles_per_program
    a_block = first // tiles_b
    return a_block, first - a_block * tiles_b, tl.minimum(tiles_per_program, tiles - first)


@_helper
def _next_tile(a_block, b_block, tiles_b):
    """The tile after ``(a_block, b_block)``, without a division."""
    b_block += 1
    wrap = b_block == tiles_b
    return tl.where(wrap, a_block + 1, a_block), tl.where(wrap, 0, b_block)


@_helper
def _tile(column, a_block, b_block, a_len, b_len, stride_a,
          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr):
    """Tile ``(a_block, b_block)`` of program column ``column``: ``(base, mask, count)``, its
    values at ``base + _local_offsets(...)`` where ``mask``, ``count`` of them per channel."""
    column = column.to(tl.int64)
    a_start = a_block * BLOCK_A
    a_left = a_len - a_start
    if ROWS:
        b_left = b_len - column * BLOCK_B
        base = a_start * stride_a + column * BLOCK_B
        count = tl.minimum(a_left, BLOCK_A)
    else:
        b_start = b_block * BLOCK_B
        b_left = b_len - b_start
        base = a_start * stride_a + column * b_len + b_start
        count = tl.minimum(a_left, BLOCK_A) * tl.minimum(b_left, BLOCK_B)
    mask = (tl.arange(0, BLOCK_A) < a_left)[:, None] & (tl.arange(0, BLOCK_B) < b_left)[None, :]
    return base, mask, count


@_helper
def _channel_value(pointer, column, channels_count, ROWS: tl.constexpr, BLOCK_B: tl.constexpr):
    """A per-channel value in float32: a scalar (planes) or a ``[1, BLOCK_B]`` vector (rows)."""
    if ROWS:
        channels = column * BLOCK_B + tl.arange(0, BLOCK_B)
        value = tl.load(pointer + channels, mask=channels < channels_count, other=0.0)
        value = value.to(tl.float32)[None, :]
    else:
        value = tl.load(pointer + column).to(tl.float32)
    return value


@_helper
def _channel_sum(tile, ROWS: tl.constexpr):
    if ROWS:
        total = tl.sum(tile, axis=0)
    else:
        total = tl.sum(tl.sum(tile, axis=1), axis=0)
    return total


@_helper
def _store_partial(pointer, program, column, channels_count, value,
                   ROWS: tl.constexpr, BLOCK_B: tl.constexpr):
    """Row ``program`` of a ``[programs, C]`` table of per-channel partials."""
    row = pointer + program.to(tl.int64) * channels_count
    if ROWS:
        channels = column * BLOCK_B + tl.arange(0, BLOCK_B)
        tl.store(row + channels, value, mask=channels < channels_count)
    else:
        tl.store(row + column, value)


@_helper
def _inverse_std(variance, eps):
    # correctly rounded: once per channel, so its cost does not matter
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(variance + eps))


@_helper
def _affine(weight_pointer, bias_pointer, column, channels_count, invstd,
            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
            ROWS: tl.constexpr, BLOCK_B: tl.constexpr):
    """``(gain, shift)`` with ``y = (x - mean) * gain + shift``, ``gain = weight * invstd``."""
    gain = invstd
    if HAS_WEIGHT:
        gain = gain * _channel_value(weight_pointer, column, channels_count, ROWS, BLOCK_B)
    if HAS_BIAS:
        shift = _channel_value(bias_pointer, column, channels_count, ROWS, BLOCK_B)
    else:
        shift = 0.0
    return gain, shift


@_helper
def _channel_constants(mean_pointer, variance_pointer, weight_pointer, bias_pointer, eps, column,
                       channels_count, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_B: tl.constexpr):
    """``(mean, invstd, gain, shift)`` of the program's channels."""
    mean = _channel_value(mean_pointer, column, channels_count, ROWS, BLOCK_B)
    invstd = _inverse_std(_channel_value(variance_pointer, column, channels_count, ROWS, BLOCK_B),
                          eps)
    gain, shift = _affine(weight_pointer, bias_pointer, column, channels_count, invstd,
                          HAS_WEIGHT, HAS_BIAS, ROWS, BLOCK_B)
    return mean, invstd, gain, shift


@_helper
def _pre_activation(centred, gain, shift, residual_pointer, mask, HAS_RESIDUAL: tl.constexpr):
    """``z = BN(x) [+ residual]`` from ``x - mean``; ``residual_pointer`` at the tile's values."""
    z = centred * gain + shift
    if HAS_RESIDUAL:
        z += tl.load(residual_pointer, mask=mask, other=0.0).to(tl.float32)
    return z


# -- training forward: statistics ---------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def moments_partials(
    x_pointer, partial_mean, partial_m2, partial_count,
    channels_count, a_len, b_len, stride_a, tiles_b, tiles, tiles_per_program,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr,
):
    """Per program and channel: count, mean and M2 of the program's tiles."""
    column = tl.program_id(0)
    program = tl.program_id(1)
    local = _local_offsets(stride_a, BLOCK_A, BLOCK_B, WIDE)
    a_block, b_block, remaining = _first_tile(tiles_per_program, tiles, tiles_b)
    base, mask, count = _tile(column, a_block, b_block, a_len, b_len, stride_a,
                              BLOCK_A, BLOCK_B, ROWS)
    x = tl.load(x_pointer + base + local, mask=mask, other=0.0).to(tl.float32)
    first_mean = _channel_sum(x, ROWS) / count
    if ROWS:
        shift = first_mean[None, :]
    else:
        shift = first_mean
    deviation = tl.where(mask, x - shift, 0.0)
    sum_deviation = deviation
    sum_square = deviation * deviation
    total = count
    remaining -= 1
    while remaining > 0:
        a_block, b_block = _next_tile(a_block, b_block, tiles_b)
        base, mask, count = _tile(column, a_block, b_block, a_len, b_len, stride_a,
                                  BLOCK_A, BLOCK_B, ROWS)
        x = tl.load(x_pointer + base + local, mask=mask, other=0.0).to(tl.float32)
        deviation = tl.where(mask, x - shift, 0.0)
        sum_deviation += deviation
        sum_square += deviation * deviation
        total += count
        remaining -= 1

    s1 = _channel_sum(sum_deviation, ROWS)
    s2 = _channel_sum(sum_square, ROWS)
    total = total.to(tl.float32)
    _store_partial(partial_mean, program, column, channels_count, first_mean + s1 / total,
                   ROWS, BLOCK_B)
    _store_partial(partial_m2, program, column, channels_count,
                   tl.maximum(s2 - s1 * (s1 / total), 0.0), ROWS, BLOCK_B)
    if column == 0:  # the same for every channel
        tl.store(partial_count + program, total)


@_helper
def _partial_chunk(pointer, start, programs, channels, channels_count, BLOCK_P: tl.constexpr):
    """Rows ``start .. start + BLOCK_P`` of a ``[programs, C]`` partial table at ``channels``:
    ``(values, mask)``, zero where masked."""
    rows = start + tl.arange(0, BLOCK_P)
    mask = (rows < programs)[:, None] & (channels < channels_count)[None, :]
    offsets = rows.to(tl.int64)[:, None] * channels_count + channels[None, :]
    return tl.load(pointer + offsets, mask=mask, other=0.0), mask


@_helper
def _partial_counts(pointer, start, programs, BLOCK_P: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_P)
    return tl.load(pointer + rows, mask=rows < programs, other=0.0)[:, None]


@triton.jit(do_not_specialize=["programs"])
def moments_finalize(
    partial_mean, partial_m2, partial_count, mean_out, variance_out,
    channels_count, programs, values_per_channel,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Join the ``programs`` partials of each channel: mean and biased variance."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < channels_count
    reference = tl.load(partial_mean + channels, mask=channel_mask, other=0.0)
    drift = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = tl.full((), 0, tl.int32)
    while start < programs:
        means, mask = _partial_chunk(partial_mean, start, programs, channels, channels_count,
                                     BLOCK_P)
        counts = _partial_counts(partial_count, start, programs, BLOCK_P)
        # selected, not multiplied: a non-finite reference must not reach the padding
        drift += tl.sum(tl.where(mask, counts * (means - reference[None, :]), 0.0), axis=0)
        start += BLOCK_P
    mean = reference + drift / values_per_channel
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = tl.full((), 0, tl.int32)
    while start < programs:
        means, mask = _partial_chunk(partial_mean, start, programs, channels, channels_count,
                                     BLOCK_P)
        m2s, _mask = _partial_chunk(partial_m2, start, programs, channels, channels_count, BLOCK_P)
        counts = _partial_counts(partial_count, start, programs, BLOCK_P)
        spread = means - mean[None, :]
        m2 += tl.sum(tl.where(mask, m2s + counts * spread * spread, 0.0), axis=0)
        start += BLOCK_P
    tl.store(mean_out + channels, mean, mask=channel_mask)
    tl.store(variance_out + channels, m2 / values_per_channel, mask=channel_mask)


# -- forward: normalize, residual, activation ------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def normalize(
    x_pointer, residual_pointer, out_pointer, mean_pointer, variance_pointer, weight_pointer,
    bias_pointer, eps,
    channels_count, a_len, b_len, stride_a, tiles_b, tiles, tiles_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr,
):
    """``out = act((x - mean) * weight / sqrt(var + eps) + bias [+ residual])``."""
    column = tl.program_id(0)
    mean, _invstd, gain, shift = _channel_constants(
        mean_pointer, variance_pointer, weight_pointer, bias_pointer, eps, column,
        channels_count, HAS_WEIGHT, HAS_BIAS, ROWS, BLOCK_B)
    local = _local_offsets(stride_a, BLOCK_A, BLOCK_B, WIDE)
    a_block, b_block, remaining = _first_tile(tiles_per_program, tiles, tiles_b)
    while remaining > 0:
        base, mask, _count = _tile(column, a_block, b_block, a_len, b_len, stride_a,
                                   BLOCK_A, BLOCK_B, ROWS)
        x = tl.load(x_pointer + base + local, mask=mask, other=0.0).to(tl.float32)
        z = _pre_activation(x - mean, gain, shift, residual_pointer + base + local, mask,
                            HAS_RESIDUAL)
        if RELU:
            z = tl.where(z < 0.0, 0.0, z)  # a select: NaN stays NaN, as with torch.relu
        tl.store(out_pointer + base + local, z.to(out_pointer.dtype.element_ty), mask=mask)
        a_block, b_block = _next_tile(a_block, b_block, tiles_b)
        remaining -= 1


# -- backward ------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def gradient_partials(
    grad_pointer, x_pointer, residual_pointer, mean_pointer, variance_pointer, weight_pointer,
    bias_pointer, eps, partial_grad, partial_grad_centred,
    channels_count, a_len, b_len, stride_a, tiles_b, tiles, tiles_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr,
):
    """Per program and channel: the sums of g and of g * (x - mean), g taken through the
    ReLU."""
    column = tl.program_id(0)
    program = tl.program_id(1)
    # (the gain and shift serve the ReLU's mask only; unused, they cost nothing compiled)
    mean, _invstd, gain, shift = _channel_constants(
        mean_pointer, variance_pointer, weight_pointer, bias_pointer, eps, column,
        channels_count, HAS_WEIGHT, HAS_BIAS, ROWS, BLOCK_B)
    local = _local_offsets(stride_a, BLOCK_A, BLOCK_B, WIDE)
    sum_grad = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    sum_grad_centred = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    a_block, b_block, remaining = _first_tile(tiles_per_program, tiles, tiles_b)
    while remaining > 0:
        base, mask, _count = _tile(column, a_block, b_block, a_len, b_len, stride_a,
                                   BLOCK_A, BLOCK_B, ROWS)
        grad = tl.load(grad_pointer + base + local, mask=mask, other=0.0).to(tl.float32)
        centred = tl.load(x_pointer + base + local, mask=mask, other=0.0).to(tl.float32) - mean
        if RELU:
            z = _pre_activation(centred, gain, shift, residual_pointer + base + local, mask,
                                HAS_RESIDUAL)
            grad = tl.where(z > 0.0, grad, 0.0)
        sum_grad += grad
        sum_grad_centred += grad * centred
        a_block, b_block = _next_tile(a_block, b_block, tiles_b)
        remaining -= 1
    _store_partial(partial_grad, program, column, channels_count,
                   _channel_sum(sum_grad, ROWS), ROWS, BLOCK_B)
    _store_partial(partial_grad_centred, program, column, channels_count,
                   _channel_sum(sum_grad_centred, ROWS), ROWS, BLOCK_B)


@triton.jit(do_not_specialize=["programs"])
def gradient_finalize(
    partial_grad, partial_grad_centred, variance_pointer, eps, grad_bias_out, grad_weight_out,
    channels_count, programs,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``grad_bias = sum g`` and ``grad_weight = sum g * x_hat`` from the partials."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < channels_count
    sum_grad = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_grad_centred = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = tl.full((), 0, tl.int32)
    while start < programs:
        grads, _mask = _partial_chunk(partial_grad, start, programs, channels, channels_count,
                                  BLOCK_P)
        grads_centred, _mask = _partial_chunk(partial_grad_centred, start, programs, channels,
                                          channels_count, BLOCK_P)
        sum_grad += tl.sum(grads, axis=0)
        sum_grad_centred += tl.sum(grads_centred, axis=0)
        start += BLOCK_P
    variance = tl.load(variance_pointer + channels, mask=channel_mask, other=1.0)
    tl.store(grad_bias_out + channels, sum_grad, mask=channel_mask)
    tl.store(grad_weight_out + channels, sum_grad_centred * _inverse_std(variance, eps),
             mask=channel_mask)


@triton.jit(do_not_specialize=_SIZES)
def gradient_input(
    grad_pointer, x_pointer, residual_pointer, grad_input_pointer, grad_residual_pointer,
    mean_pointer, variance_pointer, weight_pointer, bias_pointer, grad_bias_pointer,
    grad_weight_pointer, eps, values_per_channel,
    channels_count, a_len, b_len, stride_a, tiles_b, tiles, tiles_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, TRAIN: tl.constexpr, NEED_INPUT: tl.constexpr,
    NEED_RESIDUAL: tl.constexpr, LOAD_X: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr,
):
    """dx (``NEED_INPUT``) and the residual's gradient, which is g after the activation
    (``NEED_RESIDUAL``). With batch statistics (``TRAIN``) dx has their two terms, from the
    finalized sums. ``LOAD_X``: ``RELU or (TRAIN and NEED_INPUT)``."""
    column = tl.program_id(0)
    mean, invstd, gain, shift = _channel_constants(
        mean_pointer, variance_pointer, weight_pointer, bias_pointer, eps, column,
        channels_count, HAS_WEIGHT, HAS_BIAS, ROWS, BLOCK_B)
    if TRAIN:
        per_value = -gain / values_per_channel
        offset = per_value * _channel_value(grad_bias_pointer, column, channels_count, ROWS,
                                            BLOCK_B)
        centred_coefficient = per_value * invstd * _channel_value(
            grad_weight_pointer, column, channels_count, ROWS, BLOCK_B)
    local = _local_offsets(stride_a, BLOCK_A, BLOCK_B, WIDE)
    a_block, b_block, remaining = _first_tile(tiles_per_program, tiles, tiles_b)
    while remaining > 0:
        base, mask, _count = _tile(column, a_block, b_block, a_len, b_len, stride_a,
                                   BLOCK_A, BLOCK_B, ROWS)
        grad = tl.load(grad_pointer + base + local, mask=mask, other=0.0).to(tl.float32)
        if LOAD_X:
            centred = tl.load(x_pointer + base + local, mask=mask, other=0.0).to(tl.float32)
            centred = centred - mean
        if RELU:
            z = _pre_activation(centred, gain, shift, residual_pointer + base + local, mask,
                                HAS_RESIDUAL)
            grad = tl.where(z > 0.0, grad, 0.0)
        if NEED_RESIDUAL:
            tl.store(grad_residual_pointer + base + local,
                     grad.to(grad_residual_pointer.dtype.element_ty), mask=mask)
        if NEED_INPUT:
            grad_input = grad * gain
            if TRAIN:
                grad_input += centred * centred_coefficient + offset
            tl.store(grad_input_pointer + base + local,
                     grad_input.to(grad_input_pointer.dtype.element_ty), mask=mask)
        a_block, b_block = _next_tile(a_block, b_block, tiles_b)
        remaining -= 1
