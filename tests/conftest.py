"""Shared test helpers: tolerances per dtype, input builders, hypothesis settings."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("BATCHNORM_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")

# (rtol, atol) when comparing against torch.nn or the float64 reference.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual, expected, dtype, scale: float = 1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), rtol=rtol * scale, atol=atol * scale
    )


def make_input(shape, dtype=torch.float32, layout="contiguous", seed=0, scale=1.0, offset=0.0):
    """A random input with the requested memory layout.

    layout: "contiguous", "channels_last" (4D/5D), or "strided" (a non-contiguous view: every
    other element along the last axis of a larger tensor).
    """
    generator = torch.Generator().manual_seed(seed)
    widened = (*shape[:-1], shape[-1] * 2) if layout == "strided" else tuple(shape)
    x = (torch.randn(widened, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "strided":
        x = x[..., ::2]
        assert not x.is_contiguous() or shape[-1] == 1
    elif layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
