"""The Triton backend: the kernels of ``batchnorm.backends.triton.kernels`` behind the backend
interface of ``batchnorm.dispatch``, plus the batch norm + activation entry points (ReLU and the
residual add fused into the kernels, silu and gelu applied around them by torch's operators).

It takes CUDA tensors of float32, float16 and bfloat16 (float64 goes to the eager path), dense
NCHW-style or channels_last (channels_last_3d); other strides are copied to contiguous first.
Statistics and parameter gradients are float32, as on the eager path.

With ``TRITON_INTERPRET=1`` in the environment when Triton is first imported, Triton's
interpreter runs the same kernels on NumPy, and while the variable is set this backend also takes
CPU tensors (the tests force it with ``batchnorm.use_backend("triton")``).

Triton itself is imported on the first call that needs it, not with ``batchnorm``: every CUDA
build of torch installs Triton, and importing it costs about half a second. A Triton that fails
to import, or is older than 3.4, makes ``supports`` false (with one warning), so the eager path
serves.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from batchnorm.backends import smooth
from batchnorm.core.context import is_opaque, transforms_active
from batchnorm.core.errors import BatchNormValueError
from batchnorm.core.running import updated_running_stats  # noqa: F401 - the interface

if importlib.util.find_spec("triton") is None:
    raise ImportError("the Triton backend needs the triton package (pip install batchnorm[gpu])")

name = "triton"
MINIMUM_TRITON = (3, 4)  # triton.knobs, through which the kernels follow triton.language's mode

# silu and gelu as torch's operators around the kernels: in place on the float32 output in the
# forward, and on the pre-activation recomputed from the input in the backward.
ACTIVATIONS = ("identity", "relu", *smooth.ACTIVATIONS)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET_VALUES = ("1", "true", "on", "yes", "y")


# -- loading ----------------------------------------------------------------------------------


def interpreting() -> bool:
    """Is Triton's interpreter requested (``TRITON_INTERPRET``) now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _INTERPRET_VALUES


@functools.cache
def load_kernels() -> ModuleType:
    """The kernels module, imported on first use (raises what the import raises).

    Triton decides when it decorates a function whether it is compiled or interpreted, and
    ``triton.language``'s own functions (``tl.sum``) are decorated when Triton is first imported,
    as ``TRITON_INTERPRET`` said then: a process holds one kind. The kernels are made of the
    same kind, whatever the variable says now."""
    import triton
    import triton.language as tl

    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < MINIMUM_TRITON:
        raise ImportError(f"the Triton backend needs triton >= 3.4, found {triton.__version__}")
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = not isinstance(tl.sum, triton.runtime.JITFunction)
        from batchnorm.backends.triton import kernels as module
    return module


@functools.cache
def _loaded() -> tuple[bool, bool]:
    """``(usable, interpreted)``: did the kernels load, and for the interpreter."""
    try:
        module = load_kernels()
    except Exception as error:  # noqa: BLE001 - any failure means "not available"
        warnings.warn(f"batchnorm: the Triton kernels are unavailable ({error!r}); the eager "
                      "path serves instead", RuntimeWarning, stacklevel=4)
        return False, False
    return True, not isinstance(module.normalize, module.triton.runtime.JITFunction)


def supports(x: torch.Tensor) -> bool:
    """Plain CUDA tensors (CPU tensors too while ``TRITON_INTERPRET=1`` and the kernels were
    loaded for the interpreter) of float32, float16 or bfloat16 with at least 2 dims and some
    values, outside torch.compile and torch.func."""
    if torch.compiler.is_compiling():  # first: the tracer must not see the checks below
        return False
    if x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return False
    if not (x.is_cuda or (x.is_cpu and interpreting())):
        return False
    if is_opaque(x) or transforms_active():
        return False
    usable, interpreted = _loaded()
    return usable and (x.is_cuda or interpreted)


# -- launch geometry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How to cut an input into programs on a kind of device."""

    tile_bytes: int  # bytes of input per tile (values: tile_bytes / itemsize)
    block_channels: int  # rows layout: channels per program column, at most
    programs: int  # programs to aim for in one launch (per-channel partials follow)
    finalize_block: tuple[int, int]  # (partials, channels) per step of the join


