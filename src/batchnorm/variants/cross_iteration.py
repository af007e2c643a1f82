r"""Cross-iteration batch norm (Yao et al. 2021, "Cross-Iteration Batch Normalization"): batch
statistics from the last ``window`` training iterations instead of one, for small batches.

The statistics of an earlier iteration :math:`t - \tau` were computed with that iteration's
weights :math:`\theta_{t-\tau}` of the layer before the batch norm; they are brought to the
current weights :math:`\theta_t` with a first-order Taylor term,

.. math::
    \mu_{t-\tau}(\theta_t) \approx \mu_{t-\tau} + \frac{\partial \mu_{t-\tau}}{\partial
        \theta_{t-\tau}}\,(\theta_t - \theta_{t-\tau}), \qquad
    \nu_{t-\tau}(\theta_t) \approx \nu_{t-\tau} + \frac{\partial \nu_{t-\tau}}{\partial
        \theta_{t-\tau}}\,(\theta_t - \theta_{t-\tau}),

with :math:`\nu = \mathrm{E}[x^2]`, and the compensated statistics of the window are pooled:

.. math::
    \bar\mu_t = \frac{1}{k}\sum_{\tau=0}^{k-1} \mu_{t-\tau}(\theta_t), \qquad
    \bar\sigma^2_t = \frac{1}{k}\sum_{\tau=0}^{k-1}
        \max\big(\nu_{t-\tau}(\theta_t),\, \mu_{t-\tau}(\theta_t)^2\big) - \bar\mu_t^2 .

The input is normalized with :math:`\bar\mu_t, \bar\sigma^2_t` (and eps, gamma, beta as batch
norm). As in the paper, only the current iteration's statistics carry gradients; the earlier
ones, their Jacobians and the weight difference are constants.

How it is computed here, over the core (``batchnorm.core``), never with
:math:`E[x^2] - E[x]^2`:

- each iteration keeps its mean :math:`\mu`, its variance :math:`v = \nu - \mu^2` (the core's
  two-pass moments) and the Jacobians of both with respect to the preceding weight; a channel c
  of the layer's output depends on row c of that weight only, so one backward of
  :math:`\sum_c \mu_c` (and one of :math:`\sum_c v_c`) gives every channel's Jacobian at once;
- compensation: with :math:`d = J_\mu \cdot \Delta\theta` and :math:`e = J_v \cdot \Delta\theta`
  per channel, :math:`\mu' = \mu + d` and :math:`v' = \max(v + e - d^2, 0)`, which is the
  paper's :math:`\max(\nu', \mu'^2) - \mu'^2` with :math:`J_v = J_\nu - 2\mu J_\mu`, without the
  cancellation of :math:`\nu - \mu^2`;
- pooling: the iterations' (count, mean, variance) are merged exactly with Chan's formula
  (``batchnorm.core.moments.merge_many``): with equal batch sizes this is the paper's
  :math:`\frac1k\sum` above (law of total variance); with unequal ones each iteration weighs by
  its number of values.

``window=1`` is batch norm (the plain layer's path runs). The running statistics receive the
window's statistics (Bessel's factor over all of the window's values), so eval mode normalizes
with the population statistics as seen through the window.

The preceding layer: a ``Linear`` or ``Conv1d/2d/3d`` (output channels on the weight's first
axis) whose output is this layer's input, given as ``preceding=`` at construction, or found by
:func:`link_preceding` (one forward of an example batch through the model), or set with
:meth:`link`. It is a reference, not a child module: it is not in this layer's state dict and
does not appear twice in ``model.modules()``. A preceding bias is not compensated (layers
before batch norm usually have none). Between the layer and this one may come channel-wise
operations (an activation, pooling): the Jacobians are differentiated through them.

When the history grows: in a training forward with gradients enabled (the Jacobians need the
graph from the preceding weight to the input). A training forward under ``torch.no_grad()``
(``precise_bn`` runs one) normalizes with the window but leaves the history as it is. A
preceding weight that does not require grad is a constant: its iterations are kept with zero
Jacobians. ``burn_in``: the window is used once that many iterations have been recorded (the
paper starts cross-iteration statistics after a burn-in, while the weights change fast); before
that, batch norm.

State: the history (the last ``window - 1`` iterations' means, variances, counts, weights and
Jacobians, and how many were recorded) is in the state dict, so a checkpoint resumes exactly.
A plain batch norm's checkpoint loads with ``strict=True`` and starts with an empty history.
Memory: three weight-sized tensors per remembered iteration.
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm.core.errors import BatchNormTypeError, BatchNormValueError
from batchnorm.core.layout import accumulation_dtype, as_channel, values_per_channel
from batchnorm.core.moments import centred_moments, merge_many
from batchnorm.core.normalize import inverse_std, normalize_centred
from batchnorm.dispatch import running_stats_updater
from batchnorm.modules.batchnorm import _BatchNorm

PRECEDING = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that act on each channel alone: a norm may follow its layer through them (the
# Jacobians are differentiated through them), and link_preceding looks through them.
CHANNEL_WISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
)
# The per-iteration history, in the state dict; the last three are shaped like the weight.
_PER_CHANNEL = ("history_mean", "history_var")
_WEIGHT_SHAPED = ("history_weight", "history_mean_jacobian", "history_var_jacobian")


def _check_count(value: int, what: str, least: int, owner: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise BatchNormValueError(f"{owner}: expected {what} as an integer >= {least}, got "
                                  f"{value!r}")


class _CrossIterationBatchNorm(_BatchNorm):
    """Cross-iteration batch norm: torch's batch-norm arguments plus ``window``, and the
    keyword-only ``bias``, ``preceding`` and ``burn_in``."""

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        preceding: nn.Module | None = None,
        burn_in: int = 0,
    ) -> None:
        owner = type(self).__name__
        _check_count(window, "window", 1, owner)
        _check_count(burn_in, "burn_in", 0, owner)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.window = window
        self.burn_in = burn_in
        remembered = window - 1
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("history_mean", torch.zeros(remembered, num_features, **factory))
        self.register_buffer("history_var", torch.zeros(remembered, num_features, **factory))
        self.register_buffer("history_count", torch.zeros(remembered, **factory))
        for name in _WEIGHT_SHAPED:  # shaped when the preceding layer is linked
            self.register_buffer(name, torch.zeros(remembered, 0, **factory))
        self.register_buffer("history_recorded", torch.tensor(0, dtype=torch.long, device=device))
        self.__dict__["_preceding"] = None  # a reference, not a child module
        if preceding is not None:
            self.link(preceding)

    @property
    def preceding(self) -> nn.Module | None:
        """The layer whose weight the statistics are compensated for (None until linked)."""
        return self.__dict__["_preceding"]

    def link(self, preceding: nn.Module) -> None:
        """Compensate for ``preceding``'s weight changes: a ``Linear`` or ``Conv1d/2d/3d`` with
        ``num_features`` output channels whose output (through channel-wise operations at most)
        is this layer's input. A history recorded for a weight of another shape is dropped."""
        owner = type(self).__name__
        if not isinstance(preceding, PRECEDING):
            raise BatchNormTypeError(
                f"{owner}: expected preceding as a Linear or Conv1d/2d/3d layer (output channels "
                f"on the weight's first axis), got {type(preceding).__name__}"
            )
        weight = preceding.weight
        if weight.shape[0] != self.num_features:
            raise BatchNormValueError(
                f"{owner}: expected a preceding layer with {self.num_features} output channels, "
                f"got {type(preceding).__name__} with weight of shape {tuple(weight.shape)}"
            )
        self.__dict__["_preceding"] = preceding
        shape = (self.window - 1, *weight.shape)
        if any(tuple(self._buffers[name].shape) != shape for name in _WEIGHT_SHAPED):
            for name in _WEIGHT_SHAPED:
                self._buffers[name] = torch.zeros(
                    shape, dtype=accumulation_dtype(weight.dtype), device=weight.device
                )
            self.reset_history()

    def reset_history(self) -> None:
        """Forget the remembered iterations (the next training step is plain batch norm)."""
        self.history_recorded.zero_()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if "history_recorded" in self._buffers:
            self.reset_history()

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, window={self.window}"
        return text + (f", burn_in={self.burn_in}" if self.burn_in else "")

    # -- the statistics ---------------------------------------------------------------------

    def _core(self, input, running_mean, running_var, training, momentum, **options):
        owner = type(self).__name__
        if options:
            raise BatchNormTypeError(
                f"{owner}: cross-iteration batch norm takes no {', '.join(options)}"
            )
        if not training or self.window == 1 or input.numel() == 0:
            return super()._core(input, running_mean, running_var, training, momentum)
        preceding = self.preceding
        if preceding is None:
            raise BatchNormValueError(
                f"{owner}: window={self.window} needs the layer before it, whose weight changes "
                "the statistics are compensated for: pass preceding=layer, call "
                "layer.link(conv), or batchnorm.variants.cross_iteration.link_preceding(model, "
                "example_input)"
            )
        mean, variance, centred = centred_moments(input)
        count = values_per_channel(input)
        weight_now = preceding.weight
        jacobians = self._jacobians(mean, variance, weight_now)
        if int(self.history_recorded) < max(self.burn_in, 1):  # nothing to pool yet
            result = super()._core(input, running_mean, running_var, training, momentum)
            if jacobians is not None:
                self._record(mean, variance, count, weight_now, *jacobians)
            return result
        counts, means, variances = self._window(mean, variance, count, weight_now)
        total, window_mean, m2 = merge_many(counts, means, variances * counts[:, None])
        window_var = m2 / total[0]
        centred = centred - as_channel(window_mean - mean, centred)
        parameters = self._parameters
        output = normalize_centred(
            centred, inverse_std(window_var, self.eps), parameters["weight"], parameters["bias"],
            input.dtype,
        )
        if jacobians is not None:
            self._record(mean, variance, count, weight_now, *jacobians)
        if running_mean is None:
            return output, None, None, None
        new_mean, new_var, finite = running_stats_updater(input)(
            running_mean, running_var, window_mean.detach(), window_var.detach(), momentum,
            int(total[0]), in_place=True,
        )
        return output, new_mean, new_var, finite

    def _jacobians(self, mean, variance, weight_now):
        """Per-channel Jacobians of this batch's mean and variance with respect to the
        preceding weight (shaped like it), or None when no history is recorded."""
        if not torch.is_grad_enabled():
            return None
        acc = accumulation_dtype(weight_now.dtype)
        if not weight_now.requires_grad:  # a constant weight: nothing to compensate
            zeros = torch.zeros(weight_now.shape, dtype=acc, device=weight_now.device)
            return zeros, zeros
        found = None
        if mean.requires_grad:  # one backward of sum_c mean_c: row c is channel c's Jacobian
            (found,) = torch.autograd.grad(
                mean, weight_now, torch.ones_like(mean), retain_graph=True, allow_unused=True
            )
        if found is None:
            raise BatchNormValueError(
                f"{type(self).__name__}: the linked preceding layer "
                f"({type(self.preceding).__name__}) does not produce this layer's input: its "
                "weight does not reach the input in the autograd graph. Link the layer whose "
                "output this layer normalizes"
            )
        (variance_jacobian,) = torch.autograd.grad(
            variance, weight_now, torch.ones_like(variance), retain_graph=True
        )
        return found.to(acc), variance_jacobian.to(acc)

    def _window(self, mean, variance, count, weight_now):
        """Counts (k,), means (k, C) and variances (k, C) of this iteration and the remembered
        ones, compensated to the current weight."""
        counts = mean.new_tensor([float(count)])
        remembered = min(int(self.history_recorded), self.window - 1)
        past_weight = self.history_weight[:remembered]
        change = weight_now.detach().to(past_weight.dtype)[None] - past_weight
        # channel c's change: its row of the Jacobian against its row of the weight change
        mean_shift = (self.history_mean_jacobian[:remembered] * change).flatten(2).sum(-1)
        var_shift = (self.history_var_jacobian[:remembered] * change).flatten(2).sum(-1)
        acc = mean.dtype
        mean_shift, var_shift = mean_shift.to(acc), var_shift.to(acc)
        past_mean = self.history_mean[:remembered].to(acc) + mean_shift
        past_var = torch.clamp(
            self.history_var[:remembered].to(acc) + var_shift - mean_shift * mean_shift, min=0
        )
        counts = torch.cat([counts, self.history_count[:remembered].to(acc)])
        return counts, torch.cat([mean[None], past_mean]), torch.cat([variance[None], past_var])

    @torch.no_grad()
    def _record(self, mean, variance, count, weight_now, mean_jacobian, var_jacobian) -> None:
        slot = int(self.history_recorded) % (self.window - 1)
        self.history_mean[slot] = mean.detach()
        self.history_var[slot] = variance.detach()
        self.history_count[slot] = float(count)
        self.history_weight[slot] = weight_now.detach()
        self.history_mean_jacobian[slot] = mean_jacobian
        self.history_var_jacobian[slot] = var_jacobian
        self.history_recorded += 1

    # -- checkpoints ------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """The weight-shaped history takes the checkpoint's shape (a fresh, unlinked layer has
        none yet); a checkpoint without a history (a plain batch norm's) loads and starts with
        an empty one."""
        for name in _WEIGHT_SHAPED:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != self._buffers[name].shape:
                self._buffers[name] = torch.zeros(
                    incoming.shape, dtype=incoming.dtype, device=self._buffers[name].device
                )
        history = [prefix + name for name in
                   (*_PER_CHANNEL, "history_count", *_WEIGHT_SHAPED, "history_recorded")]
        absent = [key for key in history if key not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if absent:
            for key in absent:
                if key in missing_keys:
                    missing_keys.remove(key)
            self.reset_history()
        if self.preceding is not None:  # a history for a weight of another shape is dropped
            self.link(self.preceding)


class CrossIterationBatchNorm1d(_CrossIterationBatchNorm):
    r"""Cross-iteration batch norm over (N, C) or (N, C, L) input (see the module docstring).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as for ``BatchNorm1d``.
        window: how many iterations the statistics span, this one included; 1 is batch norm.
            Default: 4.
        bias (keyword-only): learn the shift beta. Default: True.
        preceding (keyword-only): the ``Linear``/``Conv1d`` whose output this layer
            normalizes; needed for ``window > 1`` (or :meth:`link` / :func:`link_preceding`).
        burn_in (keyword-only): recorded iterations before the window is used. Default: 0.

    Example::

        >>> linear = torch.nn.Linear(8, 16, bias=False)
        >>> norm = CrossIterationBatchNorm1d(16, window=3, preceding=linear)
        >>> for _ in range(4):
        ...     norm(linear(torch.randn(4, 8))).square().mean().backward()
        >>> int(norm.history_recorded)
        4
    """

    _allowed_dims = (2, 3)


class CrossIterationBatchNorm2d(_CrossIterationBatchNorm):
    """Cross-iteration batch norm over (N, C, H, W) input; arguments as for
    :class:`CrossIterationBatchNorm1d` (``preceding``: a ``Conv2d``)."""

    _allowed_dims = (4,)


class CrossIterationBatchNorm3d(_CrossIterationBatchNorm):
    """Cross-iteration batch norm over (N, C, D, H, W) input; arguments as for
    :class:`CrossIterationBatchNorm1d` (``preceding``: a ``Conv3d``)."""

    _allowed_dims = (5,)


@torch.no_grad()
def link_preceding(model: nn.Module, *example_args, **example_kwargs) -> dict[str, str]:
    """Link every cross-iteration batch norm in ``model`` with ``window > 1`` and no link yet to
    the ``Linear``/``Conv`` layer whose output it receives, directly or through channel-wise
    modules (:data:`CHANNEL_WISE`: activations, dropout, pooling), found by running ``model``
    once on the example input in eval mode without gradients (nothing is updated; training
    modes are restored). Returns ``{batch norm name: layer name}`` for the layers it linked.

    Raises ``ValueError``, linking none, naming the batch norms whose input is not such an
    output (a sum of two branches, a functional call the hooks cannot see), or that the example
    did not reach: link those with ``norm.link(layer)`` first (layers already linked are kept),
    then call this again.
    """
    names = {module: name or "<root>" for name, module in model.named_modules()}
    norms = [m for m in model.modules() if isinstance(m, _CrossIterationBatchNorm)
             and m.window > 1 and m.preceding is None]
    producers: dict[int, nn.Module] = {}
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the pass runs
    found: dict[nn.Module, nn.Module | None] = {}

    def produced(layer, _args, output):
        if isinstance(output, torch.Tensor):
            producers[id(output)] = layer
            keep_alive.append(output)

    def passed_on(module, args, output):
        layer = producers.get(id(args[0])) if args else None
        if layer is not None and isinstance(output, torch.Tensor):
            producers[id(output)] = layer
            keep_alive.append(output)

    def received(norm, args):
        found[norm] = producers.get(id(args[0])) if args else None

    handles = [m.register_forward_hook(produced) for m in model.modules()
               if isinstance(m, PRECEDING)]
    handles += [m.register_forward_hook(passed_on) for m in model.modules()
                if isinstance(m, CHANNEL_WISE)]
    handles += [norm.register_forward_pre_hook(received) for norm in norms]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(*example_args, **example_kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    unlinked = [names[norm] for norm in norms if found.get(norm) is None]
    if unlinked:
        raise ValueError(
            "link_preceding: no Linear or Conv layer's output (directly or through channel-wise "
            "modules) is the input of "
            f"{', '.join(unlinked)} (or the example did not reach them); link them with "
            "norm.link(layer)"
        )
    links = {}
    for norm in norms:
        norm.link(found[norm])
        links[names[norm]] = names[found[norm]]
    return links

