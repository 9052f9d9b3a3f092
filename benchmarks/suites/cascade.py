"""Cascade suite: ``B`` requests, one decode token each, over a shared prefix of ``P`` tokens and their
own suffix of ``S`` tokens (page 16).

Pages are shuffled (``layout.PagePool``); the ``_run`` cases hold the prefix in consecutive pages instead,
as an engine allocates a chunk it prefills at once, which our plan reads as block copies.

The byte lower bound reads the prefix once and each request's own KV once: ``(P + B * S)`` tokens of
keys and values, held against the read ceiling. Our flat path (``ck.paged_decode`` over prefix + suffix
pages per request, the prefix pages shared in the page table, so L2 helps it) is the honest baseline;
the crossover cases sweep ``P`` at ``B = 128``, ``S = 1024`` to find where the cascade starts to pay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import PagePool, Segments, Shape, make_cache, pages_for
from ..peers import flashinfer_peers, torch_peers
from ..runner import Case, Impl, Unavailable, Work

NAME = "cascade"
REQUIRES = ("plan_cascade",)
METRIC = "bytes"
PAGE = 16
CROSSOVER_PREFIXES = [128 << i for i in range(9)]  # 128 .. 32768
FOOTNOTE = ("Here TB/s is the byte lower bound (prefix once + each request's own KV) over the time, so "
            "'of ceiling' is that bound at the read ceiling over the time; floor also counts FLOPs.")


def _case(prefix: int, suffix: int, batch: int, crossover: bool = False, run: bool = False) -> Case:
    name = f"{'x_' if crossover else ''}p{prefix}_s{suffix}_b{batch}{'_run' if run else ''}"
    return Case(name, {"prefix": prefix, "suffix": suffix, "batch": batch, "crossover": crossover, "run": run})


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case(32, 20, 3), _case(16, 20, 3, True), _case(48, 20, 3, True), _case(64, 20, 3, run=True)]
    headline = [_case(32768, s, b) for b in (64, 256) for s in (256, 1024)]
    # the same with the prefix in consecutive pages, as an engine allocates a chunk it prefills at once
    runs = [_case(32768, 1024, b, run=True) for b in (64, 256)]
    return headline + runs + [_case(p, 1024, 128, True) for p in CROSSOVER_PREFIXES]


def check_cases(quick: bool) -> list[Case]:
    return [_case(64, 37, 4)]  # a suffix of 2 full pages and a partial one


@dataclass
class CascadeData:
    """``q [B, Hq, D]`` at positions ``P + S - 1``; ``prefix`` (1 segment), ``suffix`` (B segments at
    positions ``P ..``) and ``flat`` (B segments: the prefix pages, shared, then the request's own;
    None when ``P`` does not fill whole pages); ``levels`` for our plan."""

    q: torch.Tensor
    q_pos: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    prefix: Segments
    suffix: Segments
    flat: Segments | None
    levels: list
    shape: Shape

    @property
    def device(self):
        return self.q.device


def _levels(prefix: Segments, suffix: Segments, batch: int, device) -> list:
    import cascade_kernels as ck

    i32 = dict(dtype=torch.int32, device=device)
    return [ck.CascadeLevel(torch.tensor([0, batch], **i32), prefix.paged_kv(device)),
            ck.CascadeLevel(torch.arange(batch + 1, **i32), suffix.paged_kv(device))]


def build(case: Case, ctx) -> CascadeData:
    p, s, b = case.params["prefix"], case.params["suffix"], case.params["batch"]
    torch.manual_seed(4)
    pool = PagePool(pages_for(p, PAGE) + b * pages_for(s, PAGE), seed=4)
    prefix = Segments.allocate(pool, [p], [0], PAGE)
    suffix = Segments.allocate(pool, [s] * b, [p] * b, PAGE)
    if case.params.get("run"):  # the prefix in pages 0, 1, 2, ...; the suffixes keep their shuffled pages
        # relabel the pool's page ids (a bijection): the prefix's become 0 .. n-1 in its order, the
        # suffixes' n .. in their (shuffled) order
        n, total = prefix.indices.numel(), pool.perm.numel()
        relabel = torch.empty(total, dtype=torch.int64)
        relabel[prefix.indices] = torch.arange(n)
        relabel[torch.sort(suffix.indices).values] = torch.arange(n, total)
        prefix = Segments(prefix.indptr, relabel[prefix.indices], prefix.lens, prefix.start_pos, PAGE)
        suffix = Segments(suffix.indptr, relabel[suffix.indices], suffix.lens, suffix.start_pos, PAGE)
    flat = None
    if p % PAGE == 0:
        flat = Segments.from_pages([torch.cat([prefix.pages(0), suffix.pages(i)]) for i in range(b)],
                                   [p + s] * b, [0] * b, PAGE)
    k_cache, v_cache = make_cache(pool.perm.numel(), PAGE, ctx.shape, ctx.device)
    shape = ctx.shape
    q = torch.randn((b, shape.num_q_heads, shape.head_dim), dtype=shape.dtype, device=ctx.device)
    q_pos = torch.full((b,), p + s - 1, dtype=torch.int32, device=ctx.device)
    return CascadeData(q, q_pos, k_cache, v_cache, prefix, suffix, flat,
                       _levels(prefix, suffix, b, ctx.device), shape)


def reference(data: CascadeData):
    """float64 reference: one softmax over every level's keys, no merge."""
    import reference as ref

    levels = _levels(data.prefix, data.suffix, data.q.shape[0], "cpu")
    return ref.cascade_attention(data.q.cpu(), data.q_pos.cpu(), data.k_cache.cpu(), data.v_cache.cpu(), levels)


def work(case: Case, shape) -> Work:
    """The byte lower bound: prefix once plus each request's own KV once."""
    p, s, b = case.params["prefix"], case.params["suffix"], case.params["batch"]
    return Work(bytes=(p + b * s) * shape.kv_token_bytes,
                flops=4 * shape.head_dim * shape.num_q_heads * b * (p + s))


def ours(data: CascadeData) -> Impl:
    """``ck.plan_cascade(levels, ...)`` once (timed as plan), then ``plan.run`` (timed as the kernel)."""
    import cascade_kernels as ck

    if not hasattr(ck, "plan_cascade"):
        raise Unavailable("no ck.plan_cascade")
    s = data.shape
    held = {}

    def plan():
        held["plan"] = ck.plan_cascade(data.levels, num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads,
                                       head_dim=s.head_dim, page_size=PAGE, dtype=s.dtype, causal=True)

    plan()
    return Impl(run=lambda: held["plan"].run(data.q, data.q_pos, data.k_cache, data.v_cache), plan=plan)


def ours_flat(data: CascadeData) -> Impl:
    """``ck.paged_decode`` over prefix + suffix pages per request (prefix pages shared in the table)."""
    import cascade_kernels as ck

    if not hasattr(ck, "paged_decode"):
        raise Unavailable("no ck.paged_decode")
    if data.flat is None:
        raise Unavailable("prefix does not fill whole pages")
    kv = data.flat.paged_kv(data.device)
    return Impl(run=lambda: ck.paged_decode(data.q, data.q_pos, data.k_cache, data.v_cache, kv, causal=True),
                note="flat decode, shared prefix pages")


def impls(ctx) -> list:
    return [
        ("ours", ours),
        ("ours-flat", ours_flat),
        ("torch-cascade", torch_peers.torch_cascade),
        ("fi-cascade-wrapper", flashinfer_peers.cascade_wrapper),
        ("fi-cascade-hand", flashinfer_peers.cascade_by_hand),
    ]