# The interpreter runs each program in Python, at a cost per operation whatever the tile's size:
# few programs, large tiles (the tests shrink them to cross every boundary on small inputs).
INTERPRETER = Profile(tile_bytes=8192, block_channels=256, programs=8, finalize_block=(4, 64))


@functools.cache
def _cuda_profile(device_index: int) -> Profile:
    # 8 KiB tiles (16 values per thread at 4 warps for float32, 8 warps for half) and enough
    # programs for 32 per SM: a small C with a huge N*H*W still fills the GPU
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    return Profile(tile_bytes=8192, block_channels=128, programs=32 * sms,
                   finalize_block=(16, 128))


def profile_for(device: torch.device) -> Profile:
    if device.type == "cuda" and not _loaded()[1]:
        return _cuda_profile(device.index if device.index is not None else
                             torch.cuda.current_device())
    return INTERPRETER


@dataclass(frozen=True)
class Geometry:
    """One input's tiles (see ``kernels``): ``[block_a, block_b]`` values each, ``tiles`` per
    program column, ``tiles_per_program`` consecutive ones per program; grid
    ``(columns, programs)``."""

    rows: bool
    a_len: int
    b_len: int
    stride_a: int
    tiles_b: int
    tiles: int
    tiles_per_program: int
    programs: int
    columns: int
    block_a: int
    block_b: int
    wide: bool
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.columns, self.programs

    def launch_options(self) -> dict:
        return dict(BLOCK_A=self.block_a, BLOCK_B=self.block_b, ROWS=self.rows, WIDE=self.wide,
                    num_warps=self.num_warps)

    def arguments(self) -> tuple[int, ...]:
        return (self.a_len, self.b_len, self.stride_a, self.tiles_b, self.tiles,
                self.tiles_per_program)


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plane_block(size: int, tile: int) -> int:
    """Values of a plane per tile row: the largest power of two (at most ``tile``) that pads the
    plane by at most 7%, else the one that pads it least (56x56 = 3136: 256, padded to 3328)."""
    block = min(tile, _power_of_two_at_least(size))
    lowest = min(block, 32)
    best = block
    while block >= lowest:
        padded = _cdiv(size, block) * block
        if padded * 100 <= size * 107:
            return block
        if padded < _cdiv(size, best) * best:
            best = block
        block //= 2
    return best


# Offsets inside a tile are int32 below this (tile bases are int64 always); tests lower it.
INT32_OFFSETS_BELOW = 2**31


