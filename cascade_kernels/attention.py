"""Paged prefill and paged decode: argument checks, launch decisions, and the launch itself.

Both entry points run the kernel in ``_attention_kernel.py`` (on Hopper, most prefill tiles take its Gluon
counterpart, ``_attention_gluon.py``, and decode batches of up to one round of programs the Gluon decode kernel,
``_decode_gluon.py``; ``_gluon.py`` says when). They differ
only in the tile shape (prefill packs many query tokens into a tile, decode one token times its GQA group)
and in how the KV of a segment is split across programs (decode splits long segments so a small batch
still fills the GPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import _gluon
from . import configs as _configs
from ._attention_kernel import _paged_attention_kernel
from ._launch import Launcher, dependent_launch
from ._tma import ensure_allocator, rows_contiguous, tma_usable
from ._triton import cdiv, interpreting, padded
from ._validation import FLOAT_DTYPES, check_head_counts, check_indptr, check_options, check_tensor
from .merge import _launch_merge_states
from .types import PagedKV

_ATTENTION = Launcher(_paged_attention_kernel)

__all__ = ["paged_prefill", "paged_decode"]

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Options:
    """The attention options every launch shares, already checked."""

    causal: bool
    sm_scale: float
    window_left: int | None
    softcap: float | None
    sinks: torch.Tensor | None


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of the attention kernel: tile sizes, warps, software-pipelining depth, and the
    split policy: ``waves`` is how many programs per SM the automatic KV split count aims for. ``tma``
    allows block copies of page-aligned KV tiles (off: every tile is gathered row by row). ``lookahead``
    reads the next KV tile's page ids while this tile is computed, so Triton's software pipeline keeps
    ``num_stages - 1`` tiles in flight; without it the page-id loads take stages of their own and nothing
    overlaps below 5 (the tuned decode configs were chosen that way)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    prefetch: bool = False  # load the next KV tile into registers before computing this one
    waves: int = 2
    tma: bool = True  # page-aligned tiles as block copies where the GPU and the cache allow (``_tma.py``)
    lookahead: bool = False  # page ids one tile ahead (not with prefetch, which reads a whole tile ahead)

    def __post_init__(self):
        if self.lookahead and self.prefetch:
            raise ValueError("TileConfig: lookahead and prefetch exclude each other (prefetch reads a whole "
                             "tile ahead)")


@dataclass(frozen=True)
class Geometry:
    """Sizes of the problem that every kernel decision depends on."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in on the CPU, where the interpreter runs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def heuristic_config(kind: str, head_dim: int, group: int, dtype: torch.dtype,
                     page_size: int | None = None) -> TileConfig:
    """Tile sizes used when no tuned config matches.

    prefill: 128 query rows (tokens x GQA group) against 128 keys in 8 warps, page ids one tile ahead and
    3 stages (two tiles in flight; best of the configs swept on an H200 for head_dim 128 bf16: 10-15%
    over 2 stages without lookahead, where no load overlapped the math); fp32 and head dims over 128
    shrink the tiles to fit shared memory: 128 x 64 in 8 warps at 2 stages for 16-bit head dims over 128
    (the tuner's pick for prompts of 512-16k tokens at head_dim 256 on an H200, 1.47-1.52x the 64 x 32
    tile in 4 warps that fp32 keeps).
    Such a program takes a whole SM (its registers and most of its shared memory), so splits aim at one
    program per SM (``waves=1``); on an H200 a cascade's shared level (few query tiles over 32k keys) ran
    8-12% faster with half the splits that two per SM ask for, and the tuner picked ``waves=1`` wherever
    it timed such a level.
    decode: the GQA group padded to 16 rows (the smallest ``tl.dot``). With pages of a multiple of 16
    slots (and 16-bit data, head dim up to 128): one page per KV tile, six stages, one warp per 16 rows,
    and splits for 4 programs per SM: many small programs, each with 5 tiles in flight, kept the H200's
    memory busiest (0.78-0.93 of its read bandwidth on the decode benchmark shapes, against 0.60-0.87
    for 64-key tiles in 4 warps). Otherwise 64 keys in 4 warps, 5 stages: page ids are loaded inside the
    KV loop, so Triton's pipeliner overlaps the key/value loads with the math only from
    ``num_stages >= 5``; below that the tiles are single-buffered.
    """
    wide = padded(head_dim) > 128 or dtype == torch.float32
    if kind == "decode":
        block_m = min(64, padded(group))
        if not wide and page_size is not None and page_size % 16 == 0:
            return TileConfig(block_m=block_m, block_n=16, num_warps=block_m // 16, num_stages=6, waves=4)
        return TileConfig(block_m=block_m, block_n=32 if wide else 64, num_warps=4, num_stages=2 if wide else 5)
    if interpreting():
        return TileConfig(block_m=32, block_n=32, num_warps=4, num_stages=1, lookahead=True)
    if dtype == torch.float32:
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if wide:
        return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return TileConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, waves=1, lookahead=True)


