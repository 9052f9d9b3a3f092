"""The paged decode kernel for Hopper written in Gluon: a few one-warp partitions a program, no CTA-wide barrier.

One program computes one query token's ``GROUP`` query heads of one KV head over one split of its segment's KV
(grid ``segments x KV heads x splits``, KV head fastest, as ``_attention_kernel``). The split's KV tiles of 16
keys (a block copy each from one page) are dealt round-robin to ``PARTS`` one-warp partitions (warp
specialization); each runs its own ``STAGES``-deep ring of shared-memory tiles behind its own mbarriers, so no
warp ever waits for another inside the loop (the ``tl`` kernel's multi-warp program had two CTA-wide barriers
a tile, NOTES.md decode v11). At the end each partition leaves its online-softmax state (max, sum, unnormalised
``O^T``) in shared memory and arrives on one mbarrier; the program's own warpgroup merges the ``PARTS`` states and
writes ``o`` and ``lse`` (with the sinks where it writes the final output), so a split of one needs no merge
launch: at (batch 32, 4096 tokens) one 4-warp program a (request, KV head), as FlashInfer's decode, instead of
three one-warp programs and a merge.

The tile math is ``_decode_tiles``, shared with the fused cascade kernel's decode warps (``_cascade_gluon``):
transposed, so the few query heads are the MMA's narrow side (``S^T = K Q^T`` ``[keys, 8]``, ``O^T += V^T P^T``
``[D, 8]`` on ``mma_v2``), in two halves of the head dims so that no operand holds more than 32 registers.

What it handles: Hopper, fp16/bf16, head_dim 64 or 128, GQA groups of up to 8, pages of a multiple of 16
tokens in a cache whose pages are row-contiguous (NHD), causal or not, sinks; no window or soft cap; batches
whose (request, KV head) pairs fit one round of programs (two an SM). Which launches take it is
``_gluon.decode_takes``'s and ``decode_caches_ok``'s decision; the rest take the ``tl`` kernel. Measured on an
H200 (NOTES.md decode v14): 1.005-1.02x FlashInfer's tensor-core decode at batch 32 and at (1, 131072).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from ._attention_kernel import _causal_kv_range, _segment_tile, _tile_segment
from ._attention_gluon import LN2, LOG2E, _cta_barrier, _invalidate, _io_layout, _tma_load

BOX: gl.constexpr = gl.constexpr(16)  # rows of one block copy; pages are a multiple of it
NQ: gl.constexpr = gl.constexpr(8)  # the MMA's narrow side: query heads of one KV head, padded


@gluon.constexpr_function
def _mma_layout(num_warps):
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])


@gluon.jit
def _tile_rows(pages, last, page_size, key0, BOXES: gl.constexpr):
    """Cache rows of the (one or two) 16-key boxes of the tile starting at key ``key0``; a box past the
    segment's last page (``last``: its page-table entry) reads that page instead (its keys are masked).
    ``page_size`` should be a constant: as a runtime value its division on this path cost the fused kernel 12-30%
    (NOTES.md cascade v18)."""
    row0 = gl.load(pages + gl.minimum(key0 // page_size, last)) * page_size + key0 % page_size
    row1 = row0
    if BOXES == 2:
        key1 = key0 + BOX
        row1 = gl.load(pages + gl.minimum(key1 // page_size, last)) * page_size + key1 % page_size
    return row0, row1


@gluon.jit
def _copy_tile(k_desc, v_desc, k_buf, v_buf, bar, row0, row1):
    """Block copies of K and V rows ``row0 ..`` (and ``row1 ..`` for a two-box tile) into a stage."""
    BOXES: gl.constexpr = k_buf.shape[0] // BOX
    nbytes: gl.constexpr = 2 * k_buf.shape[0] * k_buf.shape[1] * k_buf.dtype.primitive_bitwidth // 8
    mbarrier.expect(bar, nbytes)
    if BOXES == 1:
        _tma_load(k_desc, [row0, 0], bar, k_buf)
        _tma_load(v_desc, [row0, 0], bar, v_buf)
    else:
        _tma_load(k_desc, [row0, 0], bar, k_buf.slice(0, BOX))
        _tma_load(k_desc, [row1, 0], bar, k_buf.slice(BOX, BOX))
        _tma_load(v_desc, [row0, 0], bar, v_buf.slice(0, BOX))
        _tma_load(v_desc, [row1, 0], bar, v_buf.slice(BOX, BOX))


@gluon.jit
def _decode_q(q_ptr, token, kv_head, s_qt, s_qh, s_qd, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr):
    """``Q^T`` of the token's ``GROUP`` query heads of ``kv_head``, as the two ``[D / 2, NQ]`` halves of the
    MMA's B operand (columns past the group are zeros)."""
    HALF: gl.constexpr = HEAD_DIM // 2
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=_mma_layout(gl.num_warps()), k_width=2)
    offs_q = gl.arange(0, NQ, layout=gl.SliceLayout(0, b_l))
    offs_d = gl.arange(0, HALF, layout=gl.SliceLayout(1, b_l))
    base = q_ptr + token.to(gl.int64) * s_qt + (kv_head * GROUP + offs_q).to(gl.int64)[None, :] * s_qh
    mask = (offs_q < GROUP)[None, :]
    q_lo = gl.load(base + offs_d[:, None] * s_qd, mask=mask, other=0.0)
    q_hi = gl.load(base + (offs_d[:, None] + HALF) * s_qd, mask=mask, other=0.0)
    return q_lo, q_hi


