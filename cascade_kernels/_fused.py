"""When a cascade plan runs its shared level and its per-request decode level as one launch, and that launch.

The kernel (``_cascade_gluon.py``) is the Gluon prefill program of ``_attention_gluon.py`` with decode warps
beside its MMA warpgroups: each SM then streams the per-request KV (memory-bound) while it computes the
shared level's tiles (compute-bound), where two launches run one after the other. Measured on an H200
(NOTES.md, cascade v15-v17): 1.02-1.22x on the cascades the rule below fuses (2k-32k shared prefix, 32-256
requests).

A plan asks ``pick`` once (it needs no tensors): a Hopper GPU with Gluon (``CASCADE_KERNELS_GLUON=0`` turns
this off too), fp16/bf16, head_dim 64 or 128,
pages of 16 slots, GQA groups up to 8, no window or soft cap (sinks are applied by the merge); a decode
level whose segments hold one query token each (its split count then 1: the kernel's decode warps take a
whole request each); a prefill level on the Gluon tile whose launch fills the GPU (its programs carry the
decode work, so fewer would leave SMs without either); and a decode level whose estimated time is at least a
quarter of the shared level's (``MIN_DECODE_SHARE``), unless the shared level has at most two query tiles a KV
head (``MAX_LIGHT_TILES``). ``page_rows`` decides at run time, from the
caches, whether the launch can take it (``_gluon.page_rows``'s block-copy conditions); a plan whose caches
do not qualify launches its levels one by one, with the same slots.
"""

from __future__ import annotations

import functools

import torch

from . import _gluon
from ._launch import Launcher
from ._tma import ensure_allocator
from ._triton import interpreting

BLOCK_N = 64  # keys a shared-level tile: three stages of K and V in 96 KB leave shared memory to the decode warps
STAGES = 3  # 2 here and 4 for the decode warps: 1.07x slower at batch 256 and 1.11x at 64 (NOTES.md, cascade v17)
DECODE_STAGES = 3  # tiles of two pages in flight per decode warp: 96 KB in all
CONSUMER_REGS = 176  # registers a thread of the second MMA warpgroup (the first gets the rest)
DECODE_REGS = 160  # of the warpgroup holding the loader and decode warps
PRODUCER_REGS = 24
PAGE_SIZE = 16
MIN_FILL = 0.75  # the prefill launch's programs, as a share of the SMs, below which nothing is fused
MAX_ROUNDS = 2  # ... and the most programs an SM, above which neither was measured
# The decode level's estimated time over the shared level's, below which nothing is fused: the fused kernel's
# shared part runs slower than the plain Gluon launch (64-key tiles, fewer registers), and the two parts share the
# L2 (the shared level reads the prefix once per query tile of a KV head, the decode level all of its KV), so the
# decode work must be large enough to repay it. Measured on an H200 (NOTES.md, cascade v17): with three or more
# query tiles a KV head, a ratio of 0.08-0.17 lost 3-6%, 0.33 won 2-6%, 0.67 and up 8-21%. The estimates: the
# shared level's FLOPs at ~600 TFLOP/s, the decode level's bytes at the ~3.5 TB/s its two warps an SM read.
MIN_DECODE_SHARE = 0.25
# ... except where the shared level has at most this many query tiles a KV head (it reads the prefix that few
# times, leaving L2 room for the decode level): there any decode level repaid it (1.04-1.22x, ratios 0.08-1.34).
MAX_LIGHT_TILES = 2
SHARED_FLOPS_PER_S = 600e12
DECODE_BYTES_PER_S = 3.5e12


@functools.lru_cache(maxsize=None)
def launcher() -> Launcher | None:
    """The launcher over the fused kernel, or None where this Triton cannot build it."""
    return _gluon.optional_launcher("_cascade_gluon", "_cascade_fused_gluon")


