"""The paged attention kernel behind prefill, decode and every cascade level; wrappers are in ``attention.py``.

One program computes, for one KV head, a tile of BLOCK_M query rows of one segment against one split of
that segment's KV. Rows are (query token, query head of the KV head's group) pairs, token-major, so the
query heads that share a KV head are packed into the M tile (GQA) and each KV tile is loaded once for
the whole group: decode (one token per segment) fills a 16-row tile with a group of 4 heads.

Masks compare global positions only: KV token ``j`` of segment ``s`` sits at ``start_pos[s] + j`` and is
visible to a query at ``q_pos`` iff ``kv_pos <= q_pos`` (causal) and ``kv_pos >= q_pos - window_left``.
The KV range a tile can see is computed from the tile's smallest and largest query positions, so tiles
the mask hides are never loaded, and the tiles it shows entirely run without any mask arithmetic.

Softmax runs in base 2 (``exp2``) on logits pre-multiplied by log2(e); the lse written out is converted
back to the natural log. A row that sees no key keeps ``m = -inf``; the running maximum is replaced by 0
before it is subtracted, so ``-inf - -inf`` never forms a NaN, and the row ends as ``o = 0, lse = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import dot, launch_dependents

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(y):
    """tanh in fp32 without libdevice, accurate to a few ulp relative everywhere.

    ``1 - 2 / (exp(2y) + 1)`` is right at both tails (exp2 overflows to inf -> 1, underflows to 0 -> -1)
    but loses all relative accuracy near 0, where a large soft cap puts every logit (softcap 1e4:
    y ~ 1e-4, so the cancellation would cost ~1e-3 absolute in the logit). There the odd Taylor series
    is used: for |y| < 0.1 its first omitted term, 62 y^9 / 2835, is below 1e-10 relative.
    """
    y2 = y * y
    series = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0))))
    closed = 1.0 - 2.0 / (tl.exp2(y * (2.0 * LOG2E)) + 1.0)
    return tl.where(tl.abs(y) < 0.1, series, closed)


@triton.jit
def _tile_scores(q, k, q_pos, offs_n, kv_start, kv_len, qk_scale, softcap,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, window_left,
                 HAS_SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr):
    """Base-2 logits ``[BLOCK_M, BLOCK_N]`` of one KV tile, ``-inf`` where the mask hides a key."""
    s = dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), INTERPRET)
    if HAS_SOFTCAP:
        s = (softcap * LOG2E) * _tanh(s * (qk_scale / softcap))
    else:
        s = s * (qk_scale * LOG2E)
    if MASKED:
        kv_pos = kv_start + offs_n
        visible = (offs_n < kv_len)[None, :]
        if CAUSAL:
            visible = visible & (kv_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (kv_pos[None, :] >= q_pos[:, None] - window_left)
        s = tl.where(visible, s, -float("inf"))
    return s


@triton.jit
def _live_rows(start, kv_len, limit, BLOCK_N: tl.constexpr):
    """``[BLOCK_N]`` mask: rows inside the segment, of a tile that starts before ``limit``."""
    offs_n = start + tl.arange(0, BLOCK_N)
    return (offs_n < kv_len) & ((start + tl.zeros([BLOCK_N], tl.int32)) < limit)


@triton.jit
def _page_ids(page_table_ptr, start, kv_len, limit, page_size, BLOCK_N: tl.constexpr, PAGE_ALIGNED: tl.constexpr,
              TMA: tl.constexpr):
    """Page ids of KV tokens ``start ... start + BLOCK_N - 1`` of a segment: ``[BLOCK_N]`` int64, or with
    ``TMA`` the scalar id of the tile's first page (the tile lies in one page or one run of consecutive pages).

    A tile starting at or past ``limit`` (a read past the loop's end) reads no page id.
    """
    if TMA:
        page = tl.load(page_table_ptr + start // page_size, mask=start < limit, other=0)  # int32: rows < 2^31
    else:
        if PAGE_ALIGNED:
            # the whole tile lies in one page, or in consecutive pages of a row-contiguous cache (a page
            # run, checked by the plan): every row reads the tile's first page id
            page_entry = start // page_size + tl.zeros([BLOCK_N], tl.int32)
        else:
            page_entry = (start + tl.arange(0, BLOCK_N)) // page_size
        ok = _live_rows(start, kv_len, limit, BLOCK_N)
        page = tl.load(page_table_ptr + page_entry, mask=ok, other=0).to(tl.int64)
    return page


@triton.jit
def _tile_rows(page, start, page_size, s_p, s_s, BLOCK_N: tl.constexpr, PAGE_ALIGNED: tl.constexpr):
    """Cache row offsets ``[BLOCK_N]`` (int64) of KV tokens ``start ... start + BLOCK_N - 1`` on pages ``page``."""
    if PAGE_ALIGNED:
        slot = (start % page_size + tl.arange(0, BLOCK_N)).to(tl.int64)  # contiguous rows from the first page
    else:
        slot = ((start + tl.arange(0, BLOCK_N)) % page_size).to(tl.int64)
    return page * s_p + slot * s_s


@triton.jit
def _load_kv(ptrs, row_ok, mask_d, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_D]`` key or value tile; zeros outside ``row_ok`` (when ROW_MASK) and the head dim."""
    if ROW_MASK:
        return tl.load(ptrs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask_d[None, :], other=0.0)


@triton.jit
def _load_tile(k_src, v_src, page, start, kv_len, limit, page_size, s_kp, s_ks, s_kd, s_vp, s_vs, s_vd,
               offs_d, mask_d, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               PAGE_ALIGNED: tl.constexpr, TMA: tl.constexpr):
    """Key and value tiles ``[BLOCK_N, BLOCK_D]`` of KV tokens from ``start`` on pages ``page`` (``_page_ids``);
    both loads issued together.

    ``k_src``/``v_src`` are pointers to this KV head's slice of the caches, or with ``TMA`` tensor
    descriptors over ``[pages * page_size, head_dim]`` row views of them: the tile lies in one page or one
    run of consecutive pages (``PAGE_ALIGNED``), so it is one block copy from row
    ``page * page_size + start % page_size``.
    """
    row_ok = _live_rows(start, kv_len, limit, BLOCK_N)
    if TMA:
        row = page * page_size + start % page_size
        k = k_src.load([row, 0])
        v = v_src.load([row, 0])
        if ROW_MASK:
            # rows past the segment's end hold whatever the page holds (NaN included): the scores mask
            # hides them from the logits, and this keeps 0 * NaN out of p @ v
            v = tl.where(row_ok[:, None], v, 0.0)
    else:
        k_rows = _tile_rows(page, start, page_size, s_kp, s_ks, BLOCK_N, PAGE_ALIGNED)
        v_rows = _tile_rows(page, start, page_size, s_vp, s_vs, BLOCK_N, PAGE_ALIGNED)
        k = _load_kv(k_src + k_rows[:, None] + offs_d[None, :] * s_kd, row_ok, mask_d, ROW_MASK, EVEN_D)
        v = _load_kv(v_src + v_rows[:, None] + offs_d[None, :] * s_vd, row_ok, mask_d, ROW_MASK, EVEN_D)
    return k, v


@triton.jit
def _attend_range(
    acc, l_i, m_i, q, q_pos,
    k_ptr, v_ptr, page_table_ptr, page_size,
    s_kp, s_ks, s_kd, s_vp, s_vs, s_vd,
    offs_d, kv_start, kv_len, qk_scale, softcap, window_left,
    lo, hi,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PAGE_ALIGNED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, LOOKAHEAD: tl.constexpr, TMA: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Online-softmax accumulation over the KV tiles starting in ``[lo, hi)`` (``lo`` BLOCK_N-aligned).

    ``k_ptr``/``v_ptr`` already point at this KV head; ``page_table_ptr`` at the segment's first page id.
    Without ``MASKED`` every key of every tile is visible to every row and inside the segment.
    With ``PREFETCH`` the next tile's keys and values are loaded into registers before this tile is
    computed, so a memory-bound program (decode) always has a tile in flight; otherwise the compiler's
    software pipeline (``num_stages``) overlaps loads and math. With ``LOOKAHEAD`` the next tile's page ids
    are read while this tile is computed: the tile loads then depend on no load of their own iteration, and
    the pipeline keeps ``num_stages - 1`` tiles in flight (without it, the page-id load and the tile load
    it feeds share the stages, and nothing overlaps below 5).
    """
    mask_d = offs_d < HEAD_DIM
    if PREFETCH:
        page = _page_ids(page_table_ptr, lo, kv_len, hi, page_size, BLOCK_N, PAGE_ALIGNED, False)
        k_next, v_next = _load_tile(k_ptr, v_ptr, page, lo, kv_len, hi, page_size, s_kp, s_ks, s_kd, s_vp, s_vs,
                                    s_vd, offs_d, mask_d, True, EVEN_D, BLOCK_N, PAGE_ALIGNED, False)
    if LOOKAHEAD:
        page_next = _page_ids(page_table_ptr, lo, kv_len, hi, page_size, BLOCK_N, PAGE_ALIGNED, TMA)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if PREFETCH:
            k = k_next
            v = v_next
            page = _page_ids(page_table_ptr, start + BLOCK_N, kv_len, hi, page_size, BLOCK_N, PAGE_ALIGNED, False)
            k_next, v_next = _load_tile(k_ptr, v_ptr, page, start + BLOCK_N, kv_len, hi, page_size,
                                        s_kp, s_ks, s_kd, s_vp, s_vs, s_vd, offs_d, mask_d,
                                        True, EVEN_D, BLOCK_N, PAGE_ALIGNED, False)
        else:
            if LOOKAHEAD:
                page = page_next
                page_next = _page_ids(page_table_ptr, start + BLOCK_N, kv_len, hi, page_size, BLOCK_N,
                                      PAGE_ALIGNED, TMA)
            else:
                page = _page_ids(page_table_ptr, start, kv_len, hi, page_size, BLOCK_N, PAGE_ALIGNED, TMA)
            k, v = _load_tile(k_ptr, v_ptr, page, start, kv_len, hi, page_size,
                              s_kp, s_ks, s_kd, s_vp, s_vs, s_vd, offs_d, mask_d,
                              MASKED or (not EVEN_D), EVEN_D, BLOCK_N, PAGE_ALIGNED, TMA)
        s = _tile_scores(q, k, q_pos, offs_n, kv_start, kv_len, qk_scale, softcap,
                         MASKED, CAUSAL, HAS_WINDOW, window_left, HAS_SOFTCAP, INTERPRET)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _tile_segment(tile, tile_indptr_ptr, num_segments, DECODE_TILES: tl.constexpr):
    """The segment owning work tile ``tile``; ``>= num_segments`` past the last tile (the grid is an upper
    bound). Scalar code, shared by the ``tl`` and the Gluon kernel.

    ``DECODE_TILES > 0`` promises one query token a segment in that many tiles: the segment follows by
    division, with no load. Otherwise a binary search of ``tile_indptr`` (no host-side work list): log2(S)
    loads one after another before anything else can start.
    """
    if DECODE_TILES > 0:
        seg = tile // DECODE_TILES
    else:
        lo_s = 0
        hi_s = num_segments
        while lo_s < hi_s:
            mid = (lo_s + hi_s) // 2
            if tl.load(tile_indptr_ptr + mid + 1) <= tile:
                lo_s = mid + 1
            else:
                hi_s = mid
        seg = lo_s
    return seg


@triton.jit
def _causal_kv_range(q_min, q_max, kv_len, kv_start):
    """Causal masking of a tile whose queries sit at positions ``q_min .. q_max`` over a segment of ``kv_len``
    keys from position ``kv_start``: the keys ``[0, hi)`` some query sees and ``[0, full_hi)`` every query
    sees. Scalar code, shared by the ``tl`` and the Gluon kernel."""
    hi = tl.minimum(kv_len, tl.maximum(q_max - kv_start + 1, 0))
    full_hi = tl.minimum(hi, tl.maximum(q_min - kv_start + 1, 0))
    return hi, full_hi


@triton.jit
def _segment_tile(seg, tile, tile_indptr_ptr, qo_indptr_ptr, DECODE_TILES: tl.constexpr):
    """Of work tile ``tile`` in segment ``seg`` (a real one: ``seg < num_segments``): the segment's number of
    work tiles, the tile's index among them, and the segment's first query token and token count.

    A kernel returns past the last tile before calling this: Triton 3.9 does not software-pipeline the KV
    loop of the ``tl`` kernel when these loads come before that return (``tests/test_sm90_compile.py``).
    """
    if DECODE_TILES > 0:
        num_tiles = tile * 0 + DECODE_TILES
        local = tile % DECODE_TILES
        q_start = seg
        q_len = seg * 0 + 1
    else:
        first_tile = tl.load(tile_indptr_ptr + seg)
        num_tiles = tl.load(tile_indptr_ptr + seg + 1) - first_tile
        local = tile - first_tile
        q_start = tl.load(qo_indptr_ptr + seg)
        q_len = tl.load(qo_indptr_ptr + seg + 1) - q_start
    return num_tiles, local, q_start, q_len


# Batch-dependent integers are not specialized (Triton would otherwise compile a new variant when, say,
# the number of segments crosses a multiple of 16 in the middle of serving).
@triton.jit(do_not_specialize=["num_segments", "num_splits", "num_pages", "window_left", "slot_offset"])
def _paged_attention_kernel(
    q_ptr,            # [num_tokens, num_q_heads, head_dim]
    q_pos_ptr,        # [num_tokens] int32
    qo_indptr_ptr,    # [S + 1] int32
    tile_indptr_ptr,  # [S + 1] int32: work tiles of segments before s (cumulative)
    k_ptr, v_ptr,     # [num_pages, page_size, num_kv_heads, head_dim], any strides
    kv_indptr_ptr,    # [S + 1] int32
    kv_indices_ptr,   # [num_used_pages] int32
    kv_lens_ptr,      # [S] int32
    kv_start_ptr,     # [S] int32
    sinks_ptr,        # [num_q_heads] fp32, read only when HAS_SINKS
    o_ptr,            # final: [num_tokens, num_q_heads, head_dim]; split: [num_tokens, slots, num_q_heads, head_dim] fp32
    lse_ptr,          # final: [num_tokens, num_q_heads] fp32; split: [num_tokens, slots, num_q_heads] fp32
    num_segments, num_kv_heads, num_splits, num_pages, page_size, qk_scale, softcap, window_left, slot_offset,
    s_qt, s_qh, s_qd,
    s_kp, s_ks, s_kh, s_kd,
    s_vp, s_vs, s_vh, s_vd,
    s_ot, s_oslot, s_oh, s_od,
    s_lt, s_lslot, s_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    PAGE_ALIGNED: tl.constexpr, REVERSE_TILES: tl.constexpr, PREFETCH: tl.constexpr, LOOKAHEAD: tl.constexpr,
    TMA: tl.constexpr, DECODE_TILES: tl.constexpr, INTERPRET: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    """Grid ``(work tiles * num_kv_heads * num_splits,)``. Writes normalised ``o`` and natural-log ``lse`` of
    its rows for its split (slot ``slot_offset + split``); the wrapper merges splits when there are several.
    ``LAUNCH_DEPENDENTS``: the merge after it may start its programs early (``_triton.launch_dependents``).
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads HEAD_DIM")
    tl.static_assert(not TMA or (PAGE_ALIGNED and not PREFETCH), "block copies need page-aligned tiles")
    tl.static_assert(not (PREFETCH and LOOKAHEAD), "register prefetch already reads a tile ahead")
    launch_dependents(LAUNCH_DEPENDENTS)
    # One flat grid, KV head fastest, then split, then work tile: the programs that run side by side
    # read the same pages (each head's slice of them), so a page is fetched from DRAM while it is hot.
    pid = tl.program_id(0)
    kv_head = pid % num_kv_heads
    split = (pid // num_kv_heads) % num_splits
    tile = pid // (num_kv_heads * num_splits)

    seg = _tile_segment(tile, tile_indptr_ptr, num_segments, DECODE_TILES)
    if seg >= num_segments:
        return  # the grid is an upper bound on the number of tiles
    num_tiles, local, q_start, q_len = _segment_tile(seg, tile, tile_indptr_ptr, qo_indptr_ptr, DECODE_TILES)
    if REVERSE_TILES:
        local = num_tiles - 1 - local  # causal: the last rows see the most keys, start them first

    rows = local * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * GROUP
    token = (q_start + rows // GROUP).to(tl.int64)
    head = (kv_head * GROUP + rows % GROUP).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + token[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    q_pos = tl.load(q_pos_ptr + token, mask=row_ok, other=0)

    # The KV range [lo, hi) some row of this tile can see, and the part [full_lo, full_hi) every row sees.
    kv_len = tl.load(kv_lens_ptr + seg)
    kv_start = tl.load(kv_start_ptr + seg)
    lo = 0
    hi = kv_len
    full_lo = 0
    full_hi = kv_len
    if CAUSAL:
        q_max = tl.max(tl.where(row_ok, q_pos, -2147483647), 0)
        q_min = tl.min(tl.where(row_ok, q_pos, 2147483647), 0)
        hi, full_hi = _causal_kv_range(q_min, q_max, kv_len, kv_start)
        if HAS_WINDOW:
            lo = tl.minimum(tl.maximum(q_min - window_left - kv_start, 0), hi)
            full_lo = tl.minimum(tl.maximum(q_max - window_left - kv_start, lo), hi)
    # This program's split of [lo, hi), in whole KV tiles.
    lo = lo // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    a = tl.minimum(lo + split * per_split, hi)
    b = tl.minimum(a + per_split, hi)
    # Unmasked middle: whole tiles inside [full_lo, full_hi); masked before and after it.
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, a), b)
    mid_hi = tl.maximum(tl.minimum(full_hi // BLOCK_N * BLOCK_N, b), mid_lo)

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    page_table = kv_indices_ptr + tl.load(kv_indptr_ptr + seg)
    k_head = k_ptr + kv_head.to(tl.int64) * s_kh
    v_head = v_ptr + kv_head.to(tl.int64) * s_vh
    if TMA:
        # the cache viewed as rows of one KV head: row page * page_size + slot (the host checked that
        # pages are row-contiguous, strides 16-byte multiples, and pages * page_size < 2^31)
        k_head = tl.make_tensor_descriptor(k_head, shape=[num_pages * page_size, HEAD_DIM], strides=[s_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_head = tl.make_tensor_descriptor(v_head, shape=[num_pages * page_size, HEAD_DIM], strides=[s_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, q_pos, k_head, v_head, page_table, page_size, s_kp, s_ks, s_kd, s_vp, s_vs, s_vd,
        offs_d, kv_start, kv_len, qk_scale, softcap, window_left, a, mid_lo,
        True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PAGE_ALIGNED, BLOCK_D == HEAD_DIM, HEAD_DIM, BLOCK_N, PREFETCH,
        LOOKAHEAD, TMA, INTERPRET)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, q_pos, k_head, v_head, page_table, page_size, s_kp, s_ks, s_kd, s_vp, s_vs, s_vd,
        offs_d, kv_start, kv_len, qk_scale, softcap, window_left, mid_lo, mid_hi,
        False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PAGE_ALIGNED, BLOCK_D == HEAD_DIM, HEAD_DIM, BLOCK_N, PREFETCH,
        LOOKAHEAD, TMA, INTERPRET)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, q_pos, k_head, v_head, page_table, page_size, s_kp, s_ks, s_kd, s_vp, s_vs, s_vd,
        offs_d, kv_start, kv_len, qk_scale, softcap, window_left, mid_hi, b,
        True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PAGE_ALIGNED, BLOCK_D == HEAD_DIM, HEAD_DIM, BLOCK_N, PREFETCH,
        LOOKAHEAD, TMA, INTERPRET)

    if HAS_SINKS:
        # One more logit per head, value vector zero: it only grows the denominator. Applied only
        # when this launch writes final states (a split launch leaves it to the merge).
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0) * LOG2E
        m_f = tl.maximum(m_i, sink)
        m_f = tl.where(m_f == -float("inf"), 0.0, m_f)
        scale = tl.exp2(m_i - m_f)
        acc = acc * scale[:, None]
        l_i = l_i * scale + tl.exp2(sink - m_f)
        m_i = m_f
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)

    slot = (slot_offset + split).to(tl.int64)
    tl.store(o_ptr + token[:, None] * s_ot + slot * s_oslot + head[:, None] * s_oh + offs_d[None, :] * s_od,
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])
    tl.store(lse_ptr + token * s_lt + slot * s_lslot + head * s_lh, lse, mask=row_ok)