@functools.lru_cache(maxsize=4096)
def geometry(rows: bool, batch: int, channels: int, size: int, itemsize: int,
             profile: Profile) -> Geometry:
    """The tiles of an ``(N, C, S)`` input: planes of ``S`` values, or rows of ``C`` channels."""
    tile = max(1, profile.tile_bytes // itemsize)
    if rows:
        a_len, b_len, stride_a = batch * size, channels, channels
        block_b = min(_power_of_two_at_least(channels), profile.block_channels)
        block_a = min(_power_of_two_at_least(a_len), max(1, tile // block_b))
        tiles_b = 1
        tiles = _cdiv(a_len, block_a)
        columns = _cdiv(channels, block_b)
    else:
        a_len, b_len, stride_a = batch, size, channels * size
        block_b = plane_block(size, tile)
        block_a = min(_power_of_two_at_least(batch), max(1, tile // block_b))
        tiles_b = _cdiv(size, block_b)
        tiles = _cdiv(batch, block_a) * tiles_b
        columns = channels
    programs = max(1, min(tiles, _cdiv(profile.programs, columns)))
    tiles_per_program = _cdiv(tiles, programs)
    programs = _cdiv(tiles, tiles_per_program)
    return Geometry(
        rows=rows, a_len=a_len, b_len=b_len, stride_a=stride_a, tiles_b=tiles_b, tiles=tiles,
        tiles_per_program=tiles_per_program, programs=programs, columns=columns,
        block_a=block_a, block_b=block_b,
        wide=(block_a - 1) * stride_a + block_b >= INT32_OFFSETS_BELOW,
        num_warps=min(8, max(4, block_a * block_b // 512)),
    )


# -- tensors ----------------------------------------------------------------------------------


def _layout(x: torch.Tensor) -> torch.memory_format | None:
    """The memory format ``x`` is dense in, among those the kernels read; None for others."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format, Geometry]:
    """``x`` detached, in a layout the kernels read directly, and its tiles."""
    if x.requires_grad:
        x = x.detach()
    if x.is_neg():  # a lazily negated view: its memory holds the values' negatives
        x = x.resolve_neg()
    layout = _layout(x)
    if layout is None:
        x, layout = x.contiguous(), torch.contiguous_format
    batch, channels = x.shape[0], x.shape[1]
    size = x.numel() // (batch * channels)
    rows = size == 1 or layout != torch.contiguous_format
    shape = geometry(rows, batch, channels, size, x.element_size(), profile_for(x.device))
    return x, layout, shape


def _conformed(t: torch.Tensor, like: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``t`` (a gradient or residual) read as a tensor of ``like``'s shape, device and layout,
    in a dtype the kernels load (its own, else ``like``'s)."""
    if t.shape != like.shape or t.device != like.device or is_opaque(t):
        raise BatchNormValueError(
            f"triton kernels: expected a tensor of the input's shape {tuple(like.shape)} on "
            f"{like.device}, got shape {tuple(t.shape)} on {t.device}"
        )
    if t.requires_grad:
        t = t.detach()
    if t.dtype not in _DTYPES:
        t = t.to(like.dtype)
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous(memory_format=layout)


def _vector(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A per-channel parameter or statistic as a dense float32 vector on ``like``'s device."""
    if t is None:
        return None
    channels = like.shape[1]
    if t.dim() != 1 or t.shape[0] != channels or t.device != like.device or is_opaque(t):
        raise BatchNormValueError(
            f"triton kernels: expected a per-channel vector of shape ({channels},) on "
            f"{like.device}, got shape {tuple(t.shape)} on {t.device}"
        )
    if t.requires_grad:
        t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if t.is_neg():
        t = t.resolve_neg()
    return t if t.is_contiguous() else t.contiguous()


def _on(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _finalize_grid(channels: int, device: torch.device) -> tuple[tuple[int], int, int]:
    block_p, block_c = profile_for(device).finalize_block
    block_c = min(block_c, _power_of_two_at_least(channels))
    return (_cdiv(channels, block_c),), block_p, block_c


# -- entry points -----------------------------------------------------------------------------


def _moments(code: ModuleType, xc: torch.Tensor, shape: Geometry) -> tuple[torch.Tensor, ...]:
    """Training statistics: per-program partials, then their join. (mean, biased variance)."""
    channels = xc.shape[1]
    table = shape.programs * channels
    partials = torch.empty(2 * table + shape.programs, dtype=torch.float32, device=xc.device)
    partial_mean, partial_m2 = partials[:table], partials[table: 2 * table]
    partial_count = partials[2 * table:]  # one per program, the same for every channel
    code.moments_partials[shape.grid](
        xc, partial_mean, partial_m2, partial_count, channels, *shape.arguments(),
        **shape.launch_options(),
    )
    mean = torch.empty(channels, dtype=torch.float32, device=xc.device)
    variance = torch.empty(channels, dtype=torch.float32, device=xc.device)
    grid, block_p, block_c = _finalize_grid(channels, xc.device)
    code.moments_finalize[grid](
        partial_mean, partial_m2, partial_count, mean, variance, channels, shape.programs,
        float(xc.numel() // channels), BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return mean, variance


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
    ``compute_dtype``: return y in float32 whatever x's dtype.
    """
    if activation in smooth.ACTIVATIONS:
        return smooth.forward(forward, x, weight, bias, eps, activation, mean, variance, residual)
    code = load_kernels()
    xc, layout, shape = _prepare(x)
    out = torch.empty_like(xc, dtype=torch.float32 if compute_dtype else xc.dtype)
    residual = None if residual is None else _conformed(residual, xc, layout)
    weight, bias = _vector(weight, xc), _vector(bias, xc)
    with _on(xc.device):
        if mean is None:
            batch_mean, batch_var = _moments(code, xc, shape)
            mean, variance = batch_mean, batch_var
        else:
            batch_mean = batch_var = None
            mean, variance = _vector(mean, xc), _vector(variance, xc)
        code.normalize[shape.grid](
            xc, xc if residual is None else residual, out, mean, variance,
            xc if weight is None else weight, xc if bias is None else bias, float(eps),
            xc.shape[1], *shape.arguments(),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, RELU=activation == "relu",
            **shape.launch_options(),
        )
    return out, batch_mean, batch_var


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
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``f(BN(x) [+ residual])``: (dx, dweight, dbias, dresidual).

    ``train``: the statistics were the batch's own (they depend on x) or fixed ones.
    """
    if activation in smooth.ACTIVATIONS:
        return smooth.backward(forward, backward, grad_out, x, mean, variance, weight, bias, eps,
                               needs, train, activation, residual, need_residual)
    need_input, need_weight, need_bias = needs
    need_weight = need_weight and weight is not None
    code = load_kernels()
    xc, layout, shape = _prepare(x)
    grad_out = _conformed(grad_out, xc, layout)
    residual = None if residual is None else _conformed(residual, xc, layout)
    mean, variance = _vector(mean, xc), _vector(variance, xc)
    weight, bias = _vector(weight, xc), _vector(bias, xc)
    channels, relu = xc.shape[1], activation == "relu"
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 HAS_RESIDUAL=residual is not None, RELU=relu, **shape.launch_options())
    common = (xc if residual is None else residual, mean, variance,
              xc if weight is None else weight, xc if bias is None else bias, float(eps))
    grad_input = torch.empty_like(xc) if need_input else None
    grad_residual = torch.empty_like(xc) if need_residual else None
    grad_weight = grad_bias = None
    with _on(xc.device):
        if need_weight or need_bias or (train and need_input):
            partials = torch.empty((2, shape.programs, channels), dtype=torch.float32,
                                   device=xc.device)
            code.gradient_partials[shape.grid](
                grad_out, xc, *common, partials[0], partials[1], channels, *shape.arguments(),
                **flags,
            )
            grad_bias = torch.empty(channels, dtype=torch.float32, device=xc.device)
            grad_weight = torch.empty(channels, dtype=torch.float32, device=xc.device)
            grid, block_p, block_c = _finalize_grid(channels, xc.device)
            code.gradient_finalize[grid](
                partials[0], partials[1], variance, float(eps), grad_bias, grad_weight, channels,
                shape.programs, BLOCK_P=block_p, BLOCK_C=block_c,
            )
        if need_input or need_residual:
            code.gradient_input[shape.grid](
                grad_out, xc, common[0], xc if grad_input is None else grad_input,
                xc if grad_residual is None else grad_residual, *common[1:5],
                xc if grad_bias is None else grad_bias,
                xc if grad_weight is None else grad_weight, float(eps),
                float(xc.numel() // channels), channels, *shape.arguments(),
                TRAIN=train, NEED_INPUT=need_input, NEED_RESIDUAL=need_residual,
                LOAD_X=relu or (train and need_input), **flags,
            )
    return (
        None if grad_input is None else _in_dtype(grad_input, x.dtype),
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None if grad_residual is None else _in_dtype(grad_residual, x.dtype),
    )


def train_forward(x, weight, bias, eps):
    return forward(x, weight, bias, eps)


def eval_forward(x, mean, variance, weight, bias, eps):
    return forward(x, weight, bias, eps, mean=mean, variance=variance)[0]


def train_backward(grad_out, x, mean, variance, weight, eps, needs):
    return backward(grad_out, x, mean, variance, weight, None, eps, needs, train=True)[:3]


def eval_backward(grad_out, x, mean, variance, weight, eps, needs):
    return backward(grad_out, x, mean, variance, weight, None, eps, needs, train=False)[:3]
