"""Small pieces every kernel module shares: the interpreter switch and the one dot helper."""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # grid dependency control; ``_launch.dependent_launch`` asks for it only with the triton versions checked
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


# Triton makes a kernel interpreted or compiled when it is defined (at import of this package): read once.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when kernels run on the CPU through ``TRITON_INTERPRET=1`` (as set when this package was imported)."""
    return _INTERPRETING


def version_tuple(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"3.6.0+git1234"``."""
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run these kernels in this environment, or ``None`` when it can.

    Before triton 3.7 the interpreter converts loop bounds with ``int()`` of a one-element array, which
    numpy 2.4 turned into a ``TypeError`` (triton issue 9171): every kernel with a runtime loop fails.
    """
    import numpy

    if version_tuple(triton.__version__) < (3, 7) and version_tuple(numpy.__version__) >= (2, 4):
        return (f"TRITON_INTERPRET=1 needs triton >= 3.7 or numpy < 2.4 (triton {triton.__version__}'s "
                f"interpreter fails on numpy {numpy.__version__}, triton issue 9171): "
                "pip install 'triton>=3.7' or 'numpy<2.4'")
    return None


def cdiv(a, b):
    """``ceil(a / b)`` for ints or integer tensors and ``b > 0``, on the host.

    (``triton.cdiv`` and ``triton.next_power_of_2`` go through Triton's constexpr-function wrapper, about
    2 us a call, several times per launch.)"""
    return (a + b - 1) // b


def padded(n: int, minimum: int = 16) -> int:
    """The power of two at least ``n`` and ``minimum``: the constexpr size a masked dimension is padded to."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    Under the Triton interpreter ``tl.dot`` on bf16 operands returns garbage (triton issue 11584, seen
    with triton 3.6 and 3.9), so there, and only there, bf16 operands are upcast to fp32 first; loads,
    stores and casts stay bf16, so bf16 is still tested on a CPU. fp32 operands use IEEE fp32 products
    rather than tf32: a caller who passes fp32 asks for fp32 accuracy.
    """
    if INTERPRET and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def launch_dependents(ENABLED: tl.constexpr):
    """Let the stream's next launch, where it is a programmatic dependent one (``launch_pdl``), start its
    programs now, beside this kernel's, instead of at its end (Hopper's grid dependency control). Called first
    thing by every program; without a dependent launch next, nothing happens."""
    if ENABLED:
        gdc_launch_dependents()


@triton.jit
def wait_for_prior(ENABLED: tl.constexpr):
    """In a programmatic dependent launch: wait until the kernel before it on the stream has finished and its
    writes are visible. Called before the first load of anything that kernel wrote."""
    if ENABLED:
        gdc_wait()
