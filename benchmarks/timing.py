"""Timing: device medians through ``triton.testing``, host planning by wall clock, and a wall clock for --quick.

Every measurement is taken twice; both medians and their spread are reported, because a difference
between two implementations smaller than the spread of one of them is noise.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

# Below this median a launch is dominated by launch overhead: re-time it as CUDA-graph replays.
GRAPH_BELOW_US = 20.0


@dataclass
class Timing:
    """Two medians of one implementation on one case, in milliseconds, and how they were taken:
    ``events`` (do_bench, L2 flushed before each call), ``graph`` (do_bench_cudagraph) or ``wall``."""

    ms: tuple[float, float]
    method: str
    note: str = ""

    @property
    def best_ms(self) -> float:
        """The lower of the two medians: noise adds time far more often than it removes it."""
        return min(self.ms)

    @property
    def spread(self) -> float:
        """``|a - b| / min(a, b)`` of the two medians."""
        lo = min(self.ms)
        return abs(self.ms[0] - self.ms[1]) / lo if lo > 0 else float("inf")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn) -> float:
    """One call of ``fn`` by wall clock, device synchronised before and after (milliseconds)."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - t0) * 1e3


def measure(fn, *, quick: bool) -> Timing:
    """Time ``fn`` (already warmed up and checked) twice.

    On a GPU: ``do_bench`` medians (it flushes L2 before every call and times with events); a launch
    whose median is under ``GRAPH_BELOW_US`` is re-timed with ``do_bench_cudagraph`` replays, falling
    back to events if it cannot be captured. With ``quick`` or without CUDA: one wall-clock call each.
    """
    if quick or not torch.cuda.is_available():
        return Timing((wall_ms(fn), wall_ms(fn)), "wall")
    from triton.testing import do_bench, do_bench_cudagraph

    first = do_bench(fn, return_mode="median")
    if first * 1e3 < GRAPH_BELOW_US:
        try:
            return Timing((do_bench_cudagraph(fn, return_mode="median"),
                           do_bench_cudagraph(fn, return_mode="median")), "graph")
        except Exception as e:  # not capturable (host sync, allocation policy): keep event timing
            _sync()
            note = f"graph capture failed ({type(e).__name__}); events"
            return Timing((first, do_bench(fn, return_mode="median")), "events", note)
    return Timing((first, do_bench(fn, return_mode="median")), "events")


def plan_ms(plan, repeats: int = 3) -> float:
    """Median wall-clock milliseconds of ``plan()`` (host-side planning), synchronised around each call."""
    return statistics.median(wall_ms(plan) for _ in range(repeats))
