"""Hypothesis strategies that draw whole attention problems, every tensor on ``conftest.DEVICE``.

Each problem strategy draws the shapes and layout with hypothesis (so failures shrink to small cases) and
one seed from which every tensor value is generated, so an example is reproducible from its draws alone.

What every problem guarantees:

* Values are random normal in the problem's dtype (never all zeros, so an unwritten output shows).
* Page ids are a random permutation of the cache's pages, with spare pages that nothing uses, and a
  segment may hold one page more than its ``lens`` needs.
* Every cache slot that no segment uses (spare pages, slots past ``lens`` in a segment's last page, extra
  pages) is NaN, in both caches: a kernel that reads keys or values outside its segments without masking
  them out returns NaN, which ``conftest.assert_close`` rejects.
* The cache is laid out as one of ``LAYOUTS``: a contiguous NHD tensor, an HND tensor passed as
  ``.transpose(1, 2)``, or one half of a fused ``[num_pages, 2, ...]`` cache (NHD or HND inside).
* ``options`` is a dict of keyword arguments valid under the contract (``window_left`` only with
  ``causal=True``; ``sinks`` fp32 ``[num_q_heads]``), to pass as ``**p.options`` to the kernel and to the
  reference alike.

Sizes stay small on the CPU (the Triton interpreter) and widen under the "gpu" hypothesis profile
(``conftest.LARGE``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

import cascade_kernels as ck
from conftest import DEVICE, LARGE

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT32_MAX = 2**31 - 1

# Head dims include non powers of two (40, 80, 96); 128 and friends only where kernels run compiled.
HEAD_DIMS = (16, 32, 64, 128, 40, 80, 96) if LARGE else (16, 32, 64, 40)
MAX_Q = 96 if LARGE else 12  # query tokens per segment
MAX_KV = 700 if LARGE else 80  # keys per segment
MAX_KV_HEADS = 4 if LARGE else 2
GQA_GROUPS = (1, 2, 3, 4, 5, 8) if LARGE else (1, 2, 3)
LAYOUTS = ("nhd", "hnd", "fused_nhd", "fused_hnd")


# ---------------------------------------------------------------------------------------------------------
# Small building blocks


def _resolve(draw, x):
    """``x`` itself, or a value drawn from it when it is a strategy."""
    return draw(x) if isinstance(x, SearchStrategy) else x


def _i32(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32, device=DEVICE)


def _randn(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    """Normal values rounded to ``dtype``, on DEVICE."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)


def _generator(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


def page_sizes(max_size: int = 64) -> SearchStrategy[int]:
    """Page sizes 1..max_size, with 1, small odd sizes and 16 drawn often."""
    common = [p for p in (1, 2, 3, 16, 17, 5) if p <= max_size]
    return st.one_of(st.sampled_from(common), st.integers(1, max_size))


def lengths(max_len: int, page_size: int, min_len: int = 0) -> SearchStrategy[int]:
    """A segment length in ``[min_len, max_len]``: 0, 1, exact page multiples (and one off them) often."""
    special = {0, 1, max_len}
    for pages in (1, 2, 3, max_len // page_size):
        for off in (-1, 0, 1):
            special.add(pages * page_size + off)
    special = sorted(x for x in special if min_len <= x <= max_len)
    return st.one_of(st.sampled_from(special), st.integers(min_len, max_len))


def start_positions(headroom: int) -> SearchStrategy[int]:
    """A global start position >= 0: 0, small, large, or near the int32 limit (keeping ``headroom`` free)."""
    return st.one_of(
        st.just(0),
        st.integers(0, 100),
        st.integers(0, 10**6),
        st.integers(2**30, INT32_MAX - headroom),
    )


@st.composite
def head_counts(draw) -> tuple[int, int]:
    """``(num_q_heads, num_kv_heads)``: MHA, GQA with groups like 3, and MQA (one KV head)."""
    num_kv_heads = draw(st.integers(1, MAX_KV_HEADS))
    return num_kv_heads * draw(st.sampled_from(GQA_GROUPS)), num_kv_heads


@st.composite
def attention_options(draw, num_q_heads: int, max_window: int, causal=None) -> dict:
    """Keyword options valid under the contract: causal, sm_scale, window_left (causal only), softcap, sinks."""
    causal = draw(st.booleans()) if causal is None else causal
    window_left = None
    if causal:
        window_left = draw(st.one_of(st.none(), st.just(0), st.integers(0, 8), st.integers(0, max_window)))
    softcap = draw(st.one_of(st.none(), st.sampled_from([1.0, 5.0, 30.0]), st.floats(0.5, 50.0)))
    sm_scale = draw(st.one_of(st.none(), st.floats(0.02, 0.5)))
    sinks = None
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(-5.0, 8.0), min_size=num_q_heads, max_size=num_q_heads))
        sinks = torch.tensor(values, dtype=torch.float32, device=DEVICE)
    return dict(causal=causal, sm_scale=sm_scale, window_left=window_left, softcap=softcap, sinks=sinks)


