"""Inputs, timing and the correctness check of one candidate config.

Every candidate runs through the package's own serving path, ``ck.plan_cascade`` with one level, inside
``configs.pinned_config``: the plan picks the split count for the candidate's tile as it would in
serving, and ``plan.run`` only launches kernels, so the timing holds no host-side checks or allocation.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

import cascade_kernels as ck
from cascade_kernels import configs
from cascade_kernels.attention import TileConfig

from .space import Task

# Per-dtype (atol, rtol) of o and lse against the float64 reference: the same bounds as tests/conftest.py.
TOL = {
    torch.float32: dict(o=(1e-4, 1e-4), lse=(1e-4, 1e-4)),
    torch.float16: dict(o=(5e-3, 5e-3), lse=(2e-3, 2e-3)),
    torch.bfloat16: dict(o=(2e-2, 2e-2), lse=(1e-2, 1e-2)),
}


@dataclass
class Problem:
    """One batch: ``q [N, Hq, D]``, its positions, the segments and the paged cache they read."""

    task: Task
    q: torch.Tensor
    q_pos: torch.Tensor
    qo_indptr: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kv: ck.PagedKV
    use_graph: bool | None = None  # timing method of this batch, chosen on its first timing (gpu_timer)

    def plan(self):
        t = self.task
        plan = ck.plan_cascade([ck.CascadeLevel(self.qo_indptr, self.kv)], num_q_heads=t.group * t.num_kv_heads,
                               num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, page_size=t.page_size,
                               dtype=t.torch_dtype, num_pages=self.k_cache.shape[0], causal=True)
        if plan.launches[0].kind != t.family:  # the pinned config would not apply
            raise RuntimeError(f"a {t.family} task planned as {plan.launches[0].kind}")
        return plan

    def run(self, config: TileConfig):
        with configs.pinned_config(self.task.family, config):
            return self.plan().run(self.q, self.q_pos, self.k_cache, self.v_cache)


def make_problem(task: Task, q_lens, kv_lens, device, seed: int = 0) -> Problem:
    """Segments of ``q_lens`` queries over ``kv_lens`` keys, each query among the last of its segment's
    positions (a prompt with its cache), pages shuffled over the cache."""
    torch.manual_seed(seed)
    i32 = dict(dtype=torch.int32, device=device)
    pages = [max(1, math.ceil(n / task.page_size)) for n in kv_lens]
    num_pages = sum(pages) + 1
    order = torch.randperm(num_pages)[: sum(pages)]
    indptr = torch.tensor([0] + pages, dtype=torch.int64).cumsum(0)
    kv = ck.PagedKV(indptr=indptr.to(**i32), indices=order.to(**i32), lens=torch.tensor(kv_lens, **i32),
                    start_pos=torch.zeros(len(kv_lens), **i32))
    q_pos = [max(0, kv_len - n) + i for n, kv_len in zip(q_lens, kv_lens) for i in range(n)]
    qo = torch.tensor([0] + list(q_lens), dtype=torch.int64).cumsum(0)
    dt = task.torch_dtype
    k_cache = torch.randn((num_pages, task.page_size, task.num_kv_heads, task.head_dim), dtype=dt, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn((len(q_pos), task.group * task.num_kv_heads, task.head_dim), dtype=dt, device=device)
    return Problem(task, q, torch.tensor(q_pos, **i32), qo.to(**i32), k_cache, v_cache, kv)


@dataclass
class Batches:
    """The batches one task is timed on (``Task.batches``): a candidate's time is the geometric mean of its
    times on each, so that no single batch size (and the rounds of programs it happens to fill) decides."""

    problems: list

    def run(self, config: TileConfig):
        for p in self.problems:
            out = p.run(config)
        return out


def timed_problem(task: Task, device, batches: tuple | None = None) -> Problem | Batches:
    """The batches a task is timed on: for each of ``task.batches`` (or ``batches``), that many segments of
    ``task.q_len`` queries over ``task.kv_len`` keys (one :class:`Problem`, or :class:`Batches` of several)."""
    problems = [make_problem(task, [task.q_len] * b, [task.kv_len] * b, device, seed=1)
                for b in batches or task.batches]
    return problems[0] if len(problems) == 1 else Batches(problems)


class BatchTimes(float):
    """The geometric mean of a candidate's milliseconds over the batches of :class:`Batches` (what the search
    ranks by), carrying the time on each batch in ``per_batch`` (what the files record, so that a bucket
    whose winner suits one batch and not another can be seen)."""

    per_batch: tuple

    def __new__(cls, times):
        times = tuple(float(t) for t in times)
        self = super().__new__(cls, math.exp(sum(math.log(t) for t in times) / len(times)))
        self.per_batch = times
        return self


def _geomean(timer, problem, config) -> BatchTimes:
    """``timer`` on each batch of ``problem``: the geometric mean of the milliseconds, with each batch's."""
    return BatchTimes(timer(p, config) for p in problem.problems)


