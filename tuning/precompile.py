"""Compiling the candidates of a tuning run in parallel worker processes before any is timed.

Compiling a config (Triton to PTX to a cubin) takes about 3 s on one CPU core of an H200 host, and the
default space has about 300 of them: most of a serial run. Each worker process builds the batches the
tasks are timed on and runs each of its (task, config) pairs once, which compiles the kernels into
Triton's on-disk cache; the timing process then loads every kernel from there in milliseconds. The
workers see the same GPU, environment and batches as the timing process, so the cache keys match.

The pairs run in phases: first the first task of each shape class (every config compiled once, no two
workers on the same kernel), then the second, and so on; a later task of a class compiles only the
variants its batch adds (say, fp32 split outputs where the first task needed no split).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool

from cascade_kernels.attention import TileConfig

from .search import describe_error
from .space import Task


def default_jobs() -> int:
    """Worker processes: the CPU cores but two (the timing process and ptxas), at most 14."""
    return max(1, min(14, (os.cpu_count() or 1) - 2))


# One batch per worker process, kept while consecutive pairs share its task.
_problem: tuple = (None, None)


def _compile(pairs: list[tuple[Task, TileConfig]], device: str) -> dict[tuple[Task, TileConfig], str]:
    """Worker: run each pair once on its task's timed batch; returns the errors by pair."""
    global _problem
    import torch

    from . import measure

    errors = {}
    for task, config in pairs:
        try:
            if _problem[0] != task:
                _problem = (None, None)  # free the last batch before building the next
                # the first batch only: many workers each holding every batch of a long-context decode
                # bucket would not fit one GPU; variants only another batch needs compile when timed
                _problem = (task, measure.timed_problem(task, torch.device(device), task.batches[:1]))
            _problem[1].run(config)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:
            errors[(task, config)] = describe_error(e)
    return errors


def phases(work: list[tuple[Task, list[TileConfig]]]) -> list[list[tuple[Task, TileConfig]]]:
    """Phase ``k`` holds the pairs of the ``k``-th task of every shape class, sorted by task."""
    seen: dict = {}
    out: list[list] = []
    for task, configs in work:
        k = seen.get(task.shape_class, 0)
        seen[task.shape_class] = k + 1
        if k == len(out):
            out.append([])
        out[k].extend((task, c) for c in configs)
    return out


class Precompiler:
    """``Precompiler(jobs)(work, deadline)`` compiles every (task, config) pair of ``work`` (a list of
    ``(task, configs)``) in ``jobs`` spawned processes; returns ``(seconds, errors)``. A broken pool (a
    worker that crashed) ends the precompilation: the timing process compiles the rest itself."""

    def __init__(self, jobs: int, device: str = "cuda", clock=time.monotonic):
        self.jobs = jobs
        self.device = device
        self.clock = clock

    def __call__(self, work, deadline: float) -> tuple[float, dict]:
        t0 = self.clock()
        errors: dict = {}
        ctx = multiprocessing.get_context("spawn")  # a CUDA context does not survive fork
        pool = concurrent.futures.ProcessPoolExecutor(self.jobs, mp_context=ctx)
        try:
            for pairs in phases(work):
                chunks = [pairs[i::self.jobs] for i in range(self.jobs)]
                futures = [pool.submit(_compile, chunk, self.device) for chunk in chunks if chunk]
                left = deadline - self.clock()
                for f in concurrent.futures.as_completed(futures, timeout=None if left > 1e6 else max(1.0, left)):
                    errors.update(f.result())
        except (BrokenProcessPool, concurrent.futures.TimeoutError) as e:
            errors[None] = f"stopped: {type(e).__name__}: {str(e) or 'the time budget ran out'}"
            for process in list(getattr(pool, "_processes", {}).values()):  # no worker may outlive it
                process.terminate()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return self.clock() - t0, errors