def _split(draw, begin: int, end: int) -> list[tuple[int, int]]:
    """A random split of ``[begin, end)`` into contiguous non-empty ranges."""
    cuts = [i for i in range(begin + 1, end) if draw(st.booleans())]
    bounds = [begin, *cuts, end]
    return list(zip(bounds[:-1], bounds[1:]))


def _query_positions(draw, n: int, first: int, end: int, mode: str) -> list[int]:
    """``n`` query positions for a sequence whose keys sit at positions ``[first, end)``.

    mode "tail": the last ``n`` positions (a prefill whose own keys are already cached), shifted past the
    end when ``n`` exceeds the keys; "after": past the end, after a gap; "inside": anywhere in the keys'
    range (queries that see only part of it); "before": ahead of every key (nothing visible under causal);
    "random": around the range, unsorted. "inside", "before" and "random" may come out unsorted.
    """
    if n == 0:
        return []
    if mode == "before" and first == 0:
        mode = "tail"
    if mode == "inside" and end <= first:
        mode = "tail"
    if mode == "tail":
        base = max(0, end - n)
        return list(range(base, base + n))
    if mode == "after":
        base = end + draw(st.integers(0, 20))
        return list(range(base, base + n))
    lo, hi = {
        "inside": (first, end - 1),
        "before": (max(0, first - 3 * n - 10), first - 1),
        "random": (max(0, first - 8), end + 8),
    }[mode]
    pos = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    return sorted(pos) if draw(st.booleans()) else pos


QUERY_MODES = ("tail", "after", "inside", "before", "random")


