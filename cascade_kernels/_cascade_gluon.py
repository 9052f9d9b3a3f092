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
into shared memory of its own, and computed transposed (``_decode_requests``, on the Gluon decode kernel's tile
loop, ``_decode_gluon._decode_tiles``). Measured on an H200 (NOTES.md, cascade v15-v18): 1.02-1.22x the two launches one after the other where ``_fused`` lets it run; the kernel is then
bound by what both parts read through L2, and the shared memory is split evenly between the shared level's K/V
stages and the decode warps' tiles (three of each: 96 KB each at head_dim 128).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

from ._attention_kernel import _causal_kv_range
from ._attention_gluon import LOG2E, _consume_rows, _invalidate, _load_operand, _program_work, _stage_barriers
from ._decode_gluon import _decode_q, _decode_tiles, _ready_barriers, _store_state


@gluon.jit
def _decode_requests(q_ptr, q_pos_ptr, qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, kv_lens_ptr, kv_start_ptr,
                     o_ptr, lse_ptr, k_desc, v_desc, k_smem, v_smem, ready,
                     kv_head, first, step, num_segments, page_size, scale, slot,
                     s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
                     GROUP: gl.constexpr, CAUSAL: gl.constexpr):
    """One decode warp: for segments ``first, first + step, ...`` (one query token each) the attention of
    the ``GROUP`` query heads of ``kv_head`` over the segment's whole KV (``_decode_gluon._decode_tiles``: tiles
    of two pages, copied ``STAGES`` ahead into ``k_smem``/``v_smem`` ``[STAGES, 2 * page_size, D]``, ``ready`` an
    mbarrier a stage); normalised ``o`` and natural-log ``lse`` into ``slot``."""
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    PAGE: gl.constexpr = BLOCK_N // 2  # pages of 16 (``_fused``): a constant, so a key's page is a shift
    it = 0  # tiles this warp has used so far: stage and phase of the next one
    for seg in range(first, num_segments, step):
        token = gl.load(qo_indptr_ptr + seg).to(gl.int64)
        hi = gl.load(kv_lens_ptr + seg)
        if CAUSAL:
            q_pos = gl.load(q_pos_ptr + token)
            hi, _ = _causal_kv_range(q_pos, q_pos, hi, gl.load(kv_start_ptr + seg))
        n_tiles = gl.cdiv(hi, BLOCK_N)
        last = gl.maximum(gl.cdiv(hi, PAGE) - 1, 0)
        pages = kv_indices_ptr + gl.load(kv_indptr_ptr + seg)
        q_lo, q_hi = _decode_q(q_ptr, token, kv_head, s_qt, s_qh, s_qd, GROUP, HEAD_DIM)
        m_i, l_i, acc_lo, acc_hi = _decode_tiles(q_lo, q_hi, pages, last, PAGE, hi, 0, 1, n_tiles, scale,
                                                 k_desc, v_desc, k_smem, v_smem, ready, it)
        it += n_tiles
        _store_state(o_ptr, lse_ptr, lse_ptr, token, slot, kv_head, m_i, l_i, acc_lo, acc_hi,
                     s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh, GROUP, False)


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
    d_ready0 = _ready_barriers(DS)
    d_ready1 = _ready_barriers(DS)
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
