"""Shared test helpers: tolerances per dtype, input builders, hypothesis settings."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings


def _import_triton_interpreted() -> bool:
    """Import Triton first in interpreter mode on a machine without CUDA.

    A process holds either compiled or interpreted Triton kernels, fixed when Triton is first
    imported, and other tests (torch.compile's, whose inductor imports Triton when present) may
    import it before tests/backends/test_triton.py runs. Importing it here, with
    ``TRITON_INTERPRET=1`` for the import only, fixes the mode for the session. True when Triton
    is imported in that mode."""
    if torch.cuda.is_available() or "triton" in sys.modules:
        return False
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return True


TRITON_INTERPRETED = _import_triton_interpreted()

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


def input_gradient_rounding(x, g, weight, eps, dtype) -> torch.Tensor:
    """Per-element allowance, beyond the dtype's tolerance, for a training input gradient.

    dL/dx = gain (g - mean(g) - x_hat mean(g x_hat)) cancels when a channel's variance is small
    against the spread of its values (two values per channel, nearly equal): rounding x - mean
    in the compute dtype perturbs x_hat by about u (|x| + |mean|) / std, and the cancelling terms
    carry that perturbation at the scale gain |g| |x_hat|. Every implementation pays it (torch's
    own float32 result was 1e-4 off the float64 one on such a channel, as was ours); on
    well-conditioned channels the allowance is far below the tolerance.
    """
    from batchnorm import reference
    from batchnorm.core.layout import channel_view_shape, reduce_dims

    x64, g64 = x.detach().double(), g.detach().double()
    dims, shape = reduce_dims(x), channel_view_shape(x)
    mean, variance = (torch.from_numpy(v).reshape(shape) for v in reference.moments(x64.numpy()))
    invstd = (variance + eps).rsqrt()
    gain = invstd if weight is None else invstd * weight.detach().double().abs().reshape(shape)
    unit = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    x_span = x64.abs().amax(dim=dims, keepdim=True) + mean.abs()
    x_hat = ((x64 - mean) * invstd).abs().amax(dim=dims, keepdim=True)
    g_max = g64.abs().amax(dim=dims, keepdim=True)
    return 4 * unit * gain * g_max * x_hat * (1 + x_span * invstd)


def assert_close_with(actual, expected, dtype, allowance, scale: float = 1.0):
    """:func:`assert_close` with an extra per-element absolute ``allowance``."""
    rtol, atol = TOLERANCES[dtype]
    actual, expected = actual.double(), expected.double()
    excess = (actual - expected).abs() - (atol * scale + rtol * scale * expected.abs() + allowance)
    worst = int(excess.argmax())
    allowed = allowance.expand_as(actual).flatten()[worst].item()
    assert excess.max() <= 0, (
        f"{int((excess > 0).sum())} of {excess.numel()} elements differ beyond tolerance; worst "
        f"at flat index {worst}: {actual.flatten()[worst].item()} against "
        f"{expected.flatten()[worst].item()} (allowance {allowed})"
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


@pytest.fixture
def python_path():
    """The CPU backend's Python path for the whole test: its compiled call path
    (``batchnorm.backends.cpu.native``), whose calls a test's spies on the Python entry points
    cannot see, turned off."""
    from batchnorm.backends.cpu import native

    with native.disabled():
        yield


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


def record_answers(monkeypatch, owner, name: str, judge=lambda result: result) -> list:
    """Replace ``owner.name`` with a wrapper that calls it and records ``judge(result)`` of
    each call in the returned list (which path a call took, in the tests of the common calls)."""
    original = getattr(owner, name)
    answers: list = []

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        answers.append(judge(result))
        return result

    monkeypatch.setattr(owner, name, recording)
    return answers


def check_common_backward_composes(monkeypatch, module, layout) -> None:
    """``module``'s common training step (float64, 3 channels) passes gradcheck and
    gradgradcheck with batched gradients, the first-order backward on the backend's
    ``backward_common`` every time (double backward and batched gradients leave it for the
    general path, which the checks then exercise)."""
    from torch.autograd import gradcheck, gradgradcheck

    from batchnorm.backends import cpu

    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    x = make_input((4, 3, 2, 3), torch.float64, layout, seed=8).requires_grad_(True)
    answered = record_answers(monkeypatch, cpu, "backward_common", lambda g: g is not None)
    assert gradcheck(module, (x,), check_batched_grad=True)
    assert answered and all(answered)
    assert gradgradcheck(module, (x,), check_batched_grad=True)