class _CacheBuilder:
    """Collects segments of keys and values, then lays them into a shuffled, poisoned paged cache."""

    def __init__(self, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.page_size, self.num_kv_heads, self.head_dim, self.dtype = page_size, num_kv_heads, head_dim, dtype
        self.segments: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (k, v, num_pages)

    def add(self, k: torch.Tensor, v: torch.Tensor, extra_pages: int = 0) -> int:
        """Queue one segment (``k``, ``v`` ``[len, Hkv, D]``); return a handle for :meth:`build`'s pages."""
        self.segments.append((k, v, math.ceil(k.shape[0] / self.page_size) + extra_pages))
        return len(self.segments) - 1

    def build(self, gen: torch.Generator, layout: str, spare_pages: int, runs: tuple[int, ...] = ()):
        """Return ``(k_cache, v_cache, pages)``, ``pages[handle]`` the page ids of each queued segment.

        Segments whose handles are in ``runs`` get consecutive page ids (placed after the spare pages,
        so a run never starts at page 0); the others pages in a random order."""
        used = sum(n for _, _, n in self.segments)
        num_pages = used + spare_pages
        in_runs = sum(self.segments[h][2] for h in runs)
        run_ids = iter(range(spare_pages, spare_pages + in_runs))
        rest = [i for i in range(num_pages) if not spare_pages <= i < spare_pages + in_runs]
        perm = iter([rest[i] for i in torch.randperm(len(rest), generator=gen).tolist()])
        shape = (num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        k_all = torch.full(shape, math.nan, dtype=torch.float32)
        v_all = torch.full(shape, math.nan, dtype=torch.float32)
        pages = []
        for handle, (k, v, n) in enumerate(self.segments):
            source = run_ids if handle in runs else perm
            ids = [next(source) for _ in range(n)]
            pages.append(ids)
            tokens = torch.arange(k.shape[0])
            page_of = torch.tensor(ids, dtype=torch.long)[tokens // self.page_size] if ids else tokens
            k_all[page_of, tokens % self.page_size] = k.float().cpu()
            v_all[page_of, tokens % self.page_size] = v.float().cpu()
        k_cache, v_cache = _lay_out(k_all, v_all, layout, self.dtype)
        return k_cache, v_cache, pages


def _lay_out(k: torch.Tensor, v: torch.Tensor, layout: str, dtype: torch.dtype):
    """Store logical NHD caches ``[P, page_size, Hkv, D]`` in ``layout``; return NHD-shaped views on DEVICE."""
    if layout == "nhd":
        return k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)
    if layout == "hnd":  # the storage is [P, Hkv, page_size, D]
        k_hnd = k.transpose(1, 2).contiguous().to(dtype).to(DEVICE)
        v_hnd = v.transpose(1, 2).contiguous().to(dtype).to(DEVICE)
        return k_hnd.transpose(1, 2), v_hnd.transpose(1, 2)
    if layout == "fused_nhd":  # [P, 2, page_size, Hkv, D]
        fused = torch.stack([k, v], dim=1).to(dtype).to(DEVICE)
        return fused[:, 0], fused[:, 1]
    if layout == "fused_hnd":  # [P, 2, Hkv, page_size, D]
        fused = torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=1).contiguous().to(dtype).to(DEVICE)
        return fused[:, 0].transpose(1, 2), fused[:, 1].transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}")


def _paged_kv(pages: list[list[int]], lens: list[int], start_pos: list[int]) -> ck.PagedKV:
    indptr = [0]
    for ids in pages:
        indptr.append(indptr[-1] + len(ids))
    return ck.PagedKV(
        indptr=_i32(indptr), indices=_i32(i for ids in pages for i in ids), lens=_i32(lens), start_pos=_i32(start_pos)
    )


def _describe_options(options: dict) -> str:
    o = dict(options)
    if o.get("sinks") is not None:
        o["sinks"] = [round(x, 3) for x in o["sinks"].tolist()]
    return ", ".join(f"{k}={v}" for k, v in o.items())


@dataclass
class _Common:
    """Fields every problem has."""

    q: torch.Tensor  # [num_tokens, num_q_heads, head_dim], dtype
    q_pos: torch.Tensor  # [num_tokens] int32
    k_cache: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_dim], dtype, layout-dependent strides
    v_cache: torch.Tensor  # like k_cache
    options: dict  # causal, sm_scale, window_left, softcap, sinks
    dtype: torch.dtype
    page_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    layout: str

    def _head(self) -> str:
        return (
            f"{str(self.dtype).replace('torch.', '')}, page_size={self.page_size}, heads={self.num_q_heads}/"
            f"{self.num_kv_heads}, head_dim={self.head_dim}, layout={self.layout}, "
            f"num_pages={self.k_cache.shape[0]}, tokens={self.q.shape[0]}, q_pos={self.q_pos.tolist()}, "
            f"options: {_describe_options(self.options)}"
        )


# ---------------------------------------------------------------------------------------------------------
# Paged prefill and decode


@dataclass(repr=False)
class PagedProblem(_Common):
    """One paged prefill (or decode) call: query segment ``s`` reads KV segment ``s`` of ``kv``."""

    qo_indptr: torch.Tensor = None  # [S + 1] int32
    kv: ck.PagedKV = None
    segment_kv: list = field(default_factory=list)  # per segment (k, v [len, Hkv, D] dtype, kv_pos [len] int64)

    @property
    def args(self):
        """Positional arguments of ``paged_prefill``: ``(q, q_pos, qo_indptr, k_cache, v_cache, kv)``."""
        return self.q, self.q_pos, self.qo_indptr, self.k_cache, self.v_cache, self.kv

    @property
    def decode_args(self):
        """Positional arguments of ``paged_decode``: ``(q, q_pos, k_cache, v_cache, kv)``."""
        return self.q, self.q_pos, self.k_cache, self.v_cache, self.kv

    def __repr__(self) -> str:
        return (
            f"PagedProblem({self._head()}, qo_indptr={self.qo_indptr.tolist()}, kv.lens={self.kv.lens.tolist()}, "
            f"kv.start_pos={self.kv.start_pos.tolist()}, kv.indptr={self.kv.indptr.tolist()})"
        )