def check_attention_args(q, q_pos, k_cache, v_cache, kv, *, causal, sm_scale, window_left, softcap, sinks):
    """Checks shared by prefill and decode; returns ``(Geometry, Options)``."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, num_q_heads, head_dim = q.shape
    device = q.device
    check_tensor("q_pos", q_pos, dtypes=(torch.int32,), shape=(num_tokens,), device=device, contiguous=True)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device)
    num_pages, page_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache head_dim must equal q's ({head_dim}), got shape {list(k_cache.shape)}")
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), shape=tuple(k_cache.shape), device=device)
    if not isinstance(kv, PagedKV):
        raise TypeError(f"kv must be a PagedKV, got {type(kv).__name__}")
    if kv.device != device:
        raise ValueError(f"kv must be on {device}, got {kv.device}")
    if not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [16, {MAX_HEAD_DIM}], got {head_dim}")
    if page_size < 1:
        raise ValueError(f"k_cache page_size must be >= 1, got {page_size}")
    check_head_counts(num_q_heads, num_kv_heads)
    scale = check_options(causal=causal, sm_scale=sm_scale, window_left=window_left, softcap=softcap,
                          sinks=sinks, num_q_heads=num_q_heads, head_dim=head_dim, device=device)
    kv.check_pages(page_size, num_pages)
    geometry = Geometry(num_q_heads, num_kv_heads, head_dim, page_size, num_pages)
    options = Options(causal, scale, window_left, None if softcap is None else float(softcap), sinks)
    return geometry, options


def _check_num_splits(num_splits):
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")


def choose_splits(num_programs: int, max_kv_len: int, block_n: int, device: torch.device, waves: int = 2,
                  whole_rounds: bool = False) -> int:
    """Splits per segment so that about ``waves`` programs per SM fill the GPU, each split >= 4 KV tiles.

    ``whole_rounds`` (compute-bound prefill tiles, one program per SM at a time): programs then run in
    rounds of ``waves x SMs``, and a count that reaches the target may spill a few programs into one
    more round, a whole round's time for a sliver of work. The most splits that fit in one round are
    taken instead whenever they are at least as fast, counting time as rounds times the work of one
    split (``rounds / splits``). On an H200 this took a cascade's shared level at batch 256 from 9 splits
    (5 rounds) to 8 (4 rounds): 6-8% faster. Not for decode: its small memory-bound programs share an
    SM several at a time, as many as their shared memory allows, so rounds are not known here, and
    fewer splits there measured up to 1.6x slower (one split for 64 requests of 33k tokens).
    """
    if num_programs <= 0 or max_kv_len <= 0:
        return 1
    slots = waves * num_sms(device)
    splits = max(1, min(math.ceil(slots / num_programs), math.ceil(max_kv_len / (4 * block_n)), 256))
    one_round = slots // num_programs
    if (whole_rounds and 1 <= one_round < splits
            and splits <= cdiv(num_programs * splits, slots) * one_round):
        return one_round
    return splits


def launch_attention(
    q, q_pos, qo_indptr, tile_indptr, num_tiles, k_cache, v_cache, kv, geometry, options, config,
    num_splits, o, lse, slot_offset=0, apply_sinks=True, reverse_tiles=False, page_runs=False,
    decode_tiles=0,
):
    """Launch the kernel once; no checks, no allocation.

    ``decode_tiles``: a promise that every segment holds exactly one query token (``qo_indptr`` is
    ``arange``), in this many work tiles: a program then finds its segment and token by division, where
    otherwise it searches ``tile_indptr`` (log2(segments) loads one after another) and reads ``qo_indptr``
    before its first KV load can issue; 0: no promise.
    ``page_runs``: the caller found every KV tile in consecutive pages (``cascade.tiles_in_page_runs``);
    where the caches hold their pages one after another in rows, tiles are then read as contiguous rows.

    ``o``/``lse`` are either the final ``[N, Hq, D]``/``[N, Hq]`` outputs (one split) or the fp32
    split scratch ``[N, slots, Hq, D]``/``[N, slots, Hq]``, written at slots ``slot_offset + split``.
    """
    if o.dim() == 3:
        s_ot, s_oh, s_od = o.stride()
        s_oslot = 0
        s_lt, s_lh = lse.stride()
        s_lslot = 0
    else:
        s_ot, s_oslot, s_oh, s_od = o.stride()
        s_lt, s_lslot, s_lh = lse.stride()
    has_sinks = apply_sinks and options.sinks is not None
    block_d = padded(geometry.head_dim)
    page_runs = page_runs and rows_contiguous(k_cache) and rows_contiguous(v_cache)
    grid = (num_tiles * geometry.num_kv_heads * num_splits,)
    args = (
        q, q_pos, qo_indptr, tile_indptr, k_cache, v_cache,
        kv.indptr, kv.indices, kv.lens, kv.start_pos,
        options.sinks if has_sinks else lse, o, lse,
        kv.num_segments, geometry.num_kv_heads, num_splits, geometry.num_pages, geometry.page_size, options.sm_scale,
        options.softcap or 1.0, options.window_left or 0, slot_offset,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
    )
    if decode_tiles == 1 and gluon_decode(q, k_cache, v_cache, geometry, options, num_tiles):
        ensure_allocator()
        _gluon.decode_launcher()(
            grid, *args, GROUP=geometry.group, HEAD_DIM=geometry.head_dim,
            STAGES=_gluon.DECODE_STAGES[geometry.head_dim], CAUSAL=options.causal, HAS_SINKS=has_sinks,
            DECODE_TILES=1, PAGE_SIZE=geometry.page_size, PART_REGS=_gluon.DECODE_REGS, num_warps=4,
            maxnreg=_gluon.DECODE_MAXNREG,
        )
        return
    # runs of the config's tiles are runs of the Gluon kernel's 128-key tiles where those nest in them
    page_rows = _gluon.page_rows(q, k_cache, v_cache, geometry.head_dim, config.block_m, options.window_left,
                                 options.softcap, has_sinks, page_runs and config.block_n % _gluon.BLOCK_N == 0)
    if page_rows:
        ensure_allocator()
        _gluon.launcher()(
            grid, *args, GROUP=geometry.group, HEAD_DIM=geometry.head_dim, BLOCK_M=_gluon.BLOCK_M,
            BLOCK_N=_gluon.BLOCK_N, PAGE_ROWS=page_rows, STAGES=_gluon.STAGES, CAUSAL=options.causal,
            REVERSE_TILES=reverse_tiles, PRODUCER_REGS=_gluon.PRODUCER_REGS,
            CONSUMER_REGS=_gluon.CONSUMER_REGS, num_warps=_gluon.NUM_WARPS,
        )
        return
    tma = config.tma and tma_usable(k_cache, v_cache, config.block_n, block_d, config.prefetch, page_runs)
    if tma:
        ensure_allocator()
    _ATTENTION(
        grid, *args,
        GROUP=geometry.group, HEAD_DIM=geometry.head_dim, BLOCK_D=block_d,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=options.causal, HAS_WINDOW=options.window_left is not None,
        HAS_SOFTCAP=options.softcap is not None, HAS_SINKS=has_sinks,
        PAGE_ALIGNED=page_runs or geometry.page_size % config.block_n == 0, REVERSE_TILES=reverse_tiles,
        PREFETCH=config.prefetch, LOOKAHEAD=config.lookahead,
        TMA=tma, DECODE_TILES=decode_tiles, INTERPRET=interpreting(),
        LAUNCH_DEPENDENTS=dependent_launch(q.device), num_warps=config.num_warps, num_stages=config.num_stages,
    )


def takes_gluon_decode(dtype, geometry, options, device, num_segments) -> bool:
    """Whether a decode launch of ``num_segments`` (one query token and one work tile each) takes the Gluon
    decode kernel, its caches permitting (``gluon_decode``): known when a plan is made. Never while a decode
    config is pinned: that asks for the ``tl`` kernel's tile."""
    return not _configs.is_pinned("decode") and _gluon.decode_takes(
        dtype, geometry.head_dim, geometry.group, geometry.page_size, options.window_left, options.softcap, device,
        num_segments * geometry.num_kv_heads, num_sms(device))