@gluon.jit
def _decode_tiles(q_lo, q_hi, pages, last, page_size, hi, first, step, count, scale,
                  k_desc, v_desc, k_smem, v_smem, ready, it):
    """Online softmax (base 2) of one token's query heads over KV tiles ``first, first + step, ...`` (``count``
    of them; tile ``t`` holds keys ``t * BLOCK_N ..``, keys at or past ``hi`` hidden), copied ``STAGES`` ahead
    into ``k_smem``/``v_smem`` ``[STAGES, BLOCK_N, D]`` (``ready``: an mbarrier a stage; ``it``: the tiles this
    warp copied through them before). Returns ``(m, l, acc_lo, acc_hi)``: running max and sum ``[NQ]`` and the
    unnormalised ``O^T`` halves ``[D / 2, NQ]``."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    BOXES: gl.constexpr = BLOCK_N // BOX
    HALF: gl.constexpr = HEAD_DIM // 2
    dtype: gl.constexpr = k_smem.dtype
    mma: gl.constexpr = _mma_layout(gl.num_warps())
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    io: gl.constexpr = _io_layout(HEAD_DIM, gl.num_warps())
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    offs_k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs_r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, io))

    fence_async_shared()  # earlier reads of these stages come before the copies into them
    for i in gl.static_range(STAGES):
        if i < count:
            st = (it + i) % STAGES
            row0, row1 = _tile_rows(pages, last, page_size, (first + i * step) * BLOCK_N, BOXES)
            _copy_tile(k_desc, v_desc, k_smem.index(st), v_smem.index(st), ready.index(st), row0, row1)
    m_i = gl.full([NQ], -float("inf"), gl.float32, layout=cols)
    l_i = gl.zeros([NQ], gl.float32, layout=cols)
    acc_lo = gl.zeros([HALF, NQ], gl.float32, layout=mma)
    acc_hi = gl.zeros([HALF, NQ], gl.float32, layout=mma)
    for j in range(count):
        st = (it + j) % STAGES
        nxt = j + STAGES
        # the page ids of the tile this stage takes next: loads in flight during this tile
        row0, row1 = _tile_rows(pages, last, page_size, (first + gl.minimum(nxt, count - 1) * step) * BLOCK_N,
                                BOXES)
        mbarrier.wait(ready.index(st), ((it + j) // STAGES) & 1)
        k_buf = k_smem.index(st)
        v_buf = v_smem.index(st)
        s = mma_v2(k_buf.slice(0, HALF, dim=1).load(a_l), q_lo, gl.zeros([BLOCK_N, NQ], gl.float32, mma))
        s = mma_v2(k_buf.slice(HALF, HALF, dim=1).load(a_l), q_hi, s) * scale
        start = (first + j * step) * BLOCK_N
        if start + BLOCK_N > hi:  # keys past the visible end hidden, their V rows zeroed (stale rows may be NaN)
            s = gl.where((start + offs_k < hi)[:, None], s, -float("inf"))
            v_io = v_buf.load(io)
            v_buf.store(gl.where((start + offs_r < hi)[:, None], v_io, gl.zeros_like(v_io)))
            _cta_barrier()
        m_new = gl.maximum(m_i, gl.max(s, 0))
        m_use = gl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[None, :])
        l_i = l_i * alpha + gl.sum(p, 0)
        p_t = gl.convert_layout(p.to(dtype), b_l)
        v_t = v_buf.permute((1, 0))
        acc_lo = mma_v2(v_t.slice(0, HALF, dim=0).load(a_l), p_t, acc_lo * alpha[None, :])
        acc_hi = mma_v2(v_t.slice(HALF, HALF, dim=0).load(a_l), p_t, acc_hi * alpha[None, :])
        m_i = m_new
        if nxt < count:  # this stage's reads are in registers: copy this warp's tile j + STAGES into it
            _cta_barrier()
            fence_async_shared()
            _copy_tile(k_desc, v_desc, k_buf, v_buf, ready.index(st), row0, row1)
    return m_i, l_i, acc_lo, acc_hi


@gluon.jit
def _store_state(o_ptr, lse_ptr, sinks_ptr, token, slot, kv_head, m_i, l_i, acc_lo, acc_hi,
                 s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh, GROUP: gl.constexpr, HAS_SINKS: gl.constexpr):
    """Normalised ``o`` (``o_ptr``'s dtype) and natural-log ``lse`` of a state from ``_decode_tiles`` into ``slot``
    (0 for the final output), the sinks folded in first where ``HAS_SINKS``; ``o = 0, lse = -inf`` where no key
    (and no sink) was visible."""
    HALF: gl.constexpr = acc_lo.shape[0]
    mma: gl.constexpr = acc_lo.type.layout
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    offs_q = gl.arange(0, NQ, layout=cols)
    col_ok = offs_q < GROUP
    head = (kv_head * GROUP + offs_q).to(gl.int64)
    if HAS_SINKS:  # a logit with no value: it adds to the sum only
        sink = gl.load(sinks_ptr + head, mask=col_ok, other=-float("inf")) * LOG2E
        m_new = gl.maximum(m_i, sink)
        m_use = gl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.exp2(sink - m_use)
        acc_lo = acc_lo * alpha[None, :]
        acc_hi = acc_hi * alpha[None, :]
        m_i = m_new
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where(l_i == 0.0, -float("inf"), (m_i + gl.log2(l_safe)) * LN2)
    offs_d = gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
    o_base = o_ptr + token.to(gl.int64) * s_ot + slot * s_oslot + head[None, :] * s_oh
    out_ty: gl.constexpr = o_ptr.dtype.element_ty
    gl.store(o_base + offs_d[:, None] * s_od, (acc_lo / l_safe[None, :]).to(out_ty), mask=col_ok[None, :])
    gl.store(o_base + (offs_d[:, None] + HALF) * s_od, (acc_hi / l_safe[None, :]).to(out_ty), mask=col_ok[None, :])
    gl.store(lse_ptr + token.to(gl.int64) * s_lt + slot * s_lslot + head * s_lh, lse, mask=col_ok)


@gluon.jit
def _ready_barriers(STAGES: gl.constexpr):
    """``STAGES`` mbarriers, initialised for one arrival (the copier's byte count) each."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    return ready


@gluon.jit
def _await_states(done):
    """The program's own warps while the partitions run: wait until all of them left their states."""
    mbarrier.wait(done, 0)


@gluon.jit
def _decode_part(q_ptr, pages, last, page_size, hi, t_lo, t_hi, token, kv_head, scale, k_desc, v_desc,
                 k_smem, v_smem, ready, m_smem, l_smem, lo_smem, hi_smem, done, part,
                 s_qt, s_qh, s_qd, GROUP: gl.constexpr, PARTS: gl.constexpr):
    """One partition (one warp): the split's tiles ``t_lo + part, t_lo + part + PARTS, ...`` below ``t_hi``;
    its state into entry ``part`` of the state buffers, then an arrival on ``done``."""
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    q_lo, q_hi = _decode_q(q_ptr, token, kv_head, s_qt, s_qh, s_qd, GROUP, HEAD_DIM)
    count = gl.maximum(gl.cdiv(t_hi - t_lo - part, PARTS), 0)
    m_i, l_i, acc_lo, acc_hi = _decode_tiles(q_lo, q_hi, pages, last, page_size, hi, t_lo + part, PARTS, count,
                                             scale, k_desc, v_desc, k_smem, v_smem, ready, 0)
    m_smem.index(part).store(m_i)
    l_smem.index(part).store(l_i)
    lo_smem.index(part).store(acc_lo)
    hi_smem.index(part).store(acc_hi)
    mbarrier.arrive(done, count=1)


@gluon.jit(do_not_specialize=["num_segments", "num_splits", "num_pages", "window_left", "slot_offset"])
def _paged_decode_gluon(
    q_ptr, q_pos_ptr, qo_indptr_ptr, tile_indptr_ptr, k_ptr, v_ptr,
    kv_indptr_ptr, kv_indices_ptr, kv_lens_ptr, kv_start_ptr, sinks_ptr, o_ptr, lse_ptr,
    num_segments, num_kv_heads, num_splits, num_pages, page_size, qk_scale, softcap, window_left, slot_offset,
    s_qt, s_qh, s_qd,
    s_kp, s_ks, s_kh, s_kd,
    s_vp, s_vs, s_vh, s_vd,
    s_ot, s_oslot, s_oh, s_od,
    s_lt, s_lslot, s_lh,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
    HAS_SINKS: gl.constexpr, DECODE_TILES: gl.constexpr, PAGE_SIZE: gl.constexpr, PART_REGS: gl.constexpr,
):
    """Grid, arguments and outputs as ``_attention_kernel._paged_attention_kernel`` for a decode launch (at most
    one query token a segment; ``softcap`` and ``window_left`` unused: launches with those take the ``tl``
    kernel; ``PAGE_SIZE`` is ``page_size``, a constant so that a key's page and slot are shifts).
    Launched with ``num_warps=4``: four one-warp worker partitions run the tiles, the program's own
    warpgroup waits for them and merges."""
    PARTS: gl.constexpr = 4
    BLOCK_N: gl.constexpr = BOX
    gl.static_assert(GROUP <= NQ, "GQA groups of up to 8 query heads")
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    pid = gl.program_id(0)
    kv_head = pid % num_kv_heads
    split = (pid // num_kv_heads) % num_splits
    tile = pid // (num_kv_heads * num_splits)
    seg = gl.minimum(_tile_segment(tile, tile_indptr_ptr, num_segments, DECODE_TILES), num_segments - 1)
    _, _, token, q_len = _segment_tile(seg, tile, tile_indptr_ptr, qo_indptr_ptr, DECODE_TILES)
    if q_len > 0:
        kv_len = gl.load(kv_lens_ptr + seg)
        hi = kv_len
        if CAUSAL:
            q_pos = gl.load(q_pos_ptr + token)
            hi, _ = _causal_kv_range(q_pos, q_pos, kv_len, gl.load(kv_start_ptr + seg))
        # this program's split of the visible tiles, in whole tiles
        n_all = gl.cdiv(hi, BLOCK_N)
        per = gl.cdiv(n_all, num_splits)
        t_lo = gl.minimum(split * per, n_all)
        t_hi = gl.minimum(t_lo + per, n_all)
        pages = kv_indices_ptr + gl.load(kv_indptr_ptr + seg)
        last = gl.maximum(gl.cdiv(hi, PAGE_SIZE) - 1, 0)
        box_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        k_desc = tma.make_tensor_descriptor(k_ptr + kv_head.to(gl.int64) * s_kh, shape=[num_pages * PAGE_SIZE, HEAD_DIM],
                                            strides=[s_ks, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=box_layout)
        v_desc = tma.make_tensor_descriptor(v_ptr + kv_head.to(gl.int64) * s_vh, shape=[num_pages * PAGE_SIZE, HEAD_DIM],
                                            strides=[s_vs, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=box_layout)
        k0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        v0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        k1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        v1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        k2 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        v2 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        k3 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        v3 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], box_layout)
        r0 = _ready_barriers(STAGES)
        r1 = _ready_barriers(STAGES)
        r2 = _ready_barriers(STAGES)
        r3 = _ready_barriers(STAGES)
        done = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(done.index(0), count=PARTS)
        # the partitions' states, one entry each (the layouts are those of an entry)
        flat1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        flat2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        m_smem = gl.allocate_shared_memory(gl.float32, [PARTS, NQ], flat1)
        l_smem = gl.allocate_shared_memory(gl.float32, [PARTS, NQ], flat1)
        lo_smem = gl.allocate_shared_memory(gl.float32, [PARTS, HEAD_DIM // 2, NQ], flat2)
        hi_smem = gl.allocate_shared_memory(gl.float32, [PARTS, HEAD_DIM // 2, NQ], flat2)
        scale = qk_scale * LOG2E
        gl.warp_specialize([
            (_await_states, (done.index(0),)),
            (_decode_part, (q_ptr, pages, last, PAGE_SIZE, hi, t_lo, t_hi, token, kv_head, scale, k_desc, v_desc,
                            k0, v0, r0, m_smem, l_smem, lo_smem, hi_smem, done.index(0), 0,
                            s_qt, s_qh, s_qd, GROUP, PARTS)),
            (_decode_part, (q_ptr, pages, last, PAGE_SIZE, hi, t_lo, t_hi, token, kv_head, scale, k_desc, v_desc,
                            k1, v1, r1, m_smem, l_smem, lo_smem, hi_smem, done.index(0), 1,
                            s_qt, s_qh, s_qd, GROUP, PARTS)),
            (_decode_part, (q_ptr, pages, last, PAGE_SIZE, hi, t_lo, t_hi, token, kv_head, scale, k_desc, v_desc,
                            k2, v2, r2, m_smem, l_smem, lo_smem, hi_smem, done.index(0), 2,
                            s_qt, s_qh, s_qd, GROUP, PARTS)),
            (_decode_part, (q_ptr, pages, last, PAGE_SIZE, hi, t_lo, t_hi, token, kv_head, scale, k_desc, v_desc,
                            k3, v3, r3, m_smem, l_smem, lo_smem, hi_smem, done.index(0), 3,
                            s_qt, s_qh, s_qd, GROUP, PARTS)),
        ], [1, 1, 1, 1], [PART_REGS, PART_REGS, PART_REGS, PART_REGS])
        # every partition's state is in shared memory: the program's warps merge them
        acc_l: gl.constexpr = gl.BlockedLayout([1, 1], [32 // NQ, NQ], [gl.num_warps(), 1], [1, 0])
        cols: gl.constexpr = gl.SliceLayout(0, acc_l)
        m_all = gl.full([NQ], -float("inf"), gl.float32, layout=cols)
        for w in gl.static_range(PARTS):
            m_all = gl.maximum(m_all, m_smem.index(w).load(cols))
        m_use = gl.where(m_all == -float("inf"), 0.0, m_all)
        l_all = gl.zeros([NQ], gl.float32, layout=cols)
        acc_lo = gl.zeros([HEAD_DIM // 2, NQ], gl.float32, layout=acc_l)
        acc_hi = gl.zeros([HEAD_DIM // 2, NQ], gl.float32, layout=acc_l)
        for w in gl.static_range(PARTS):
            alpha = gl.exp2(m_smem.index(w).load(cols) - m_use)
            l_all += l_smem.index(w).load(cols) * alpha
            acc_lo += lo_smem.index(w).load(acc_l) * alpha[None, :]
            acc_hi += hi_smem.index(w).load(acc_l) * alpha[None, :]
        slot = (slot_offset + split).to(gl.int64)
        _store_state(o_ptr, lse_ptr, sinks_ptr, token, slot, kv_head, m_all, l_all, acc_lo, acc_hi,
                     s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh, GROUP, HAS_SINKS)
        _invalidate(r0)
        _invalidate(r1)
        _invalidate(r2)
        _invalidate(r3)
        mbarrier.invalidate(done.index(0))