@st.composite
def paged_problem(
    draw,
    max_segments: int = 4,
    max_q: int | None = None,
    max_kv: int | None = None,
    dtypes=FLOAT_DTYPES,
    one_query_per_segment: bool = False,
    head_dims=None,
    layouts=LAYOUTS,
    min_segments: int = 1,
    causal=None,
    page_size_choices=None,
) -> PagedProblem:
    """A paged prefill problem: ``S`` independent segments (requests), each at its own start position.

    Per segment: KV length in ``[0, max_kv]`` (0, 1 and page multiples often), query length in
    ``[0, max_q]`` (exactly 1 with ``one_query_per_segment``), a start position anywhere in int32
    (so positions have gaps between segments), and query positions at the tail of the keys, after
    them, inside them, before them, or scattered (see ``QUERY_MODES``). ``causal`` fixes that option when
    given; ``page_size_choices`` replaces the page-size strategy. Returns a :class:`PagedProblem`:
    ``q, q_pos, qo_indptr, k_cache, v_cache, kv, options``,
    plus ``args`` / ``decode_args`` for the kernel calls, ``segment_kv`` (the dense keys, values and
    positions written into each segment) and the sizes ``dtype, page_size, num_q_heads, num_kv_heads,
    head_dim, layout``.
    """
    max_q = MAX_Q if max_q is None else max_q
    max_kv = MAX_KV if max_kv is None else max_kv
    dtype = draw(st.sampled_from(dtypes))
    page_size = draw(st.sampled_from(page_size_choices) if page_size_choices else page_sizes())
    head_dim = draw(st.sampled_from(head_dims or HEAD_DIMS))
    num_q_heads, num_kv_heads = draw(head_counts())
    layout = draw(st.sampled_from(layouts))
    num_segments = draw(st.integers(min_segments, max_segments))
    gen = _generator(draw)

    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, dtype)
    kv_lens, starts, q_pos, qo_indptr, segment_kv = [], [], [], [0], []
    headroom = 2 * (max_kv + max_q) + 4096
    for _ in range(num_segments):
        n_kv = draw(lengths(max_kv, page_size))
        n_q = 1 if one_query_per_segment else draw(st.integers(0, max_q))
        start = draw(start_positions(headroom))
        mode = draw(st.sampled_from(QUERY_MODES))
        k = _randn(gen, (n_kv, num_kv_heads, head_dim), dtype)
        v = _randn(gen, (n_kv, num_kv_heads, head_dim), dtype)
        builder.add(k, v, extra_pages=int(draw(st.booleans()) and draw(st.booleans())))
        kv_lens.append(n_kv)
        starts.append(start)
        q_pos += _query_positions(draw, n_q, start, start + n_kv, mode)
        qo_indptr.append(qo_indptr[-1] + n_q)
        segment_kv.append((k, v, torch.arange(start, start + n_kv, device=DEVICE)))
    k_cache, v_cache, pages = builder.build(gen, layout, spare_pages=draw(st.integers(0, 3)))

    return PagedProblem(
        q=_randn(gen, (qo_indptr[-1], num_q_heads, head_dim), dtype),
        q_pos=_i32(q_pos),
        k_cache=k_cache,
        v_cache=v_cache,
        options=draw(attention_options(num_q_heads, max_kv + max_q, causal=causal)),
        dtype=dtype,
        page_size=page_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        layout=layout,
        qo_indptr=_i32(qo_indptr),
        kv=_paged_kv(pages, kv_lens, starts),
        segment_kv=segment_kv,
    )


