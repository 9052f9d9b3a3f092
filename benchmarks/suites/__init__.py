"""The suites, in the order a full run takes them. Each module's interface is described in ``runner``."""

from __future__ import annotations

import importlib

SUITE_NAMES = ("merge", "decode", "prefill", "cascade", "tuned")


def load(name: str):
    """The suite module ``benchmarks.suites.<name>``."""
    if name not in SUITE_NAMES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITE_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")