def pick(launches, geometry, options, dtype: torch.dtype, device: torch.device, num_sms: int):
    """``(shared, decode)``: indices into ``launches`` (a plan's ``LevelLaunch`` list) of the prefill level
    and the decode level to run as one launch, or None. The decode level's ``num_splits`` must then be 1."""
    if interpreting() or not _gluon.enabled() or not _gluon._is_hopper(device) or launcher() is None:
        return None
    g = geometry
    if dtype not in (torch.float16, torch.bfloat16) or g.head_dim not in _gluon.HEAD_DIMS:
        return None
    if g.page_size != PAGE_SIZE or g.group > 8 or options.window_left is not None or options.softcap is not None:
        return None
    decode = [i for i, lv in enumerate(launches) if lv.kind == "decode" and lv.decode_tiles and lv.num_tiles]
    shared = [i for i, lv in enumerate(launches)
              if lv.kind == "prefill" and lv.num_tiles and lv.config.block_m == _gluon.BLOCK_M]
    if not decode or not shared:
        return None
    s, d = max(shared, key=lambda i: launches[i].num_tiles * launches[i].max_kv_len), decode[-1]
    sl, dl = launches[s], launches[d]
    programs = sl.num_tiles * g.num_kv_heads * sl.num_splits
    if not MIN_FILL * num_sms <= programs <= MAX_ROUNDS * num_sms:
        return None
    # per KV head, upper bounds from the plan's sizes: every query row of the shared tiles against its longest
    # segment; every decode segment as long as the longest
    shared_s = sl.num_tiles * sl.config.block_m * sl.max_kv_len * 4 * g.head_dim / SHARED_FLOPS_PER_S
    decode_s = (dl.num_tiles // dl.decode_tiles) * dl.max_kv_len * 2 * g.head_dim * dtype.itemsize / DECODE_BYTES_PER_S
    if sl.num_tiles > MAX_LIGHT_TILES and decode_s < MIN_DECODE_SHARE * shared_s:
        return None
    return s, d


def page_rows(q, k_cache, v_cache, geometry, shared) -> int:
    """Rows of one block copy of the ``shared`` level's tiles when the fused launch applies to these tensors,
    else 0. The plan found page runs of its config's tiles; they are runs of this kernel's 64-key tiles only
    where those nest in them."""
    runs = shared.page_runs and shared.config.block_n % BLOCK_N == 0
    rows = _gluon.page_rows(q, k_cache, v_cache, geometry.head_dim, _gluon.BLOCK_M, None, None, False, runs)
    return min(rows, BLOCK_N)  # a 128-row copy (a run, or pages of 128+) is two of the fused kernel's tiles


def launch(q, q_pos, k_cache, v_cache, shared, decode, geometry, options, o, lse, rows: int):
    """One launch of both levels into the split scratch ``o [N, slots, Hq, D]``/``lse [N, slots, Hq]``:
    ``shared``'s splits at its slots, ``decode`` (one split) at its slot."""
    g = geometry
    ensure_allocator()
    grid = (shared.num_tiles * g.num_kv_heads * shared.num_splits,)
    launcher()(
        grid, q, q_pos, shared.qo_indptr, shared.tile_indptr, k_cache, v_cache,
        shared.kv.indptr, shared.kv.indices, shared.kv.lens, shared.kv.start_pos, o, lse,
        decode.qo_indptr, decode.kv.indptr, decode.kv.indices, decode.kv.lens, decode.kv.start_pos,
        shared.kv.num_segments, g.num_kv_heads, shared.num_splits, g.num_pages, g.page_size, options.sm_scale,
        shared.slot_offset, decode.kv.num_segments, decode.slot_offset,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *o.stride(), *lse.stride(),
        GROUP=g.group, HEAD_DIM=g.head_dim, BLOCK_M=_gluon.BLOCK_M, BLOCK_N=BLOCK_N, PAGE_ROWS=rows, STAGES=STAGES,
        CAUSAL=options.causal, REVERSE_TILES=options.causal, PRODUCER_REGS=PRODUCER_REGS,
        CONSUMER_REGS=CONSUMER_REGS, DECODE_STAGES=DECODE_STAGES,
        DECODE_REGS=DECODE_REGS, num_warps=_gluon.NUM_WARPS,
    )