def decode_problem(max_segments: int = 6, max_kv: int | None = None, **kwargs) -> SearchStrategy[PagedProblem]:
    """A paged decode problem: :func:`paged_problem` with exactly one query token per segment.

    ``q`` is ``[S, Hq, D]``, ``qo_indptr`` is ``0..S``; call ``ck.paged_decode(*p.decode_args, **p.options)``.
    """
    return paged_problem(max_segments=max_segments, max_kv=max_kv, one_query_per_segment=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Cascades


@dataclass(repr=False)
class CascadeProblem(_Common):
    """A batch of requests whose KV is split into levels, plus the same KV as one segment per request."""

    levels: list = field(default_factory=list)  # [CascadeLevel], level 0 first
    qo_indptr: torch.Tensor = None  # [R + 1] int32: request r's query tokens are q[qo_indptr[r]:qo_indptr[r+1]]
    flat_kv: ck.PagedKV | None = None  # R segments, request r's whole KV in its own pages; None with gaps
    request_kv: list = field(default_factory=list)  # per request (k, v [len, Hkv, D] dtype, kv_pos [len] int64)
    groups: list = field(default_factory=list)  # per level, the [begin, end) request range of each segment

    @property
    def flat_level(self) -> ck.CascadeLevel | None:
        """``flat_kv`` as a single cascade level (None when positions have gaps)."""
        return None if self.flat_kv is None else ck.CascadeLevel(self.qo_indptr, self.flat_kv)

    def __repr__(self) -> str:
        lv = "; ".join(
            f"L{i}: groups={g} lens={lvl.kv.lens.tolist()} start_pos={lvl.kv.start_pos.tolist()}"
            for i, (g, lvl) in enumerate(zip(self.groups, self.levels))
        )
        return f"CascadeProblem({self._head()}, qo_indptr={self.qo_indptr.tolist()}, levels: {lv})"


@st.composite
def cascade_problem(
    draw,
    max_requests: int = 4,
    min_levels: int = 2,
    max_levels: int = 4,
    max_q: int | None = None,
    max_kv: int | None = None,
    dtypes=FLOAT_DTYPES,
    head_dims=None,
    layouts=LAYOUTS,
    one_query_per_request=None,
    allow_gaps: bool = False,
    causal=None,
) -> CascadeProblem:
    """A batch of ``R`` requests whose KV is split into ``L`` levels, as a cascade engine stores it.

    The levels form a tree over the requests: level 0 is one segment shared by every request (sometimes
    split into groups), each further level refines the groups of the one before, and the last level is one
    segment per request (its own tokens). Each (level, group) chunk has its own length (0 included; one
    level is sometimes empty throughout) and its own pages; request ``r``'s KV is the concatenation of
    its groups' chunks, at consecutive global positions from the group's start position. With
    ``allow_gaps`` positions may jump between levels, and then ``flat_kv`` is None.

    Query tokens per request: ``[0, max_q]`` or exactly one (``one_query_per_request``, drawn when None), at
    the tail of the request's KV, after it, or inside it (overlapping the shared chunks). Each query token
    belongs to exactly one segment of each level. Returns a :class:`CascadeProblem`: ``q, q_pos, k_cache,
    v_cache, levels, options``; ``qo_indptr`` ``[R + 1]`` and ``flat_kv`` (one segment per request holding
    its whole KV, in pages of its own) for the chunked-equals-standard check; ``request_kv`` (dense
    keys, values, positions per request); ``groups`` per level.
    """
    max_q = (24 if LARGE else 6) if max_q is None else max_q
    max_kv = MAX_KV if max_kv is None else max_kv
    dtype = draw(st.sampled_from(dtypes))
    page_size = draw(page_sizes())
    head_dim = draw(st.sampled_from(head_dims or HEAD_DIMS))
    num_q_heads, num_kv_heads = draw(head_counts())
    layout = draw(st.sampled_from(layouts))
    num_requests = draw(st.integers(1, max_requests))
    num_levels = draw(st.integers(min_levels, max_levels))
    if one_query_per_request is None:
        one_query_per_request = draw(st.booleans())
    gaps = allow_gaps and draw(st.booleans())
    gen = _generator(draw)

    # The tree: groups[l] is a list of [begin, end) request ranges, each a refinement of level l - 1's.
    # Level 0 is usually one prefix shared by the whole batch; the last level is always per request.
    groups = [_split(draw, 0, num_requests) if draw(st.booleans()) else [(0, num_requests)]]
    for _ in range(1, num_levels - 1):
        groups.append([g for a, b in groups[-1] for g in _split(draw, a, b)])
    per_request = [(r, r + 1) for r in range(num_requests)]
    groups = groups + [per_request] if num_levels > 1 else [per_request]

    empty_level = draw(st.one_of(st.none(), st.integers(0, num_levels - 1)))
    per_level = max(1, max_kv // num_levels)
    headroom = 2 * (max_kv + max_q) + 4096 + 64 * num_levels
    cursor = [0] * num_requests  # next free position of each request
    for a, b in groups[0]:
        start = draw(start_positions(headroom))
        cursor[a:b] = [start] * (b - a)

    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, dtype)
    level_chunks = []  # per level, per group: (handle, length, start)
    chunks_of = [[] for _ in range(num_requests)]  # per request: (k, v, start) chunks in level order
    for lvl, level_groups in enumerate(groups):
        row = []
        for a, b in level_groups:
            n = 0 if lvl == empty_level else draw(lengths(per_level, page_size))
            start = cursor[a] + (draw(st.integers(0, 50)) if gaps else 0)
            k = _randn(gen, (n, num_kv_heads, head_dim), dtype)
            v = _randn(gen, (n, num_kv_heads, head_dim), dtype)
            row.append((builder.add(k, v, extra_pages=int(draw(st.booleans()) and draw(st.booleans()))), n, start))
            for r in range(a, b):
                chunks_of[r].append((k, v, start))
                cursor[r] = start + n
        level_chunks.append(row)

    request_kv, flat_handles, q_pos, qo_indptr = [], [], [], [0]
    for r in range(num_requests):
        k = torch.cat([c[0] for c in chunks_of[r]])
        v = torch.cat([c[1] for c in chunks_of[r]])
        pos = torch.cat([torch.arange(s, s + c.shape[0], device=DEVICE) for c, _, s in chunks_of[r]])
        request_kv.append((k, v, pos))
        if not gaps:
            flat_handles.append(builder.add(k, v))
        n_q = 1 if one_query_per_request else draw(st.one_of(st.just(1), st.integers(0, max_q)))
        first = chunks_of[r][0][2]
        mode = draw(st.sampled_from(("tail", "tail", "after", "inside")))
        q_pos += _query_positions(draw, n_q, first, cursor[r], mode)
        qo_indptr.append(qo_indptr[-1] + n_q)
    # some chunks in consecutive pages, as an engine allocates a chunk it prefills at once (page runs)
    runs = tuple(h for row in level_chunks for h, _, _ in row if draw(st.booleans()))
    k_cache, v_cache, pages = builder.build(gen, layout, spare_pages=draw(st.integers(0, 3)), runs=runs)

    levels = []
    for level_groups, row in zip(groups, level_chunks):
        kv = _paged_kv([pages[h] for h, _, _ in row], [n for _, n, _ in row], [s for _, _, s in row])
        levels.append(ck.CascadeLevel(_i32([qo_indptr[a] for a, _ in level_groups] + [qo_indptr[-1]]), kv))
    flat_kv = None
    if not gaps:
        flat_kv = _paged_kv(
            [pages[h] for h in flat_handles],
            [kv[0].shape[0] for kv in request_kv],
            [chunks[0][2] for chunks in chunks_of],
        )

    return CascadeProblem(
        q=_randn(gen, (qo_indptr[-1], num_q_heads, head_dim), dtype),
        q_pos=_i32(q_pos),
        k_cache=k_cache,
        v_cache=v_cache,
        options=draw(attention_options(num_q_heads, max_kv + max_q, causal=causal)),
        dtype=dtype,
        page_size=page_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        layout=layout,
        levels=levels,
        qo_indptr=_i32(qo_indptr),
        flat_kv=flat_kv,
        request_kv=request_kv,
        groups=groups,
    )


@dataclass(repr=False)
class PartitionProblem(_Common):
    """One sequence's KV as one segment (``whole_kv``) and split into chunks, one chunk per level."""

    qo_indptr: torch.Tensor = None  # [0, num_tokens] int32: every query token in the one segment
    levels: list = field(default_factory=list)  # [CascadeLevel], each with one KV segment: a chunk
    whole_kv: ck.PagedKV = None  # one segment with the whole sequence, in pages of its own
    chunks: list = field(default_factory=list)  # per level, the [begin, end) token range of its chunk
    k: torch.Tensor = None  # [len, Hkv, D] dtype: the whole sequence's keys
    v: torch.Tensor = None  # [len, Hkv, D] dtype
    kv_pos: torch.Tensor = None  # [len] int64: their global positions

    @property
    def whole_level(self) -> ck.CascadeLevel:
        return ck.CascadeLevel(self.qo_indptr, self.whole_kv)

    def __repr__(self) -> str:
        return (
            f"PartitionProblem({self._head()}, len={self.k.shape[0]}, start_pos={self.whole_kv.start_pos.tolist()}, "
            f"chunks by level={self.chunks})"
        )


@st.composite
def partition_problem(
    draw,
    max_chunks: int = 5,
    max_q: int | None = None,
    max_kv: int | None = None,
    dtypes=FLOAT_DTYPES,
    head_dims=None,
    layouts=LAYOUTS,
    causal=None,
) -> PartitionProblem:
    """One sequence of keys at global positions ``start .. start + len - 1``, and a random partition of it.

    The sequence is cut into 1..``max_chunks`` contiguous chunks (empty ones included), each stored in its
    own pages and assigned, in a random order, to its own level (a level with one KV segment and one
    query segment holding every query token). The same sequence is also stored whole, as ``whole_kv``.
    Query positions sit at the tail of the sequence, after it, or inside it. Returns a
    :class:`PartitionProblem`: ``q, q_pos, qo_indptr, k_cache, v_cache, levels, whole_kv, options``, the
    dense ``k, v, kv_pos`` and ``chunks`` (per level, its ``[begin, end)`` token range).
    """
    max_q = MAX_Q if max_q is None else max_q
    max_kv = MAX_KV if max_kv is None else max_kv
    dtype = draw(st.sampled_from(dtypes))
    page_size = draw(page_sizes())
    head_dim = draw(st.sampled_from(head_dims or HEAD_DIMS))
    num_q_heads, num_kv_heads = draw(head_counts())
    layout = draw(st.sampled_from(layouts))
    gen = _generator(draw)

    n = draw(lengths(max_kv, page_size))
    start = draw(start_positions(2 * (max_kv + max_q) + 4096))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=max_chunks - 1)))
    bounds = [0, *cuts, n]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    chunks = draw(st.permutations(pieces))

    k = _randn(gen, (n, num_kv_heads, head_dim), dtype)
    v = _randn(gen, (n, num_kv_heads, head_dim), dtype)
    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, dtype)
    handles = [builder.add(k[a:b], v[a:b], extra_pages=int(draw(st.booleans()) and draw(st.booleans())))
               for a, b in chunks]
    whole = builder.add(k, v)
    runs = tuple(h for h in [*handles, whole] if draw(st.booleans()))  # chunks in consecutive pages
    k_cache, v_cache, pages = builder.build(gen, layout, spare_pages=draw(st.integers(0, 3)), runs=runs)

    n_q = draw(st.one_of(st.just(1), st.integers(0, max_q)))
    mode = draw(st.sampled_from(("tail", "after", "inside")))
    q_pos = _query_positions(draw, n_q, start, start + n, mode)
    qo_indptr = _i32([0, n_q])
    levels = [ck.CascadeLevel(qo_indptr, _paged_kv([pages[h]], [b - a], [start + a]))
              for h, (a, b) in zip(handles, chunks)]

    return PartitionProblem(
        q=_randn(gen, (n_q, num_q_heads, head_dim), dtype),
        q_pos=_i32(q_pos),
        k_cache=k_cache,
        v_cache=v_cache,
        options=draw(attention_options(num_q_heads, max_kv + max_q, causal=causal)),
        dtype=dtype,
        page_size=page_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        layout=layout,
        qo_indptr=qo_indptr,
        levels=levels,
        whole_kv=_paged_kv([pages[whole]], [n], [start]),
        chunks=list(chunks),
        k=k,
        v=v,
        kv_pos=torch.arange(start, start + n, device=DEVICE),
    )


