"""Shared test set-up: the device, the per-dtype tolerances, output poisoning and hypothesis profiles.

Import order matters: without CUDA the kernels run under the Triton interpreter, and
``TRITON_INTERPRET`` must be set before anything imports triton. pytest imports this file before any
test module, so the switch lives at its top. Tests import the helpers with ``from conftest import ...``.
"""

from __future__ import annotations

import math
import os

import torch

if torch.cuda.is_available():
    DEVICE = "cuda"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    DEVICE = "cpu"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Tolerances. Kernels accumulate in fp32; in attention, P is rounded to the input dtype before P @ V and the
# output is rounded to it at the end, so the bounds follow the dtype's unit roundoff (fp16 2^-11, bf16 2^-8).
# ``lse`` is always fp32 but is computed from the same rounded products, hence its own row. Never loosen a
# bound to make a test pass: a failure here is a finding.
TOL = {
    torch.float32: dict(o=(1e-4, 1e-4), lse=(1e-4, 1e-4)),
    torch.float16: dict(o=(5e-3, 5e-3), lse=(2e-3, 2e-3)),
    torch.bfloat16: dict(o=(2e-2, 2e-2), lse=(1e-2, 1e-2)),
}

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def assert_close(actual, expected, dtype, what="o", *, tol=None, msg=""):
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, compared in float64.

    ``dtype`` picks the row of :data:`TOL` and ``what`` (``"o"`` or ``"lse"``) the column; ``tol`` overrides
    both with an explicit ``(atol, rtol)``. A ``-inf`` (or ``+inf``) matches only the same infinity. Any NaN,
    in ``actual`` or ``expected``, fails. The failure message gives the max abs error, where it is, and how
    many elements are out of bounds.
    """
    atol, rtol = TOL[dtype][what] if tol is None else tol
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)} {msg}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    for name, t in (("actual", a), ("expected", e)):
        nan = torch.isnan(t)
        if bool(nan.any()):
            first = tuple(nan.nonzero()[0].tolist())
            raise AssertionError(f"{what}: {int(nan.sum())} NaN in {name}, first at {first} {msg}")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    inf_mismatch = (inf_a | inf_e) & ~(inf_a & inf_e & (a == e))
    if bool(inf_mismatch.any()):
        idx = tuple(inf_mismatch.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(inf_mismatch.sum())} infinities differ, first at {idx}: "
            f"actual {a[idx].item()} vs expected {e[idx].item()} {msg}"
        )
    finite = ~inf_e
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = atol + rtol * e.abs().where(finite, torch.zeros_like(e))
    bad = err > bound
    if bool(bad.any()):
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what} ({str(dtype).replace('torch.', '')}, atol={atol:g}, rtol={rtol:g}): "
            f"{int(bad.sum())}/{bad.numel()} elements out of bounds; max abs error {err.max().item():.3e} at "
            f"{worst} (actual {a[worst].item():.6g}, expected {e[worst].item():.6g}); first bad at {first} {msg}"
        )


def poison(t):
    """Fill ``t`` in place with NaN (floats) or an absurd value (integers) and return it.

    Pass a poisoned buffer as ``out=``: an element the kernel fails to write then fails
    :func:`assert_close`.
    """
    if t.is_floating_point():
        return t.fill_(math.nan)
    return t.fill_(torch.iinfo(t.dtype).min)


# ---------------------------------------------------------------------------------------------------------
# Hypothesis profiles. "ci" is derandomized and small enough for the interpreter on 2 CPU cores; "gpu" runs
# many more, larger examples (see LARGE). Pick one with CK_HYPOTHESIS_PROFILE.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=20, print_blob=True, database=None,
    suppress_health_check=_QUIET,
)
settings.register_profile("dev", deadline=None, max_examples=50, print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("gpu", deadline=None, max_examples=300, print_blob=True, suppress_health_check=_QUIET)

PROFILE = os.environ.get("CK_HYPOTHESIS_PROFILE", "gpu" if DEVICE == "cuda" else "ci")
settings.load_profile(PROFILE)

# Strategies widen their size bounds (longer KV, head dims up to 128, more heads) under the GPU profile.
LARGE = PROFILE == "gpu"


@pytest.fixture(scope="session")
def device():
    """The device every test tensor lives on: "cuda" when available, else "cpu" (under the interpreter)."""
    return DEVICE


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"cascade_kernels tests: device={DEVICE} TRITON_INTERPRET={interp} hypothesis profile={PROFILE}"
