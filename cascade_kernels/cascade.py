"""Cascade attention: every level of a chunked, paged KV in one plan, merged into one exact result.

A token's keys are the union of its segments at every level (a shared system prompt, a shared
document, its own tokens). Each level runs the paged attention kernel once for the whole batch: a level
shared by many tokens is one prefill-style pass whose query tiles hold all those tokens (times their GQA
group), so the shared KV is read once per batch rather than once per request. Every level (and every
KV split of a level) writes its partial state ``(o, lse)`` into a slot of one fp32 scratch buffer, and
one merge pass combines the slots, counting attention sinks once.

``plan_cascade`` does the host-side work once per batch: it validates the levels, reads their sizes,
picks each level's kernel shape and split count, finds the levels whose KV tiles lie in consecutive pages
(loaded as block copies, see ``tiles_in_page_runs``), builds the work lists and allocates the scratch and
outputs. ``CascadePlan.run`` then only launches kernels: no host-device synchronisation and no
allocation, so it can be captured in a CUDA graph and replayed with new ``q``, ``q_pos`` and cache
contents. On Hopper a long shared level and the per-request decode level run as one launch where that
pays (``_fused``): every SM computes shared-level tiles while its decode warps stream the requests' own KV.
A plan's first run records its launches; a later run whose inputs have the same layout (dtype,
shape, strides, 16-byte alignment) repeats them with the new tensors, so that a model running one plan in
every layer pays the launch decisions and Triton's argument handling once, not once a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import _fused, _gluon
from . import configs as _configs
from .attention import (
    Geometry,
    Options,
    TileConfig,
    choose_splits,
    launch_attention,
    num_sms,
    takes_gluon_decode,
)
from ._launch import layout_key, recording
from ._tma import ensure_allocator
from ._triton import cdiv
from ._validation import FLOAT_DTYPES, check_head_counts, check_options, check_tensor, validation
from .fold import fold_levels
from .merge import _launch_merge_states
from .types import CascadeLevel, PagedKV

__all__ = ["CascadePlan", "plan_cascade", "cascade_attention"]


@dataclass(frozen=True)
class LevelLaunch:
    """What the plan decided for one level: kernel shape, work list, splits and scratch slots."""

    qo_indptr: torch.Tensor
    tile_indptr: torch.Tensor  # [S + 1] int32 on the device: work tiles before each segment
    num_tiles: int
    kv: PagedKV
    kind: str  # "decode" (at most one query token per segment) or "prefill"
    config: TileConfig
    num_splits: int
    slot_offset: int
    max_kv_len: int
    page_runs: bool = False  # every KV tile of every segment lies in consecutive pages
    decode_tiles: int = 0  # every segment holds one query token, in this many work tiles (0: not so)


def tiles_in_page_runs(kv: PagedKV, page_size: int, block_n: int) -> bool:
    """Whether every ``block_n``-key tile of every segment of ``kv`` lies in pages with consecutive ids.

    Tiles start at multiples of ``block_n`` from a segment's first key, so tile ``t`` of a segment reads
    its page-table entries ``t * r ... t * r + r - 1`` (``r = block_n / page_size``); when those ids count
    up by one, and the cache holds its pages one after another in rows, the tile is ``block_n``
    contiguous cache rows: one block copy, as a tile inside one large page is. An engine gets this for a
    chunk it allocates in one piece (a shared system prompt or document prefilled at once). False where a
    tile spans a single page anyway (``block_n <= page_size``) or ``page_size`` does not divide ``block_n``.
    """
    if block_n <= page_size or block_n % page_size:
        return False
    r = block_n // page_size
    indptr = kv.indptr.long()
    counts = indptr[1:] - indptr[:-1]
    total = int(indptr[-1].item())
    if total == 0:
        return False
    entry = torch.arange(total, device=kv.device)
    first = indptr[:-1].repeat_interleave(counts, output_size=total)  # segment's first entry, per entry
    within = (entry - first) % r  # place of the entry in its tile
    pages = kv.indices[:total].long()
    return bool((pages == pages[entry - within] + within).all().item())


def _host(t: torch.Tensor) -> list[int]:
    return t.detach().to("cpu", torch.int64).tolist()


class CascadePlan:
    """Host-side decisions for one batch of a cascade; :meth:`run` only launches kernels.

    Build it with :func:`plan_cascade`. ``run`` writes into buffers the plan owns and returns them, so
    the outputs of one ``run`` are overwritten by the next (pass ``out=`` to keep them apart).
    """

    def __init__(self, levels, geometry: Geometry, options: Options, dtype: torch.dtype, num_tokens: int,
                 device: torch.device):
        self.geometry = geometry
        self.options = options
        self.dtype = dtype
        self.num_tokens = num_tokens
        self.device = device
        self.launches: list[LevelLaunch] = [self._plan_level(level) for level in levels]
        # a prefill level and the decode level that may run as one launch (``_fused``): the decode level
        # then takes one split, its decode warps a whole request each
        self.fused = _fused.pick(self.launches, geometry, options, dtype, device, num_sms(device))
        if self.fused is not None:
            d = self.fused[1]
            self.launches[d] = replace(self.launches[d], num_splits=1)
        slot = 0
        for i, launch in enumerate(self.launches):
            self.launches[i] = replace(launch, slot_offset=slot)
            slot += launch.num_splits
        self.num_slots = slot
        g = geometry
        self.o = torch.empty((num_tokens, g.num_q_heads, g.head_dim), dtype=dtype, device=device)
        self.lse = torch.empty((num_tokens, g.num_q_heads), dtype=torch.float32, device=device)
        if self.direct:
            self.o_part = self.lse_part = None
        else:
            self.o_part = torch.empty((num_tokens, slot, g.num_q_heads, g.head_dim), dtype=torch.float32,
                                      device=device)
            self.lse_part = torch.empty((num_tokens, slot, g.num_q_heads), dtype=torch.float32, device=device)
        self._replay, self._replay_key = None, None  # the recorded launches and the input layout they hold for

    @property
    def direct(self) -> bool:
        """One level, one split: the kernel writes the final output itself and no merge runs."""
        return self.num_slots == 1

    def _plan_level(self, level: CascadeLevel) -> LevelLaunch:
        g = self.geometry
        q_lens = [b - a for a, b in zip(*(lambda p: (p[:-1], p[1:]))(_host(level.qo_indptr)))]
        kv_lens = _host(level.kv.lens)
        kind = "decode" if max(q_lens, default=0) <= 1 else "prefill"
        busy = [(n, m) for n, m in zip(q_lens, kv_lens) if n]  # tuned-config bucket: means over segments with queries
        config = _configs.select_config(kind, head_dim=g.head_dim, group=g.group, page_size=g.page_size,
                                        dtype=self.dtype, q_len=sum(n for n, _ in busy) / max(len(busy), 1),
                                        kv_len=sum(m for _, m in busy) / max(len(busy), 1), device=self.device)
        tiles = [cdiv(n * g.group, config.block_m) for n in q_lens]
        tile_indptr = [0]
        for t in tiles:
            tile_indptr.append(tile_indptr[-1] + t)
        num_tiles = tile_indptr[-1]
        max_kv = max((n for n, t in zip(kv_lens, tiles) if t), default=0)
        page_runs = num_tiles > 0 and tiles_in_page_runs(level.kv, g.page_size, config.block_n)
        # a decode level whose segments all hold one token: as many tiles each (a compile-time constant of the
        # shape, so no new kernel variant per batch), found by division instead of a search
        same = kind == "decode" and len(set(tiles)) == 1 and tiles[0] > 0
        if same and tiles[0] == 1 and takes_gluon_decode(self.dtype, g, self.options, self.device, num_tiles):
            # the Gluon decode kernel's programs, where the caches allow it at run time (else the tl kernel's,
            # with the same splits)
            num_splits = _gluon.decode_splits(num_tiles * g.num_kv_heads, max_kv, num_sms(self.device))
        else:
            num_splits = choose_splits(num_tiles * g.num_kv_heads, max_kv, config.block_n, self.device,
                                       config.waves, whole_rounds=kind == "prefill")
        return LevelLaunch(
            qo_indptr=level.qo_indptr,
            tile_indptr=torch.tensor(tile_indptr, dtype=torch.int32, device=self.device),
            num_tiles=num_tiles, kv=level.kv, kind=kind, config=config, num_splits=num_splits,
            slot_offset=0, max_kv_len=max_kv, page_runs=page_runs,
            decode_tiles=tiles[0] if same else 0,
        )

    def run(self, q, q_pos, k_cache, v_cache, *, out=None):
        """Attention of ``q`` over every level; returns ``(o [N, Hq, D], lse [N, Hq] fp32)``.

        Checks only metadata (shapes, dtypes, devices) against the plan: no synchronisation, no
        allocation. ``out=(o, lse)`` writes elsewhere than the plan's own output buffers. Inputs laid out
        as the previous run's replay its launches (``_launch.recording``); others launch anew.
        """
        g = self.geometry
        check_tensor("q", q, dtypes=(self.dtype,), shape=(self.num_tokens, g.num_q_heads, g.head_dim),
                     device=self.device)
        check_tensor("q_pos", q_pos, dtypes=(torch.int32,), shape=(self.num_tokens,), device=self.device,
                     contiguous=True)
        check_tensor("k_cache", k_cache, dtypes=(self.dtype,), shape=(None, g.page_size, g.num_kv_heads, g.head_dim),
                     device=self.device)
        check_tensor("v_cache", v_cache, dtypes=(self.dtype,), shape=tuple(k_cache.shape), device=self.device)
        if k_cache.shape[0] < g.num_pages:
            raise ValueError(f"k_cache has {k_cache.shape[0]} pages; the plan was made for {g.num_pages}")
        if out is not None and not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("out must be a tuple (o_out, lse_out)")
        o, lse = (self.o, self.lse) if out is None else out
        if out is not None:
            check_tensor("out[0]", o, dtypes=FLOAT_DTYPES, shape=tuple(self.o.shape), device=self.device)
            check_tensor("out[1]", lse, dtypes=(torch.float32,), shape=tuple(self.lse.shape), device=self.device)
        if self.num_tokens == 0:
            return o, lse
        tensors = (q, q_pos, k_cache, v_cache, o, lse)
        key = layout_key(tensors)
        if key == self._replay_key:
            ensure_allocator()  # this thread may not have Triton's scratch allocator yet
            for launch in self._replay:
                launch(tensors)
            return o, lse
        # The first run with inputs of this layout decides and launches as usual, and records the launches;
        # later runs with inputs of the same layout replay them with the new tensors (less host time).
        with recording(tensors) as rec:
            self._launch_all(q, q_pos, k_cache, v_cache, o, lse)
        self._replay, self._replay_key = (rec.launches, key) if rec.complete else (None, None)
        return o, lse

    def _launch_all(self, q, q_pos, k_cache, v_cache, o, lse):
        if self.direct:
            self._launch(self.launches[0], q, q_pos, k_cache, v_cache, o, lse, apply_sinks=True)
            return
        # the fused pair, where these caches allow its launch (else every level alone, with the same slots)
        rows = self.fused and _fused.page_rows(q, k_cache, v_cache, self.geometry, self.launches[self.fused[0]])
        together = self.fused if rows else ()
        for i, launch in enumerate(self.launches):
            if i not in together:
                self._launch(launch, q, q_pos, k_cache, v_cache, self.o_part, self.lse_part, apply_sinks=False)
        if together:
            shared, decode = (self.launches[i] for i in together)
            _fused.launch(q, q_pos, k_cache, v_cache, shared, decode, self.geometry, self.options, self.o_part,
                          self.lse_part, rows)
        _launch_merge_states(self.o_part, self.lse_part, (o, lse), self.options.sinks, dependent=True)

    def _launch(self, launch: LevelLaunch, q, q_pos, k_cache, v_cache, o, lse, apply_sinks):
        if launch.num_tiles == 0:
            return
        launch_attention(
            q, q_pos, launch.qo_indptr, launch.tile_indptr, launch.num_tiles, k_cache, v_cache, launch.kv,
            self.geometry, self.options, launch.config, launch.num_splits, o, lse,
            slot_offset=launch.slot_offset, apply_sinks=apply_sinks,
            reverse_tiles=self.options.causal and launch.kind == "prefill", page_runs=launch.page_runs,
            decode_tiles=launch.decode_tiles,
        )

    def __repr__(self) -> str:
        levels = ", ".join(f"{l.kind}(tiles={l.num_tiles}, splits={l.num_splits}, max_kv={l.max_kv_len}"
                           f"{', page runs' if l.page_runs else ''})" for l in self.launches)
        fused = f", fused={self.fused}" if self.fused is not None else ""
        return f"CascadePlan(tokens={self.num_tokens}, slots={self.num_slots}, levels=[{levels}]{fused})"


def plan_cascade(levels, *, num_q_heads, num_kv_heads, head_dim, page_size, dtype, num_pages=None, causal=True,
                 sm_scale=None, window_left=None, softcap=None, sinks=None, fold=None) -> CascadePlan:
    """Plan cascade attention over ``levels`` once per batch; ``plan.run(q, q_pos, k_cache, v_cache)`` launches.

    Parameters
    ----------
    levels : sequence of CascadeLevel
        Level ``l``'s query segment ``s`` reads its KV segment ``s``; every level's ``qo_indptr`` ends at
        the same number of query tokens, so each token belongs to exactly one segment of each level
        (an empty KV segment gives it the identity state there).
    num_q_heads, num_kv_heads, head_dim, page_size : int
        Shapes of ``q`` ``[N, num_q_heads, head_dim]`` and of the caches
        ``[num_pages, page_size, num_kv_heads, head_dim]``.
    dtype : torch.dtype
        fp16, bf16 or fp32: of q, the caches and ``o``.
    num_pages : int, optional
        Pages of the cache; when given (and validation is on), every page id is checked against it.
    causal, sm_scale, window_left, softcap, sinks
        As in :func:`cascade_kernels.paged_prefill`; ``sinks`` count once per query, not per level.
    fold : bool, optional
        Join a shared level into the next one (its pages prepended to each of their segments) where
        the layout allows it: None (default) where keeping it apart does not pay (a short shared level,
        see ``fold.py``), True wherever possible, False never. The result is the same either way.

    Returns
    -------
    CascadePlan

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> shared = ck.CascadeLevel(i32(0, 2), ck.PagedKV(i32(0, 4), i32(0, 1, 2, 3), i32(64), i32(0)))
    >>> own = ck.CascadeLevel(i32(0, 1, 2), ck.PagedKV(i32(0, 1, 2), i32(4, 5), i32(3, 9), i32(64, 64)))
    >>> plan = ck.plan_cascade([shared, own], num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16,
    ...                        dtype=torch.float32)                            # doctest: +SKIP
    >>> k_cache, v_cache = torch.randn(2, 6, 16, 2, 64).unbind(0)
    >>> o, lse = plan.run(torch.randn(2, 8, 64), i32(66, 72), k_cache, v_cache)  # doctest: +SKIP
    """
    if isinstance(levels, CascadeLevel) or not isinstance(levels, (list, tuple)) or not levels:
        raise TypeError("levels must be a non-empty list of CascadeLevel")
    for i, level in enumerate(levels):
        if not isinstance(level, CascadeLevel):
            raise TypeError(f"levels[{i}] must be a CascadeLevel, got {type(level).__name__}")
    device = levels[0].kv.device
    for i, level in enumerate(levels):
        if level.kv.device != device:
            raise ValueError(f"levels[{i}] is on {level.kv.device}, levels[0] on {device}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in [16, 256], got {head_dim}")
    check_head_counts(num_q_heads, num_kv_heads)
    scale = check_options(causal=causal, sm_scale=sm_scale, window_left=window_left, softcap=softcap, sinks=sinks,
                          num_q_heads=num_q_heads, head_dim=head_dim, device=device)
    # The plan reads the batch's sizes to the host once: that is its job, so it always does.
    ends = [int(level.qo_indptr[-1].item()) for level in levels]
    if len(set(ends)) != 1:
        raise ValueError(f"every level's qo_indptr must end at the same number of query tokens, got {ends}")
    with validation(True):
        for i, level in enumerate(levels):
            level.kv.check_pages(page_size, num_pages if num_pages is not None else 2**31 - 1, name=f"levels[{i}].kv")
    if fold is not None and not isinstance(fold, bool):
        raise TypeError(f"fold must be None or a bool, got {type(fold).__name__}")
    levels = fold_levels(list(levels), page_size, fold)
    max_page = max((int(level.kv.indices.max().item()) + 1 for level in levels if level.kv.indices.numel()), default=0)
    geometry = Geometry(num_q_heads, num_kv_heads, head_dim, page_size, max(max_page, num_pages or 0))
    options = Options(causal, scale, window_left, None if softcap is None else float(softcap), sinks)
    return CascadePlan(levels, geometry, options, dtype, ends[0], device)


def cascade_attention(q, q_pos, k_cache, v_cache, levels, *, causal=True, sm_scale=None, window_left=None,
                      softcap=None, sinks=None):
    """Exact attention of each query token over the union of its segments at every level.

    ``plan_cascade(levels, ...).run(q, q_pos, k_cache, v_cache)`` in one call; see :func:`plan_cascade`.

    Returns
    -------
    o : ``[N, num_q_heads, head_dim]`` in q's dtype; lse : ``[N, num_q_heads]`` fp32 natural log (sinks
    included), ``-inf`` with ``o = 0`` where no key of any level is visible.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> shared = ck.CascadeLevel(i32(0, 2), ck.PagedKV(i32(0, 4), i32(0, 1, 2, 3), i32(64), i32(0)))
    >>> own = ck.CascadeLevel(i32(0, 1, 2), ck.PagedKV(i32(0, 1, 2), i32(4, 5), i32(3, 9), i32(64, 64)))
    >>> k_cache, v_cache = torch.randn(2, 6, 16, 2, 64).unbind(0)
    >>> o, lse = ck.cascade_attention(torch.randn(2, 8, 64), i32(66, 72), k_cache, v_cache,
    ...                               [shared, own])                           # doctest: +SKIP
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"k_cache head_dim must equal q's ({q.shape[2]}), got shape {list(k_cache.shape)}")
    plan = plan_cascade(levels, num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2], head_dim=q.shape[2],
                        page_size=k_cache.shape[1], dtype=q.dtype, num_pages=k_cache.shape[0], causal=causal,
                        sm_scale=sm_scale, window_left=window_left, softcap=softcap, sinks=sinks)
    if plan.device != q.device:
        raise ValueError(f"levels must be on q's device {q.device}, got {plan.device}")
    return plan.run(q, q_pos, k_cache, v_cache)