# ---------------------------------------------------------------------------------------------------------
# Merge states


@st.composite
def states(draw, n=None, k=None, H=None, D=None, dtype=None, layouts=("contiguous", "permuted", "strided")):
    """``(o [n, k, H, D] dtype, lse [n, k, H] fp32)``: ``k`` attention states for each of ``n`` rows.

    Each argument is an int (a dtype for ``dtype``), a strategy to draw it from, or None for a default
    range (n 1..6, k 1..5, H in 1, 3, 4, 17, D in 16, 40, 64, 128, any float dtype). ``lse`` mixes
    magnitudes: per-row offsets up to +-1000, spreads up to 60 between states, some states ``-inf``
    (with ``o = 0``, the empty state) and some whole ``(row, head)`` and whole rows ``-inf``. ``o`` values
    are normal, scaled per state by 0.01..10. ``layouts`` picks how the tensors are stored: contiguous,
    permuted storage, or strided slices of a larger buffer.
    """
    n = _resolve(draw, st.integers(1, 6) if n is None else n)
    k = _resolve(draw, st.integers(1, 5) if k is None else k)
    H = _resolve(draw, st.sampled_from([1, 3, 4, 17]) if H is None else H)
    D = _resolve(draw, st.sampled_from([16, 40, 64, 128]) if D is None else D)
    dtype = _resolve(draw, st.sampled_from(FLOAT_DTYPES) if dtype is None else dtype)
    gen = _generator(draw)

    row_shift = torch.tensor(draw(st.lists(st.sampled_from([0.0, 30.0, -30.0, 1000.0, -1000.0]),
                                           min_size=n, max_size=n)))
    spread = draw(st.sampled_from([0.01, 1.0, 10.0, 60.0]))
    lse = row_shift[:, None, None] + spread * torch.randn((n, k, H), generator=gen)
    p_empty = draw(st.sampled_from([0.0, 0.2, 0.5]))
    empty = torch.rand((n, k, H), generator=gen) < p_empty
    empty |= (torch.rand((n, 1, H), generator=gen) < draw(st.sampled_from([0.0, 0.3])))  # whole (row, head)
    if n > 1 and draw(st.booleans()):
        empty[draw(st.integers(0, n - 1))] = True  # a whole row
    lse = lse.masked_fill(empty, -math.inf)
    scale = 10.0 ** (torch.rand((n, k, 1, 1), generator=gen) * 3 - 2)
    o = (torch.randn((n, k, H, D), generator=gen) * scale).masked_fill(empty[..., None], 0.0).to(dtype)

    layout = draw(st.sampled_from(layouts))
    if layout == "permuted":  # storage [k, H, D, n]
        o = o.permute(1, 2, 3, 0).contiguous().to(DEVICE).permute(3, 0, 1, 2)
        lse = lse.permute(2, 0, 1).contiguous().to(DEVICE).permute(1, 2, 0)
    elif layout == "strided":  # every other element of a buffer twice as long in D and k
        big = torch.full((n, 2 * k, H, 2 * D), math.nan, dtype=dtype)
        big[:, ::2, :, ::2] = o
        o = big.to(DEVICE)[:, ::2, :, ::2]
        big_lse = torch.full((n, k, H, 2), math.nan)
        big_lse[..., 0] = lse
        lse = big_lse.to(DEVICE)[..., 0]
    else:
        o, lse = o.to(DEVICE), lse.to(DEVICE)
    return o, lse