def check_problem(task: Task, device) -> Problem:
    """A small batch at odd sizes (a partial last page, a one-token segment, one without keys) for the check."""
    if task.family == "decode":
        return make_problem(task, [1, 1, 1, 1], [45, 1, 100, 0], device, seed=2)
    return make_problem(task, [17, 37, 1, 5], [47, 37, 100, 0], device, seed=2)


# Below this median (ms) a launch is dominated by launch overhead: the batch is timed as CUDA-graph replays
# (as benchmarks/timing.py does).
GRAPH_BELOW_MS = 0.02


def gpu_timer(problem: Problem, config: TileConfig) -> float:
    """Median milliseconds of ``plan.run`` with ``config``: ``triton.testing.do_bench`` (L2 flushed, CUDA
    events), or ``do_bench_cudagraph`` for every candidate of a batch whose first timing is under
    ``GRAPH_BELOW_MS`` and that can be captured; over :class:`Batches`, the geometric mean."""
    from triton.testing import do_bench, do_bench_cudagraph

    if isinstance(problem, Batches):
        return _geomean(gpu_timer, problem, config)

    with configs.pinned_config(problem.task.family, config):
        plan = problem.plan()
    run = lambda: plan.run(problem.q, problem.q_pos, problem.k_cache, problem.v_cache)  # noqa: E731
    run()  # compiles; a config that cannot compile or launch raises here
    torch.cuda.synchronize()
    if problem.use_graph:
        return float(do_bench_cudagraph(run, rep=20, return_mode="median"))
    ms = float(do_bench(run, warmup=10, rep=40, return_mode="median"))
    if problem.use_graph is None:  # the batch's first timing (the heuristic's) picks the method for all
        problem.use_graph = False
        if ms < GRAPH_BELOW_MS:
            try:
                ms = float(do_bench_cudagraph(run, rep=20, return_mode="median"))
                problem.use_graph = True
            except Exception:  # not capturable: events for every candidate of this batch
                torch.cuda.synchronize()
    return ms


def wall_timer(problem: Problem, config: TileConfig) -> float:
    """Median wall-clock milliseconds of three runs after one warm-up (the --dry-run timer, on the CPU);
    over :class:`Batches`, the geometric mean."""
    if isinstance(problem, Batches):
        return _geomean(wall_timer, problem, config)
    problem.run(config)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        problem.run(config)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare(actual, expected, dtype, what) -> str | None:
    """``None`` if ``actual`` is within the dtype's bounds of ``expected`` (same infinities, no NaN), else why not."""
    atol, rtol = TOL[dtype][what]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if torch.isnan(a).any():
        return f"{what}: {int(torch.isnan(a).sum())} NaN"
    inf = torch.isinf(a) | torch.isinf(e)
    if not torch.equal(a[inf], e[inf]):
        return f"{what}: infinities differ"
    err = (a - e).abs()[~inf]
    bound = atol + rtol * e.abs()[~inf]
    if (err > bound).any():
        return f"{what}: max abs error {err.max().item():.3e} over (atol={atol:g}, rtol={rtol:g})"
    return None


def check_config(task: Task, config: TileConfig, device) -> str | None:
    """Run ``config`` on :func:`check_problem` against ``reference.paged_prefill`` (float64, on the CPU).

    Returns ``None`` when it matches, else what differs."""
    import reference

    p = check_problem(task, device)
    o, lse = p.run(config)
    cpu = lambda t: t.to("cpu")  # noqa: E731
    kv = ck.PagedKV(*(cpu(t) for t in (p.kv.indptr, p.kv.indices, p.kv.lens, p.kv.start_pos)))
    ref_o, ref_lse = reference.paged_prefill(cpu(p.q), cpu(p.q_pos), cpu(p.qo_indptr), cpu(p.k_cache),
                                             cpu(p.v_cache), kv, causal=True)
    return compare(o, ref_o, task.torch_dtype, "o") or compare(lse, ref_lse, task.torch_dtype, "lse")