def gluon_decode(q, k_cache, v_cache, geometry, options, num_segments) -> bool:
    """``takes_gluon_decode`` for this launch, and these caches allow it."""
    return (takes_gluon_decode(q.dtype, geometry, options, q.device, num_segments)
            and _gluon.decode_caches_ok(k_cache, v_cache))


def _run(q, q_pos, qo_indptr, tile_indptr, num_tiles, k_cache, v_cache, kv, geometry, options, config,
         num_splits, reverse_tiles, decode_tiles=0):
    """Allocate outputs (and split scratch), launch, merge the splits."""
    num_tokens = q.shape[0]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((num_tokens, geometry.num_q_heads), dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return o, lse
    if num_splits == 1:
        launch_attention(q, q_pos, qo_indptr, tile_indptr, num_tiles, k_cache, v_cache, kv, geometry, options,
                         config, 1, o, lse, reverse_tiles=reverse_tiles, decode_tiles=decode_tiles)
        return o, lse
    o_part = torch.empty((num_tokens, num_splits, geometry.num_q_heads, geometry.head_dim),
                         dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_tokens, num_splits, geometry.num_q_heads), dtype=torch.float32, device=q.device)
    launch_attention(q, q_pos, qo_indptr, tile_indptr, num_tiles, k_cache, v_cache, kv, geometry, options,
                     config, num_splits, o_part, lse_part, apply_sinks=False, reverse_tiles=reverse_tiles,
                     decode_tiles=decode_tiles)
    return _launch_merge_states(o_part, lse_part, (o, lse), options.sinks, dependent=True)


