"""Input validation shared by every batch norm in the package.

Each check raises a :class:`~batchnorm.core.errors.BatchNormTypeError` or
:class:`~batchnorm.core.errors.BatchNormValueError` (a ``TypeError``/``ValueError`` that is also
the ``RuntimeError`` torch raises for the same input) that names what was expected and what came,
and runs before any tensor or buffer is touched, so a rejected call changes nothing.

These checks are also what keeps the compiled kernels safe: they read per-channel vectors by
address, so a vector shorter than the channel count, or one on another device (a ``meta`` tensor
has no memory), must never get past here.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad

from batchnorm.core.errors import BatchNormTypeError, BatchNormValueError
from batchnorm.core.layout import values_per_channel

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise BatchNormTypeError(
            f"{what} must be a torch.Tensor, got {type(tensor).__name__}"
        )
    if tensor.dtype not in FLOATING_DTYPES:
        raise BatchNormTypeError(
            f"{what} must have a real floating dtype (float16, bfloat16, float32 or float64), "
            f"got {tensor.dtype}"
        )


def check_input(
    x: torch.Tensor,
    *,
    allowed_dims: tuple[int, ...] | None = None,
    num_features: int | None = None,
    owner: str = "batch_norm",
) -> None:
    """Validate an input of shape (N, C, *spatial).

    ``allowed_dims``: the numbers of dimensions the caller accepts (a module's own rule);
    ``num_features``: the channel count the caller was built for.
    """
    check_floating(x, f"{owner}: input")
    if allowed_dims is not None and x.dim() not in allowed_dims:
        wanted = " or ".join(f"{d}D" for d in allowed_dims)
        raise BatchNormValueError(
            f"{owner}: expected {wanted} input, got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if x.dim() < 2:
        raise BatchNormValueError(
            f"{owner}: expected input of shape (N, C, *), at least 2D, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise BatchNormValueError(
            f"{owner}: expected {num_features} channels (dimension 1 of the input), "
            f"got {x.shape[1]} in input of shape {tuple(x.shape)}"
        )


def check_per_channel(
    vector: torch.Tensor | None,
    num_channels: int,
    what: str,
    owner: str = "batch_norm",
    device: torch.device | None = None,
) -> None:
    """A per-channel parameter or statistic: a floating tensor of shape (C,), on ``device``
    (the input's) when given."""
    if vector is None:
        return
    check_floating(vector, f"{owner}: {what}")
    if vector.dim() != 1 or vector.shape[0] != num_channels:
        raise BatchNormValueError(
            f"{owner}: expected {what} of shape ({num_channels},) to match the input's "
            f"{num_channels} channels, got shape {tuple(vector.shape)}"
        )
    if device is not None:
        check_device(vector, device, what, owner)


_FLOATING = frozenset(FLOATING_DTYPES)


def accepts_common_call(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum,
    eps,
    use_batch_stats: bool,
) -> bool:
    """Whether a call with this (checked) input and no mask passes every check of the functional
    forms: the four per-channel tensors as :func:`check_per_channel` wants them on the input's
    device (the two statistics both given or both None), momentum (None or a float in [0, 1])
    and eps as :func:`check_momentum` and :func:`check_eps` accept them given as floats, and,
    with batch statistics, the batch-size rule of :func:`check_batch_statistics_possible`.

    One function for the question every batch norm call asks (in a model, each call on the
    path costs more than the tests in it). False sends the caller to the full checks, which
    name what is wrong or accept what this test leaves to them (a tensor momentum, a subclass)."""
    if not (
        (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0))
        and type(eps) is float
        and (eps > 0.0 if use_batch_stats else eps >= 0.0)
        and eps < math.inf
        and (running_mean is None) == (running_var is None)
    ):
        return False
    shape = x.shape
    channels = shape[1]
    on_cpu = x.is_cpu
    device = None if on_cpu else x.device
    for vector in (running_mean, running_var, weight, bias):
        if vector is not None and not (
            isinstance(vector, torch.Tensor)
            and vector.dtype in _FLOATING
            and vector.dim() == 1
            and vector.shape[0] == channels
            and (vector.is_cpu if on_cpu else vector.device == device)
        ):
            return False
    # more than one value per channel (``values_per_channel``, in place), or none at all
    return not use_batch_stats or x.numel() != channels


def check_device(tensor: torch.Tensor, device: torch.device, what: str, owner: str) -> None:
    """``tensor`` lives on the input's ``device``."""
    if tensor.device != device:
        raise BatchNormValueError(
            f"{owner}: expected {what} on the input's device {device}, got {what} on "
            f"{tensor.device}"
        )


def check_mask(mask: torch.Tensor | None, x: torch.Tensor, owner: str = "batch_norm") -> None:
    """A validity mask: bool, shaped like the input without its channel axis."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise BatchNormTypeError(f"{owner}: expected a bool tensor as mask, got {got}")
    expected = (x.shape[0], *x.shape[2:])
    if tuple(mask.shape) != expected:
        raise BatchNormValueError(
            f"{owner}: expected mask of shape {expected} (the input's shape without the channel "
            f"axis), got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise BatchNormValueError(f"{owner}: expected mask on {x.device}, got {mask.device}")


def check_batch_statistics_possible(
    x: torch.Tensor, owner: str = "batch_norm", mask: torch.Tensor | None = None
) -> None:
    """Batch statistics need more than one value per channel, or none at all: an empty batch
    (as torch, which DDP with uneven data and detection heads rely on) normalizes nothing and
    leaves the running statistics as they are."""
    if mask is None:
        count = values_per_channel(x)
    elif torch.compiler.is_compiling() or x.numel() == 0:
        return  # a data-dependent check would break the graph; the count is traced as is
    else:
        count = int(mask.sum())
    if count == 1 or (count == 0 and mask is not None):
        what = "value" if mask is None else "valid (unmasked) value"
        raise BatchNormValueError(
            f"{owner}: expected more than 1 {what} per channel to compute batch statistics in "
            f"training, got input of shape {tuple(x.shape)} ({count} per channel). The variance "
            "of one value is 0, so every output would equal the bias. Ways out: call .eval() to "
            "use the running statistics, use a larger batch, use GroupNorm or LayerNorm (which "
            "normalize within each sample), or use batch renormalization with running "
            "statistics."
        )


def scalar_value(
    value: float | torch.Tensor, what: str, owner: str, device: torch.device | None = None
) -> float | None:
    """A hyperparameter given as a number or a 0-dim real tensor (on the input's ``device`` or
    the CPU), as a float to check; None where its value cannot be read without breaking a
    compiled graph or a transform (then the caller's own range holds by construction)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise BatchNormTypeError(
                f"{owner}: expected {what} as a number or a 0-dim real tensor, got a tensor of "
                f"shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if device is not None and value.device.type != "cpu" and value.device != device:
            raise BatchNormValueError(
                f"{owner}: expected {what} on the input's device {device} or the CPU, got "
                f"{what} on {value.device}"
            )
        if torch.compiler.is_compiling() or value.device.type == "meta" or _is_wrapped(value):
            return None
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise BatchNormTypeError(
        f"{owner}: expected {what} as a number or a 0-dim tensor, got {type(value).__name__}"
    )


def check_running_stats_writable(running_mean, running_var, owner: str) -> None:
    """Running statistics that a training call updates in place: outside inference mode they
    must not be inference tensors (a module built under ``torch.inference_mode()``), whose
    in-place update torch refuses; refused here, as torch refuses it, before anything is
    written. (Not asked under torch.compile, whose tracer cannot ask about inference mode.)"""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
        if tensor is not None and tensor.is_inference():
            raise BatchNormValueError(
                f"{owner}: expected a {name} that can be updated in place outside inference "
                "mode, got an inference tensor (made under torch.inference_mode()); train "
                "inside torch.inference_mode(), or give the module copies made outside it "
                "(module.running_mean = module.running_mean.clone(), and so on)"
            )


def check_momentum(
    momentum: float | torch.Tensor | None, owner: str = "batch_norm", device=None
) -> None:
    """A number in [0, 1], a 0-dim real tensor holding one (on the input's device or the CPU),
    or None (the modules' cumulative average)."""
    if momentum is None:
        return
    value = scalar_value(momentum, "momentum", owner, device)
    if value is not None and not 0.0 <= value <= 1.0:  # NaN fails this too
        raise BatchNormValueError(f"{owner}: expected momentum in [0, 1] or None, got {momentum!r}")


def check_eps(eps: float, owner: str = "batch_norm", use_batch_stats: bool = False) -> None:
    """eps: a finite number, > 0 where batch statistics are used (a constant input channel
    would divide by zero, as torch refuses too), >= 0 with given statistics."""
    if isinstance(eps, torch.Tensor) and eps.dim() == 0 and not torch.compiler.is_compiling():
        eps = eps.item()
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise BatchNormTypeError(f"{owner}: expected eps as a number, got {type(eps).__name__}")
    if use_batch_stats and not eps > 0.0:
        raise BatchNormValueError(
            f"{owner}: batch_norm eps must be positive during training (batch statistics), "
            f"got {eps!r}"
        )
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise BatchNormValueError(f"{owner}: expected a finite eps >= 0, got {eps!r}")


def check_no_statistics_tangent(
    x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    owner: str = "batch_norm",
) -> None:
    """Under forward-mode AD, the running statistics are buffers, not inputs to differentiate:
    with a tangent on the input, a tangent on either is refused (as torch refuses it), rather
    than silently dropped."""
    if forward_ad._current_level < 0 or forward_ad.unpack_dual(x).tangent is None:
        return
    for what, tensor in (("running_mean", running_mean), ("running_var", running_var)):
        if tensor is not None and forward_ad.unpack_dual(tensor).tangent is not None:
            raise BatchNormValueError(
                f"{owner}: batch_norm is not differentiable wrt running_mean and running_var, "
                f"they cannot have forward grad defined (got a tangent on {what})"
            )


def check_construction(eps: float, momentum: float | None, owner: str) -> None:
    """What a module can refuse when it is built: a negative or NaN eps, a momentum outside
    [0, 1]. (eps = 0 is kept for eval with running statistics, as torch allows.)"""
    check_eps(eps, owner)
    check_momentum(momentum, owner)


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
