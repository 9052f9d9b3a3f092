"""A cascade's shared level and its per-request decode level in one Gluon kernel for Hopper.

A cascade whose shared level is a compute-bound prefill tile (the batch's decode tokens x their GQA group against
a long shared prefix) and whose last level is a memory-bound decode (one token a request over its own KV) is
bound by the tensor cores in one launch and by memory in the other. Two launches side by side did not share an
SM (NOTES.md, cascade v12 and v14), so this kernel puts both kinds of work in every program: the shared level's
program of ``_attention_gluon`` (two MMA warpgroups, a loader warp for K and one for V; here over 64-key tiles,
to leave shared memory) plus two decode warps in the loaders' warpgroup. Registers are handed between the
partitions by ``setmaxnreg`` (``worker_num_regs``): the decode warps get what they ask, the MMA warpgroups the rest.

A decode warp takes whole requests: program ``pid`` serves KV head ``pid % num_kv_heads`` (the shared level's
head); among the ``P / H`` programs of that head, the ``r``-th one's warp ``w`` takes requests ``2r + w``, then
every ``2P / H``-th after it, and writes each one's state over its own KV into slot ``d_slot`` (one split); the
plan's merge folds every slot as before. Its tiles are two pages, copied ``DECODE_STAGES`` ahead by block copies
into shared memory of its own, and computed transposed (``_decode_requests``). Measured on an H200 (NOTES.md,
cascade v15-v17): 1.02-1.22x the two launches one after the other where ``_fused`` lets it run; the kernel is then
bound by what both parts read through L2, and the shared memory is split evenly between the shared level's K/V
stages and the decode warps' tiles (three of each: 96 KB each at head_dim 128).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from ._attention_kernel import _causal_kv_range
from ._attention_gluon import (LN2, LOG2E, _consume_rows, _cta_barrier, _invalidate, _io_layout, _load_operand,
                              _program_work, _stage_barriers, _tma_load)


@gluon.jit
def _decode_requests(q_ptr, q_pos_ptr, qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, kv_lens_ptr, kv_start_ptr,
                     o_ptr, lse_ptr, k_desc, v_desc, k_smem, v_smem, ready,
                     kv_head, first, step, num_segments, page_size, scale, slot,
                     s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
                     GROUP: gl.constexpr, CAUSAL: gl.constexpr):
    """One decode warp: for segments ``first, first + step, ...`` (one query token each) the attention of
    the ``GROUP`` query heads of ``kv_head`` over the segment's KV, in tiles of two pages copied ``STAGES``
    ahead into ``k_smem``/``v_smem`` ``[STAGES, 2 * page_size, D]`` (``ready``: an mbarrier a stage counting
    both operands' bytes); normalised ``o`` and natural-log ``lse`` into ``slot``.

    Transposed, so that the few query heads are the MMA's narrow side (``NQ`` = 8 columns) and keys
    and head dims its rows: ``S^T = K Q^T`` ``[keys, NQ]``, ``O^T += V^T P^T`` ``[D, NQ]``, the softmax down
    the columns; at head_dim 128 both products run in two halves of the head dims, so that no operand
    takes more than 32 registers a thread and the warp fits the ~112 the MMA warpgroups leave it.
    """
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    PAGE: gl.constexpr = BLOCK_N // 2
    HALF: gl.constexpr = HEAD_DIM // 2
    NQ: gl.constexpr = 8
    gl.static_assert(GROUP <= NQ, "GQA groups of up to 8 query heads")
    dtype: gl.constexpr = k_smem.dtype
    nw: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    io: gl.constexpr = _io_layout(HEAD_DIM, nw)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    nbytes: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8

    offs_qb = gl.arange(0, NQ, layout=gl.SliceLayout(0, b_l))
    head_b = (kv_head * GROUP + offs_qb).to(gl.int64)
    offs_db = gl.arange(0, HALF, layout=gl.SliceLayout(1, b_l))
    offs_q = gl.arange(0, NQ, layout=cols)
    col_ok = offs_q < GROUP
    head_c = (kv_head * GROUP + offs_q).to(gl.int64)
    offs_d = gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
    offs_k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs_r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, io))
    it = 0  # tiles this warp has used so far: stage and phase of the next one
    for seg in range(first, num_segments, step):
        token = gl.load(qo_indptr_ptr + seg).to(gl.int64)
        hi = gl.load(kv_lens_ptr + seg)
        if CAUSAL:
            q_pos = gl.load(q_pos_ptr + token)
            hi, _ = _causal_kv_range(q_pos, q_pos, hi, gl.load(kv_start_ptr + seg))
        n_tiles = gl.cdiv(hi, BLOCK_N)
        last = gl.maximum(gl.cdiv(hi, PAGE) - 1, 0)  # a tile's second page past the end reads the last one
        pages = kv_indices_ptr + gl.load(kv_indptr_ptr + seg)
        fence_async_shared()  # the last segment's reads of these stages come before the copies into them
        for i in gl.static_range(STAGES):
            if i < n_tiles:
                st = (it + i) % STAGES
                _copy_tile(k_desc, v_desc, k_smem.index(st), v_smem.index(st), ready.index(st), nbytes,
                           gl.load(pages + 2 * i) * page_size, gl.load(pages + gl.minimum(2 * i + 1, last)) * page_size)
        q_base = q_ptr + token * s_qt + head_b[None, :] * s_qh
        q_mask = (offs_qb < GROUP)[None, :]
        q_lo = gl.load(q_base + offs_db[:, None] * s_qd, mask=q_mask, other=0.0)
        q_hi = gl.load(q_base + (offs_db[:, None] + HALF) * s_qd, mask=q_mask, other=0.0)
        m_i = gl.full([NQ], -float("inf"), gl.float32, layout=cols)
        l_i = gl.zeros([NQ], gl.float32, layout=cols)
        acc_lo = gl.zeros([HALF, NQ], gl.float32, layout=mma)
        acc_hi = gl.zeros([HALF, NQ], gl.float32, layout=mma)
        for j in range(n_tiles):
            st = (it + j) % STAGES
            nxt = j + STAGES
            row0 = gl.load(pages + gl.minimum(2 * nxt, last)) * page_size  # in flight during this tile
            row1 = gl.load(pages + gl.minimum(2 * nxt + 1, last)) * page_size
            mbarrier.wait(ready.index(st), ((it + j) // STAGES) & 1)
            k_buf = k_smem.index(st)
            v_buf = v_smem.index(st)
            s = mma_v2(k_buf.slice(0, HALF, dim=1).load(a_l), q_lo, gl.zeros([BLOCK_N, NQ], gl.float32, mma))
            s = mma_v2(k_buf.slice(HALF, HALF, dim=1).load(a_l), q_hi, s) * scale
            start = j * BLOCK_N
            if start + BLOCK_N > hi:  # the last tile: keys past the visible end hidden, their V rows zeroed
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
            if nxt < n_tiles:  # this stage's reads are in registers: copy tile j + STAGES into it
                _cta_barrier()
                fence_async_shared()
                _copy_tile(k_desc, v_desc, k_buf, v_buf, ready.index(st), nbytes, row0, row1)
        it += n_tiles
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, -float("inf"), (m_i + gl.log2(l_safe)) * LN2)
        o_base = o_ptr + token * s_ot + slot * s_oslot + head_c[None, :] * s_oh
        gl.store(o_base + offs_d[:, None] * s_od, (acc_lo / l_safe[None, :]).to(o_ptr.dtype.element_ty),
                 mask=col_ok[None, :])
        gl.store(o_base + (offs_d[:, None] + HALF) * s_od, (acc_hi / l_safe[None, :]).to(o_ptr.dtype.element_ty),
                 mask=col_ok[None, :])
        gl.store(lse_ptr + token * s_lt + slot * s_lslot + head_c * s_lh, lse, mask=col_ok)


@gluon.jit
def _copy_tile(k_desc, v_desc, k_buf, v_buf, bar, nbytes: gl.constexpr, row0, row1):
    """Cache rows ``row0 ..`` and ``row1 ..`` (two pages) of K and of V into the two halves of a decode stage."""
    PAGE: gl.constexpr = k_buf.shape[0] // 2
    mbarrier.expect(bar, nbytes)
    _tma_load(k_desc, [row0, 0], bar, k_buf.slice(0, PAGE))
    _tma_load(k_desc, [row1, 0], bar, k_buf.slice(PAGE, PAGE))
    _tma_load(v_desc, [row0, 0], bar, v_buf.slice(0, PAGE))
    _tma_load(v_desc, [row1, 0], bar, v_buf.slice(PAGE, PAGE))


@gluon.jit(do_not_specialize=["num_segments", "num_splits", "num_pages", "slot_offset", "d_num_segments",
                              "d_slot"])
def _cascade_fused_gluon(
    q_ptr, q_pos_ptr, qo_indptr_ptr, tile_indptr_ptr, k_ptr, v_ptr,
    kv_indptr_ptr, kv_indices_ptr, kv_lens_ptr, kv_start_ptr, o_ptr, lse_ptr,
    d_qo_indptr_ptr, d_kv_indptr_ptr, d_kv_indices_ptr, d_kv_lens_ptr, d_kv_start_ptr,
    num_segments, num_kv_heads, num_splits, num_pages, page_size, qk_scale, slot_offset, d_num_segments, d_slot,
    s_qt, s_qh, s_qd,
    s_kp, s_ks, s_kh, s_kd,
    s_vp, s_vs, s_vh, s_vd,
    s_ot, s_oslot, s_oh, s_od,
    s_lt, s_lslot, s_lh,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    PAGE_ROWS: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, REVERSE_TILES: gl.constexpr,
    PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    DECODE_STAGES: gl.constexpr, DECODE_REGS: gl.constexpr,
):
    """The shared (prefill) level as ``_attention_gluon._paged_attention_gluon`` (grid ``tiles x KV heads x
    splits``, the same arguments up to ``lse_ptr``; no window, soft cap or sinks), plus the decode level
    given by ``d_*`` (one query token a segment, its state into slot ``d_slot`` of the fp32 scratch ``o``
    ``[N, slots, Hq, D]``, ``lse`` ``[N, slots, Hq]``). Pages of 16 slots (a decode tile is two, a block copy
    each)."""
    num_warps: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = 16 * num_warps
    gl.static_assert(BLOCK_M == 2 * ROWS, "two warpgroups of 16-row slabs")
    DECODE_WARPS: gl.constexpr = 2  # one-warp partitions beside the loaders, in their warpgroup
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    box_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([PAGE_ROWS, HEAD_DIM], dtype)

    # programs past the last tile (none where the plan launches it) run their decode work only
    (valid, kv_head, split, q_start, q_len, row0, kv_len, kv_start, full_hi, a, n_tiles, page_table,
     last_entry) = _program_work(q_pos_ptr, qo_indptr_ptr, tile_indptr_ptr, kv_indptr_ptr, kv_indices_ptr,
                                 kv_lens_ptr, kv_start_ptr, num_segments, num_kv_heads, num_splits, page_size,
                                 GROUP, BLOCK_M, BLOCK_N, CAUSAL, REVERSE_TILES)
    k_base = k_ptr + kv_head.to(gl.int64) * s_kh
    v_base = v_ptr + kv_head.to(gl.int64) * s_vh
    k_desc = tma.make_tensor_descriptor(k_base, shape=[num_pages * page_size, HEAD_DIM], strides=[s_ks, 1],
                                        block_shape=[PAGE_ROWS, HEAD_DIM], layout=box_layout)
    v_desc = tma.make_tensor_descriptor(v_base, shape=[num_pages * page_size, HEAD_DIM], strides=[s_vs, 1],
                                        block_shape=[PAGE_ROWS, HEAD_DIM], layout=box_layout)
    dbox_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([16, HEAD_DIM], dtype)
    dk_desc = tma.make_tensor_descriptor(k_base, shape=[num_pages * page_size, HEAD_DIM], strides=[s_ks, 1],
                                         block_shape=[16, HEAD_DIM], layout=dbox_layout)
    dv_desc = tma.make_tensor_descriptor(v_base, shape=[num_pages * page_size, HEAD_DIM], strides=[s_vs, 1],
                                         block_shape=[16, HEAD_DIM], layout=dbox_layout)
    q0_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], q_smem_layout)
    q1_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], q_smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
    DS: gl.constexpr = DECODE_STAGES
    dk_smem0 = gl.allocate_shared_memory(dtype, [DS, 32, HEAD_DIM], dbox_layout)
    dv_smem0 = gl.allocate_shared_memory(dtype, [DS, 32, HEAD_DIM], dbox_layout)
    dk_smem1 = gl.allocate_shared_memory(dtype, [DS, 32, HEAD_DIM], dbox_layout)
    dv_smem1 = gl.allocate_shared_memory(dtype, [DS, 32, HEAD_DIM], dbox_layout)
    k_ready, v_ready, k_empty, v_empty, turn = _stage_barriers(STAGES)
    d_ready0 = gl.allocate_shared_memory(gl.int64, [DS, 1], mbarrier.MBarrierLayout())
    d_ready1 = gl.allocate_shared_memory(gl.int64, [DS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(DS):
        mbarrier.init(d_ready0.index(i), count=1)
        mbarrier.init(d_ready1.index(i), count=1)
    scale = qk_scale * LOG2E
    slot = (slot_offset + split).to(gl.int64)
    d_slot64 = d_slot.to(gl.int64)
    peers = gl.num_programs(0) // num_kv_heads  # programs of this KV head
    d_first = (gl.program_id(0) // num_kv_heads) * DECODE_WARPS
    d_step = peers * DECODE_WARPS
    gl.warp_specialize([
        (_consume_rows, (q_ptr, q_pos_ptr, o_ptr, lse_ptr, q0_smem, k_smem, v_smem,
                         k_ready, v_ready, k_empty, v_empty, turn.index(0), turn.index(1),
                         q_start, q_len, kv_head, row0, a, n_tiles, full_hi, kv_len, kv_start, scale,
                         slot, s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
                         GROUP, CAUSAL, STAGES, True, True)),
        (_consume_rows, (q_ptr, q_pos_ptr, o_ptr, lse_ptr, q1_smem, k_smem, v_smem,
                         k_ready, v_ready, k_empty, v_empty, turn.index(1), turn.index(0),
                         q_start, q_len, kv_head, row0 + ROWS, a, n_tiles, full_hi, kv_len, kv_start,
                         scale, slot, s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
                         GROUP, CAUSAL, STAGES, False, True)),
        (_load_operand, (k_desc, k_smem, k_ready, k_empty, page_table, a, n_tiles, last_entry,
                         page_size, PAGE_ROWS, BLOCK_N, STAGES)),
        (_load_operand, (v_desc, v_smem, v_ready, v_empty, page_table, a, n_tiles, last_entry,
                         page_size, PAGE_ROWS, BLOCK_N, STAGES)),
        (_decode_requests, (q_ptr, q_pos_ptr, d_qo_indptr_ptr, d_kv_indptr_ptr, d_kv_indices_ptr, d_kv_lens_ptr,
                            d_kv_start_ptr, o_ptr, lse_ptr, dk_desc, dv_desc, dk_smem0, dv_smem0, d_ready0,
                            kv_head, d_first, d_step, d_num_segments, page_size, scale, d_slot64,
                            s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh, GROUP, CAUSAL)),
        (_decode_requests, (q_ptr, q_pos_ptr, d_qo_indptr_ptr, d_kv_indptr_ptr, d_kv_indices_ptr, d_kv_lens_ptr,
                            d_kv_start_ptr, o_ptr, lse_ptr, dk_desc, dv_desc, dk_smem1, dv_smem1, d_ready1,
                            kv_head, d_first + 1, d_step, d_num_segments, page_size, scale, d_slot64,
                            s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh, GROUP, CAUSAL)),
    ], [num_warps, 1, 1, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS, DECODE_REGS, DECODE_REGS])
    _invalidate(k_ready)
    _invalidate(v_ready)
    _invalidate(k_empty)
    _invalidate(v_empty)
    _invalidate(turn)
    _invalidate(d_ready0)
    _invalidate(d_ready1)
