"""The suites, in the order a full run takes them. Each module's interface is described in ``runner``.

Cascade runs before prefill: it is the project's point, and prefill's torch.compile of FlexAttention
is the part of a run most likely to eat the time budget.
"""

from __future__ import annotations

import importlib

SUITE_NAMES = ("merge", "decode", "cascade", "prefill", "tuned")


def load(name: str):
    """The suite module ``benchmarks.suites.<name>``."""
    if name not in SUITE_NAMES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITE_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")
