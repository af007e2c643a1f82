r"""``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d``: drop-in for ``torch.nn``'s.

.. math::
    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

The modules subclass ``torch.nn.modules.batchnorm._BatchNorm`` for its parameters, buffers and
checkpoint handling, so state-dict keys are identical (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``) and code that recognises batch norms with
``isinstance(m, _BatchNorm)`` (weight-decay grouping, freezing, converters) recognises ours.
The forward is ours: ``batchnorm.functional`` with its own statistics and backward.

Beyond torch: a training batch whose statistics are not finite leaves ``running_mean``,
``running_var`` and ``num_batches_tracked`` unchanged and warns once per module. Checking the
flag costs one host synchronisation per training step on an accelerator; set
``module.warn_on_nonfinite = False`` to skip the check (the protection itself stays, it is
computed on the device).
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from batchnorm.backends.traceable import capturing
from batchnorm.core.checks import FLOATING_DTYPES, check_construction, check_input
from batchnorm.core.context import is_batched, transforms_active
from batchnorm.core.errors import BatchNormValueError
from batchnorm.core.layout import values_per_channel
from batchnorm.core.running import (
    commit_running_stats,
    count_under_transform,
    warn_nonfinite,
)
from batchnorm.functional import (
    batch_norm_core,
    normalize_common,
    normalize_with,
    train_common,
    validate_arguments,
)
from batchnorm.tracing import RefusesScripting, is_proxy, record_as_leaf

# torch added the keyword-only ``bias`` (a weight without a shift) in 2.13; on older versions the
# modules implement it themselves, with the same state dict (no "bias" key) and repr.
_TORCH_TAKES_BIAS = "bias" in inspect.signature(_TorchBatchNorm.__init__).parameters
_FLOATING = frozenset(FLOATING_DTYPES)
_SINGLE_SAMPLE_CHOICES = ("error", "running")


class _BatchNorm(RefusesScripting, _TorchBatchNorm):
    """Shared logic of the batch norm modules; subclasses only state which inputs they accept.

    The path of a call is kept short on purpose. Inside a model every batch norm runs between
    two convolutions that push its code and data out of the caches, and there each Python call
    on its path costs about 1.5 us instead of 0.1 (a (4, 256, 6, 6) eval call after a
    convolution: the validation 33 us against 4 when repeated alone, the backend's choice 18
    against 0.9). So the common call is answered in place where a helper would be called.
    """

    _allowed_dims: tuple[int, ...] = ()
    # whether the input rule is this class's (dims and channels), so that the common input can
    # be accepted without calling _check_input_dim; False in subclasses with a rule of their own
    _plain_input_rule: bool = True
    # whether _core (and _commit_running_stats) are this class's (plain batch norm), so that the
    # common calls can skip them; False in the variants that normalize in their own way
    _plain_core: bool = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_input_rule = cls._check_input_dim is _BatchNorm._check_input_dim
        cls._plain_core = (
            cls._core is _BatchNorm._core
            and cls._commit_running_stats is _BatchNorm._commit_running_stats
        )
    warn_on_nonfinite: bool = True
    # What a training batch with a single value per channel does (the last batch of a loader):
    # "error" (torch's refusal, the default) or "running" (normalize it with the running
    # statistics, as eval does, and leave them and num_batches_tracked unchanged).
    single_sample: str = "error"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        check_construction(eps, momentum, type(self).__name__)
        if _TORCH_TAKES_BIAS:
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
            )
        else:  # torch before the keyword: drop the bias it made
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device, dtype
            )
            if not bias and affine:
                del self.bias
                self.register_parameter("bias", None)
        self._warned_nonfinite = False

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if not _TORCH_TAKES_BIAS:  # older torch's repr does not say; ours always does
            text = text.replace(
                ", track_running_stats", f", bias={self.bias is not None}, track_running_stats"
            )
        return text

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_input(
            input,
            allowed_dims=self._allowed_dims,
            num_features=self.num_features,
            owner=type(self).__name__,
        )

    def _momentum_now(self) -> float | torch.Tensor:
        """The weight of this batch in the running statistics (cumulative average when None)."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / (self.num_batches_tracked + 1).to(self.running_mean.dtype)

    # Parameters and buffers are read from nn.Module's own dictionaries: each attribute access
    # through Module.__getattr__ costs about 0.5 us, and a forward made about ten of them.

    def _core(self, input, running_mean, running_var, training, momentum, **options):
        """The functional core this module wraps (variants override it, nothing else). The
        arguments have been validated by :meth:`_validate`."""
        parameters = self._parameters
        return batch_norm_core(
            input, running_mean, running_var, parameters["weight"], parameters["bias"],
            training=training, momentum=momentum, eps=self.eps, owner=type(self).__name__,
            input_checked=True, in_place=True, **options,
        )

    def _common_input(self, input) -> bool:
        """Whether ``input`` passes this module's input rule as the common input does, without
        the calls of the full check (in a model each call on the path costs a microsecond or
        more with caches the layers before have filled: see the class docstring). False also
        where a subclass has a rule of its own; then ask :meth:`_check_input_dim`."""
        return (
            self._plain_input_rule
            and type(input) is torch.Tensor
            and input.dim() in self._allowed_dims
            and input.shape[1] == self.num_features
        )

    def _validate(self, input, running_mean, running_var, use_batch_stats, mask) -> None:
        """Everything a call uses, checked once before anything runs: the input (dims and
        channels, the module's own rule), then what the functional form checks. Parameters and
        buffers are re-checked on every call: a hand-assigned or loosely loaded tensor of the
        wrong size or device must never reach a kernel."""
        if not (self._common_input(input) and input.dtype in _FLOATING):
            self._check_input_dim(input)
        parameters = self._parameters
        validate_arguments(
            input, running_mean, running_var, parameters["weight"], parameters["bias"],
            use_batch_stats, self.momentum, self.eps, type(self).__name__, mask,
            input_checked=True,
        )

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if type(input) is not torch.Tensor and is_proxy(input):
            # torch.fx: one call_module node, as torch's batch norms
            return record_as_leaf(self, input, *(() if mask is None else (mask,)))
        buffers, training = self._buffers, self.training
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        plain = running_mean is not None and mask is None and self._plain_core
        common = plain and self._common_input(input)
        if plain and not training:
            # eval with running statistics, the inference call: the common one checked and
            # normalized in one functional call, any other validated in full, then normalized
            # by the one functional that does only that (what _core would reach, two calls
            # later)
            parameters = self._parameters
            if common:
                output = normalize_common(
                    input, running_mean, running_var, parameters["weight"], parameters["bias"],
                    self.eps,
                )
                if output is not None:
                    return output
            self._validate(input, running_mean, running_var, False, None)
            return normalize_with(
                input, running_mean, running_var, parameters["weight"], parameters["bias"],
                self.eps,
            )
        if (
            # the common training step (eval returned above), checked and computed in one
            # functional call; any other call is validated in full below
            common
            and self.track_running_stats
            # (a batch of one value per channel is declined there: the general path applies
            # single_sample to it; an unknown choice is named there on every call)
            and self.single_sample in _SINGLE_SAMPLE_CHOICES
        ):
            parameters = self._parameters
            done = train_common(
                input, running_mean, running_var, parameters["weight"], parameters["bias"],
                self.eps, self.momentum, buffers["num_batches_tracked"],
            )
            if done is not None:
                if done[1] is not True:  # (a finite batch is counted by the same call)
                    self._commit_running_stats(running_mean, running_var, done[1])
                return done[0]
        updating = training and self.track_running_stats and running_mean is not None
        use_running = not training or self.track_running_stats
        running_mean = running_mean if use_running else None
        running_var = running_var if use_running else None
        use_batch_stats = training or running_mean is None
        if (
            use_batch_stats
            and self.single_sample != "error"
            and self._single_sample_uses_running(input, mask, running_mean)
        ):
            updating = use_batch_stats = False
        self._validate(input, running_mean, running_var, use_batch_stats, mask)
        options = {} if mask is None else {"mask": mask}
        output, new_mean, new_var, finite = self._core(
            input,
            running_mean,
            running_var,
            training=use_batch_stats,
            momentum=(self.momentum if self.momentum is not None else self._momentum_now())
            if updating
            else 0.0,
            **options,
        )
        if updating:
            self._commit_running_stats(new_mean, new_var, finite)
        return output

    def _single_sample_uses_running(self, input, mask, running_mean) -> bool:
        """Whether ``single_sample="running"`` applies to this training call: running
        statistics exist and the batch has the one value per channel (or, with a mask, at most
        one valid value) that batch statistics refuse."""
        if self.single_sample == "error":
            return False
        if self.single_sample != "running":
            raise BatchNormValueError(
                f"{type(self).__name__}: expected single_sample 'error' or 'running', got "
                f"{self.single_sample!r}"
            )
        if running_mean is None or torch.compiler.is_compiling():
            return False
        if not isinstance(input, torch.Tensor) or input.dim() < 2:
            return False  # refused by the validation that follows
        if mask is None:
            return values_per_channel(input) == 1
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            return False  # refused by the validation that follows
        return input.numel() > 0 and int(mask.sum()) <= 1

    def _commit_running_stats(self, new_mean, new_var, finite) -> None:
        buffers = self._buffers
        tracked = buffers["num_batches_tracked"]
        if finite is True and new_mean is buffers["running_mean"] and not transforms_active():
            # the common step: the backend wrote the update in place and read the flag
            if tracked is not None:
                tracked.add_(1)  # (a buffer: no autograd here)
            return
        commit_running_stats(buffers["running_mean"], buffers["running_var"], new_mean, new_var)
        if tracked is not None and not torch.compiler.is_compiling() and transforms_active():
            count_under_transform(tracked, finite)
        elif tracked is not None and finite is not False:
            # a 0-dim bool tensor adds 1 or 0 without being read; a Python True adds the int 1
            # (adding the bool itself costs 0.8 us more)
            tracked.add_(1 if finite is True else finite)  # (a buffer: no autograd here)
        if (
            self.warn_on_nonfinite
            and not self._warned_nonfinite
            and not torch.compiler.is_compiling()
            # a recorded graph cannot keep a Python branch on a tensor (jit.trace would warn)
            and not capturing()
            # (one flag per vmapped member: no Python branch on it)
            and not (isinstance(finite, torch.Tensor) and is_batched(finite))
            and not bool(finite)
        ):
            self._warned_nonfinite = True
            warn_nonfinite(self._describe())

    def _describe(self) -> str:
        name = getattr(self, "_qualified_name", None)
        where = f" '{name}'" if name else ""
        return f"{type(self).__name__}{where} ({self.extra_repr()})"


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    r"""Batch norm over a 2D input (N, C) or 3D input (N, C, L).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for stability. Default: 1e-5.
        momentum: weight of the new batch in the running statistics; None for a cumulative
            moving average. Default: 0.1.
        affine: learn a per-channel scale and shift. Default: True.
        track_running_stats: keep running statistics for eval mode; if False, batch statistics
            are used in both modes. Default: True.

    Shape: input (N, C) or (N, C, L); output the same.

    Padded sequences: ``bn(x, mask)`` with a bool ``mask`` of shape (N, L) for x of shape
    (N, C, L) (or (N,) for (N, C)) computes the batch and running statistics from the valid
    positions only. Padded positions are normalized with those statistics too (their output is
    the normalization of the values they hold); mask them downstream as usual.

    Example::

        >>> bn = BatchNorm1d(16)
        >>> bn(torch.randn(32, 16)).shape
        torch.Size([32, 16])
    """

    _allowed_dims = (2, 3)


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    r"""Batch norm over a 4D input (N, C, H, W), contiguous or channels_last.

    Arguments as for :class:`BatchNorm1d`. Shape: input (N, C, H, W); output the same.

    Example::

        >>> bn = BatchNorm2d(8)
        >>> bn(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    _allowed_dims = (4,)


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    r"""Batch norm over a 5D input (N, C, D, H, W), contiguous or channels_last_3d.

    Arguments as for :class:`BatchNorm1d`. Shape: input (N, C, D, H, W); output the same.

    Example::

        >>> bn = BatchNorm3d(4)
        >>> bn(torch.randn(2, 4, 3, 3, 3)).shape
        torch.Size([2, 4, 3, 3, 3])
    """

    _allowed_dims = (5,)