def paged_prefill(q, q_pos, qo_indptr, k_cache, v_cache, kv, *, causal=True, sm_scale=None, window_left=None,
                  softcap=None, sinks=None, num_splits=None):
    """Attention of ragged query segments, each against its own segment of a paged KV cache.

    Query segment ``s`` (``q[qo_indptr[s]:qo_indptr[s + 1]]``) attends to KV segment ``s`` of ``kv``;
    a key is visible iff ``kv_pos <= q_pos`` (``causal``) and ``kv_pos >= q_pos - window_left``, with
    positions global (queries may sit before, inside or after their KV, with gaps).

    Parameters
    ----------
    q : ``[num_tokens, num_q_heads, head_dim]`` fp16/bf16/fp32, any strides; ``16 <= head_dim <= 256``.
    q_pos : ``[num_tokens]`` int32 global positions.
    qo_indptr : ``[S + 1]`` int32, non-decreasing from 0 to ``num_tokens``.
    k_cache, v_cache : ``[num_pages, page_size, num_kv_heads, head_dim]``, q's dtype, any strides (an HND
        cache as ``.transpose(1, 2)``, one half of a fused cache); ``num_q_heads % num_kv_heads == 0``.
    kv : PagedKV with ``S`` segments.
    causal, sm_scale, window_left, softcap, sinks : as in the contract (``sm_scale`` defaults to
        ``head_dim ** -0.5``; ``sinks`` is ``[num_q_heads]`` fp32).
    num_splits : KV splits per segment (None: chosen from the work against the GPU's SMs).

    Returns
    -------
    o : ``[num_tokens, num_q_heads, head_dim]`` in q's dtype, normalised.
    lse : ``[num_tokens, num_q_heads]`` fp32, natural log of the sum of exp of the scaled logits (sinks
        included); ``-inf`` (with ``o = 0``) where no key is visible.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> k_cache, v_cache = torch.randn(2, 8, 16, 2, 64).unbind(0)        # 8 pages of 16 slots, 2 KV heads
    >>> kv = ck.PagedKV(indptr=i32(0, 2), indices=i32(5, 1), lens=i32(20), start_pos=i32(0))
    >>> q = torch.randn(4, 8, 64)                                          # 4 tokens, 8 query heads
    >>> o, lse = ck.paged_prefill(q, i32(16, 17, 18, 19), i32(0, 4), k_cache, v_cache, kv)  # doctest: +SKIP
    """
    geometry, options = check_attention_args(q, q_pos, k_cache, v_cache, kv, causal=causal, sm_scale=sm_scale,
                                             window_left=window_left, softcap=softcap, sinks=sinks)
    num_segments = kv.num_segments
    check_tensor("qo_indptr", qo_indptr, dtypes=(torch.int32,), shape=(num_segments + 1,), device=q.device,
                 contiguous=True)
    check_indptr("qo_indptr", qo_indptr, end=q.shape[0], end_name="num_tokens")
    _check_num_splits(num_splits)
    per_segment = max(num_segments, 1)  # tuned-config bucket: mean query and KV (page capacity) per segment
    config = _configs.select_config("prefill", head_dim=geometry.head_dim, group=geometry.group,
                                    page_size=geometry.page_size, dtype=q.dtype, q_len=q.shape[0] / per_segment,
                                    kv_len=kv.indices.numel() * geometry.page_size / per_segment, device=q.device)
    # Work tiles per segment, counted on the device (no host sync); the grid is an upper bound on them.
    rows = (qo_indptr[1:] - qo_indptr[:-1]) * geometry.group
    tile_indptr = torch.zeros(num_segments + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(cdiv(rows, config.block_m), 0, dtype=torch.int32, out=tile_indptr[1:])
    num_tiles = cdiv(q.shape[0] * geometry.group, config.block_m) + num_segments
    if num_splits is None:
        max_kv = kv.indices.numel() * geometry.page_size  # an upper bound known without a sync
        num_splits = choose_splits(num_tiles * geometry.num_kv_heads, max_kv, config.block_n, q.device,
                                   config.waves, whole_rounds=True)
    return _run(q, q_pos, qo_indptr, tile_indptr, num_tiles, k_cache, v_cache, kv, geometry, options, config,
                num_splits, reverse_tiles=causal)


def paged_decode(q, q_pos, k_cache, v_cache, kv, *, causal=True, sm_scale=None, window_left=None, softcap=None,
                 sinks=None, num_splits=None):
    """Attention of one query token per segment (a decode step) against a paged KV cache, split-KV.

    The query heads that share a KV head run in one program, so each KV byte is read once; long
    segments are cut into ``num_splits`` parts processed in parallel and merged.

    Parameters
    ----------
    q : ``[S, num_q_heads, head_dim]``: token ``s`` reads KV segment ``s``.
    q_pos : ``[S]`` int32 global positions.
    k_cache, v_cache, kv, causal, sm_scale, window_left, softcap, sinks : as in :func:`paged_prefill`.
    num_splits : KV splits per segment (None: chosen from ``S x num_kv_heads`` against the GPU's SMs).

    Returns
    -------
    o : ``[S, num_q_heads, head_dim]`` in q's dtype; lse : ``[S, num_q_heads]`` fp32 natural log,
    ``-inf`` with ``o = 0`` where no key is visible.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> k_cache, v_cache = torch.randn(2, 8, 16, 2, 64).unbind(0)
    >>> kv = ck.PagedKV(indptr=i32(0, 2, 3), indices=i32(5, 1, 7), lens=i32(20, 9), start_pos=i32(0, 0))
    >>> o, lse = ck.paged_decode(torch.randn(2, 8, 64), i32(19, 8), k_cache, v_cache, kv)  # doctest: +SKIP
    """
    geometry, options = check_attention_args(q, q_pos, k_cache, v_cache, kv, causal=causal, sm_scale=sm_scale,
                                             window_left=window_left, softcap=softcap, sinks=sinks)
    num_segments = kv.num_segments
    if q.shape[0] != num_segments:
        raise ValueError(f"q must hold one token per kv segment ({num_segments}), got {q.shape[0]}")
    _check_num_splits(num_splits)
    config = _configs.select_config("decode", head_dim=geometry.head_dim, group=geometry.group,
                                    page_size=geometry.page_size, dtype=q.dtype, q_len=1,
                                    kv_len=kv.indices.numel() * geometry.page_size / max(num_segments, 1),
                                    device=q.device)
    tiles_per_token = cdiv(geometry.group, config.block_m)
    qo_indptr, tile_indptr = decode_indptrs(num_segments, tiles_per_token, q.device)
    if num_splits is None:
        max_kv = kv.indices.numel() * geometry.page_size
        if tiles_per_token == 1 and gluon_decode(q, k_cache, v_cache, geometry, options, num_segments):
            num_splits = _gluon.decode_splits(num_segments * geometry.num_kv_heads, max_kv, num_sms(q.device))
        else:
            num_splits = choose_splits(num_segments * tiles_per_token * geometry.num_kv_heads, max_kv,
                                       config.block_n, q.device, config.waves)
    return _run(q, q_pos, qo_indptr, tile_indptr, num_segments * tiles_per_token, k_cache, v_cache, kv, geometry,
                options, config, num_splits, reverse_tiles=False, decode_tiles=tiles_per_token)


@functools.lru_cache(maxsize=64)
def decode_indptrs(num_segments: int, tiles_per_token: int, device: torch.device):
    """``qo_indptr`` (one token per segment) and ``tile_indptr`` of a decode batch; cached, since a decode
    step of the same batch size needs the same two read-only tensors (no launch, no allocation)."""
    qo_indptr = torch.arange(num_segments + 1, dtype=torch.int32, device=device)
    return qo_indptr, qo_indptr * tiles_per_token
