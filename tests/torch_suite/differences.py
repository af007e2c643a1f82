"""Where we differ from torch on purpose: the one list (copy it to the README as it stands).

Keys are patterns over a test's name with its parameters (``item.name``, e.g.
``test_errors_message[BatchNorm2d-eps=-1.0-float32]``) in which ``*`` stands for any text and
everything else, brackets included, for itself; values say why. Every matching test is an
expected failure with ``strict=True``: if we start agreeing with torch, the test reports XPASS as a
failure and the entry must go. A difference that is not deliberate (a bug) does not belong here.
"""

from __future__ import annotations

import re

DELIBERATE: dict[str, str] = {
    "test_nonfinite_batch_updates_running_stats_like_torch[*]": (
        "a training batch with non-finite statistics leaves running_mean, running_var and "
        "num_batches_tracked unchanged (and warns once); torch folds the NaN into them"
    ),
    "test_errors_message[*-eps=-1.0-*]": (
        "our error messages are our own (they name what was expected and what came): "
        "'expected a finite eps >= 0, got -1.0' where torch says 'eps must be positive'"
    ),
    "test_errors[*-eps=-1.0-*]": (
        "a negative or NaN eps is refused when the module is built, at the line that made it; "
        "torch builds the module and refuses it at the first forward"
    ),
    "test_eps_must_be_positive_in_training[-1.0-*]": (
        "the same: eps=-1.0 is refused at construction, so the module torch's test builds "
        "never exists (eps=0.0, valid in eval, is accepted and refused in training as by torch)"
    ),
    "test_momentum_outside_unit_interval": (
        "momentum must be in [0, 1] or None (a ValueError, also a RuntimeError); torch accepts "
        "any number, e.g. F.batch_norm(..., training=False, momentum=-1.2)"
    ),
}


def matches(name: str, pattern: str) -> bool:
    """Whether a test name fits a pattern of :data:`DELIBERATE` (``*``: any text)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name) is not None
