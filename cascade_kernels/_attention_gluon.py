"""The paged attention kernel for Hopper written in Gluon: KV tiles gathered page by page with block copies.

Same work as ``_attention_kernel._paged_attention_kernel`` (one program: one KV head, one tile of
BLOCK_M (token, group head) rows of one segment, one split of its KV; masks by global position only),
with FA3's structure: two loader warps (warp specialization), one for K and one for V, copy each KV tile
into ``STAGES`` stages of shared memory (an mbarrier a stage and operand counting the bytes in, another
handing it back), and two MMA warpgroups take 64 rows of the 128-row tile each (Q in shared memory, S = Q
K^T and O += P V as warpgroup MMAs with P from registers), taking turns at the MMAs (FA3's ping-pong) so
one's softmax runs under the other's MMAs. K's stage goes back to its loader after Q K^T, V's after P V,
so the next K copies start while this tile's softmax and P V run.

The copies: ``PAGE_ROWS`` rows each, one block copy (TMA) into its slice of the stage. With pages smaller
than the tile (``PAGE_ROWS`` = ``page_size``) a 128-key tile over pages of 16 is eight scattered runs of
rows, one copy each, which the ``tl`` kernel can only load as a row gather (a pointer per row, copies
issued by the warps that also run the MMAs). With pages of 128 keys or more, or tiles the caller found in
consecutive pages, a tile is 128 consecutive rows: one copy (``PAGE_ROWS`` = 128).

Measured on an H200 (1 x 16384 causal, bf16, head_dim 128; NOTES.md prefill v9): at pages of 16, one
loader warp for both operands and one stage barrier ran 498-511 TFLOP/s unordered and 476-488 ordered
(the 32 copies a tile, each page's row split in two 128-byte halves, kept the loader behind); a loader for
each operand, ordered: 528.5. At pages of 256 the ordered kernel runs 533-557 (the ``tl`` kernel's own
block copies 486-494).

What it handles: Hopper (warpgroup MMAs), fp16/bf16, head_dim 64 or 128, copies of ``PAGE_ROWS`` rows
that lie in consecutive cache rows (``PAGE_ROWS`` divides ``BLOCK_N``), caches whose pages are
row-contiguous with unit stride along head_dim, causal or not; no window, soft cap or sinks. Which
launches take it is ``_gluon.page_rows``'s decision. There is no interpreter for Gluon: the CPU suite
covers the ``tl`` kernel and compiles this one for sm_90; the GPU suite runs both.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._attention_kernel import _causal_kv_range, _segment_tile, _tile_segment

# Names that moved between the triton versions this was checked with (3.6 first, then 3.9): the CTA-wide
# barrier, and the block copy into shared memory.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.constexpr_function
def _io_layout(head_dim, num_warps):
    """A blocked layout for ``[rows, head_dim]`` global loads and stores: 16 bytes a thread along head_dim."""
    per_row = min(32, head_dim // 8)
    return gl.BlockedLayout([1, 8], [32 // per_row, per_row], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def _mma_layout(n, num_warps):
    """The accumulator layout of a ``[BLOCK_M, n]`` warpgroup MMA: warps stacked along M, 16 rows each."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _load_operand(desc, smem, ready, empty, page_table, a, n_tiles, last_entry, page_size,
                  PAGE_ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """A loader partition (one warp) for one operand, K or V: KV tokens ``a + j * BLOCK_N ...`` of tile ``j``
    into stage ``j % STAGES`` once both MMA warpgroups have handed it back (``empty``, from tile
    ``j - STAGES``), ``PAGE_ROWS`` rows a block copy, all signalling ``ready``.

    Copy ``i`` reads ``PAGE_ROWS`` cache rows from token ``start + i * PAGE_ROWS``'s row on (its page is
    clamped to the segment's last page, so a tile past the segment's end reads a real page, hidden by the
    mask)."""
    for j in range(n_tiles):
        stage = j % STAGES
        mbarrier.wait(empty.index(stage), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        bar = ready.index(stage)
        buf = smem.index(stage)
        start = a + j * BLOCK_N
        mbarrier.expect(bar, BLOCK_N * desc.block_type.shape[1] * desc.dtype.primitive_bitwidth // 8)
        for i in gl.static_range(BLOCK_N // PAGE_ROWS):
            pos = start + i * PAGE_ROWS
            page = gl.load(page_table + gl.minimum(pos // page_size, last_entry))
            _tma_load(desc, [page * page_size + pos % page_size, 0], bar, buf.slice(i * PAGE_ROWS, PAGE_ROWS))


@gluon.jit
def _consume_rows(q_ptr, q_pos_ptr, o_ptr, lse_ptr, q_smem, k_smem, v_smem,
                  k_ready, v_ready, k_empty, v_empty, my_turn, their_turn,
                  q_start, q_len, kv_head, row0, a, n_tiles, full_hi, kv_len, kv_start, scale, slot,
                  s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
                  GROUP: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr, LEADS: gl.constexpr,
                  STORE_FROM_MMA: gl.constexpr):
    """One MMA warpgroup's rows ``row0 .. row0 + 16 * num_warps - 1`` of the program's tile, start to end:
    its Q rows into ``q_smem``, the online softmax over the KV tiles as they land in stage ``j % STAGES``
    (``k_ready``/``v_ready``), each operand's stage handed back to its loader (``k_empty``/``v_empty``, one
    arrival per warpgroup) once this warpgroup's MMA has read it, then its normalised ``o`` and
    natural-log ``lse``.

    The two warpgroups of a program run this side by side, taking turns issuing MMAs (FA3's ping-pong)
    so one's softmax runs while the other's MMAs do: each issues ``P V`` of tile ``j`` and ``Q K^T`` of
    tile ``j + 1`` as one turn, waiting on ``my_turn`` and then handing the turn over on ``their_turn``
    (mbarriers of one arrival); the warpgroup that ``LEADS`` takes the first turn, the other starts by
    waiting for it. ``STORE_FROM_MMA``: ``o`` is stored from the MMA's layout, each thread its own fragment
    (no shared-memory scratch for a layout change, which the fused cascade kernel cannot spare), rather than
    in the coalesced rows of ``_io_layout``.
    """
    ROWS: gl.constexpr = q_smem.shape[0]
    HEAD_DIM: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    nw: gl.constexpr = gl.num_warps()
    io: gl.constexpr = _io_layout(HEAD_DIM, nw)
    s_layout: gl.constexpr = _mma_layout(BLOCK_N, nw)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM, nw)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io))
    row_ok = rows < q_len * GROUP
    token = (q_start + rows // GROUP).to(gl.int64)
    head = (kv_head * GROUP + rows % GROUP).to(gl.int64)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io))
    q = gl.load(q_ptr + token[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_ok[:, None], other=0.0)
    q_smem.store(q)
    fence_async_shared()
    _cta_barrier()
    rows_m = row0 + gl.arange(0, ROWS, layout=rows_s)
    row_ok_m = rows_m < q_len * GROUP
    q_pos = gl.load(q_pos_ptr + q_start + rows_m // GROUP, mask=row_ok_m, other=0)

    m_i = gl.full([ROWS], -float("inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=rows_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for j in range(n_tiles):
        stage = j % STAGES
        start = a + j * BLOCK_N
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        k_buf = k_smem.index(stage)
        v_buf = v_smem.index(stage)
        if not LEADS:
            mbarrier.wait(my_turn, 0, pred=j == 0)  # the leader's first Q K^T goes first
        s = warpgroup_mma(q_smem, k_buf.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        mbarrier.arrive(their_turn, count=1)  # turn ``j + 1`` of the other warpgroup (``j`` for the leader's)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        _cta_barrier()  # every warp of this warpgroup has read K
        mbarrier.arrive(k_empty.index(stage), count=1)
        s = s * scale
        if start + BLOCK_N > full_hi:  # some key of this tile is hidden from some row
            kv_pos = kv_start + start + offs_n
            visible = ((start + offs_n) < kv_len)[None, :]
            if CAUSAL:
                visible = visible & (kv_pos[None, :] <= q_pos[:, None])
            s = gl.where(visible, s, -float("inf"))
        mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
        if start + BLOCK_N > kv_len:
            # rows past the segment's end hold whatever the page holds (NaN included): zero them in V so
            # that 0 * NaN stays out of P V (both warpgroups write the same values; each then reads them)
            v_io = v_buf.load(io)
            offs_r = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, io))
            v_buf.store(gl.where((offs_r < kv_len)[:, None], v_io, gl.zeros_like(v_io)))
            fence_async_shared()
            _cta_barrier()
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # this P V waits for the other warpgroup's Q K^T of tile j (the leader) or j + 1 (the other)
        if LEADS:
            mbarrier.wait(my_turn, j & 1)
        else:
            mbarrier.wait(my_turn, (j + 1) & 1)
        acc = warpgroup_mma(p_op, v_buf, acc, is_async=True)
        mbarrier.arrive(their_turn, count=1, pred=j == n_tiles - 1)  # a last turn with no Q K^T in it
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        m_i = m_new
        _cta_barrier()  # every warp of this warpgroup has read the stage
        mbarrier.arrive(v_empty.index(stage), count=1)

    # normalised o and natural-log lse (o = 0, lse = -inf where no key was visible)
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where(l_i == 0.0, -float("inf"), (m_i + gl.log2(l_safe)) * LN2)
    o = (acc / gl.convert_layout(l_safe, rows_o)[:, None]).to(o_ptr.dtype.element_ty)
    if STORE_FROM_MMA:  # each thread its own fragment: no shared-memory scratch, narrower stores
        rows_a = row0 + gl.arange(0, ROWS, layout=rows_o)
        token_a = (q_start + rows_a // GROUP).to(gl.int64)
        head_a = (kv_head * GROUP + rows_a % GROUP).to(gl.int64)
        offs_da = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        gl.store(o_ptr + token_a[:, None] * s_ot + slot * s_oslot + head_a[:, None] * s_oh + offs_da[None, :] * s_od,
                 o, mask=(rows_a < q_len * GROUP)[:, None])
    else:
        o = gl.convert_layout(o, io)
        gl.store(o_ptr + token[:, None] * s_ot + slot * s_oslot + head[:, None] * s_oh + offs_d[None, :] * s_od,
                 o, mask=row_ok[:, None])
    token_m = (q_start + rows_m // GROUP).to(gl.int64)
    head_m = (kv_head * GROUP + rows_m % GROUP).to(gl.int64)
    gl.store(lse_ptr + token_m * s_lt + slot * s_lslot + head_m * s_lh, lse, mask=row_ok_m)


@gluon.jit
def _program_work(q_pos_ptr, qo_indptr_ptr, tile_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, kv_lens_ptr,
                  kv_start_ptr, num_segments, num_kv_heads, num_splits, page_size,
                  GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                  REVERSE_TILES: gl.constexpr):
    """This program's work (grid ``tiles x KV heads x splits``): ``(valid, kv_head, split, q_start, q_len,
    row0, kv_len, kv_start, full_hi, a, n_tiles, page_table, last_entry)``: its query tile's first row
    ``row0`` among the ``q_len * GROUP`` rows of a segment whose tokens start at ``q_start``, and its split
    of the KV range the tile sees: tiles ``a, a + BLOCK_N, ...`` (``n_tiles``), every row seeing ``[0,
    full_hi)``. ``valid`` is false past the last tile (the grid is an upper bound; then ``q_len`` and
    ``n_tiles`` are 0 and the loads stayed in the arrays)."""
    rows_l: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    pid = gl.program_id(0)
    kv_head = pid % num_kv_heads
    split = (pid // num_kv_heads) % num_splits
    tile = pid // (num_kv_heads * num_splits)
    seg = _tile_segment(tile, tile_indptr_ptr, num_segments, 0)
    valid = seg < num_segments
    last = gl.maximum(gl.minimum(seg, num_segments - 1), 0)
    num_tiles, local, q_start, q_len = _segment_tile(last, tile, tile_indptr_ptr, qo_indptr_ptr, 0)
    q_len = gl.where(valid, q_len, 0)
    if REVERSE_TILES:
        local = num_tiles - 1 - local
    # The KV range [0, hi) some row sees, [0, full_hi) every row sees; this program's split of it.
    rows_m = local * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_l)
    row_ok_m = rows_m < q_len * GROUP
    q_pos = gl.load(q_pos_ptr + q_start + rows_m // GROUP, mask=row_ok_m, other=0)
    kv_len = gl.load(kv_lens_ptr + last)
    kv_start = gl.load(kv_start_ptr + last)
    hi = kv_len
    full_hi = kv_len
    if CAUSAL:
        q_max = gl.max(gl.where(row_ok_m, q_pos, -2147483647), 0)
        q_min = gl.min(gl.where(row_ok_m, q_pos, 2147483647), 0)
        hi, full_hi = _causal_kv_range(q_min, q_max, kv_len, kv_start)
    hi = gl.where(valid, hi, 0)
    per_split = gl.cdiv(gl.cdiv(hi, num_splits), BLOCK_N) * BLOCK_N
    a = gl.minimum(split * per_split, hi)
    b = gl.minimum(a + per_split, hi)
    n_tiles = gl.cdiv(b - a, BLOCK_N)
    page_table = kv_indices_ptr + gl.load(kv_indptr_ptr + last)
    last_entry = gl.maximum(gl.cdiv(kv_len, page_size) - 1, 0)
    return (valid, kv_head, split, q_start, q_len, local * BLOCK_M, kv_len, kv_start, full_hi, a, n_tiles,
            page_table, last_entry)


@gluon.jit
def _stage_barriers(STAGES: gl.constexpr):
    """The program's mbarriers, initialised: K and V landed in a stage (one arrival: the loader's byte
    count), K and V of a stage handed back (one arrival from each MMA warpgroup), and the two warpgroups'
    turns at the MMAs."""
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    return k_ready, v_ready, k_empty, v_empty, turn


@gluon.jit
def _invalidate(barriers):
    """Invalidate every mbarrier of ``barriers`` (``[n, 1]`` allocations)."""
    N: gl.constexpr = barriers.shape[0]
    for i in gl.static_range(N):
        mbarrier.invalidate(barriers.index(i))


@gluon.jit(do_not_specialize=["num_segments", "num_splits", "num_pages", "window_left", "slot_offset"])
def _paged_attention_gluon(
    q_ptr, q_pos_ptr, qo_indptr_ptr, tile_indptr_ptr, k_ptr, v_ptr,
    kv_indptr_ptr, kv_indices_ptr, kv_lens_ptr, kv_start_ptr, sinks_ptr, o_ptr, lse_ptr,
    num_segments, num_kv_heads, num_splits, num_pages, page_size, qk_scale, softcap, window_left, slot_offset,
    s_qt, s_qh, s_qd,
    s_kp, s_ks, s_kh, s_kd,
    s_vp, s_vs, s_vh, s_vd,
    s_ot, s_oslot, s_oh, s_od,
    s_lt, s_lslot, s_lh,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    PAGE_ROWS: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, REVERSE_TILES: gl.constexpr,
    PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    """Grid, arguments and outputs as ``_paged_attention_kernel`` (``sinks_ptr``, ``softcap`` and
    ``window_left`` unused: launches with those options take the ``tl`` kernel). Launched with
    ``num_warps`` = one warpgroup (4): the program's own warps run the first half of the tile's rows, a
    worker warpgroup the second half, two worker warps the copies of K and of V."""
    num_warps: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = 16 * num_warps
    gl.static_assert(BLOCK_M == 2 * ROWS, "two warpgroups of 16-row slabs")
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    box_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([PAGE_ROWS, HEAD_DIM], dtype)

    (valid, kv_head, split, q_start, q_len, row0, kv_len, kv_start, full_hi, a, n_tiles, page_table,
     last_entry) = _program_work(q_pos_ptr, qo_indptr_ptr, tile_indptr_ptr, kv_indptr_ptr, kv_indices_ptr,
                                 kv_lens_ptr, kv_start_ptr, num_segments, num_kv_heads, num_splits, page_size,
                                 GROUP, BLOCK_M, BLOCK_N, CAUSAL, REVERSE_TILES)
    if valid:
        k_desc = tma.make_tensor_descriptor(k_ptr + kv_head.to(gl.int64) * s_kh, shape=[num_pages * page_size, HEAD_DIM],
                                            strides=[s_ks, 1], block_shape=[PAGE_ROWS, HEAD_DIM], layout=box_layout)
        v_desc = tma.make_tensor_descriptor(v_ptr + kv_head.to(gl.int64) * s_vh, shape=[num_pages * page_size, HEAD_DIM],
                                            strides=[s_vs, 1], block_shape=[PAGE_ROWS, HEAD_DIM], layout=box_layout)
        q0_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], q_smem_layout)
        q1_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], q_smem_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
        k_ready, v_ready, k_empty, v_empty, turn = _stage_barriers(STAGES)
        scale = qk_scale * LOG2E
        slot = (slot_offset + split).to(gl.int64)
        gl.warp_specialize([
            (_consume_rows, (q_ptr, q_pos_ptr, o_ptr, lse_ptr, q0_smem, k_smem, v_smem,
                             k_ready, v_ready, k_empty, v_empty, turn.index(0), turn.index(1),
                             q_start, q_len, kv_head, row0, a, n_tiles, full_hi, kv_len, kv_start, scale,
                             slot, s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
                             GROUP, CAUSAL, STAGES, True, False)),
            (_consume_rows, (q_ptr, q_pos_ptr, o_ptr, lse_ptr, q1_smem, k_smem, v_smem,
                             k_ready, v_ready, k_empty, v_empty, turn.index(1), turn.index(0),
                             q_start, q_len, kv_head, row0 + ROWS, a, n_tiles, full_hi, kv_len, kv_start,
                             scale, slot, s_qt, s_qh, s_qd, s_ot, s_oslot, s_oh, s_od, s_lt, s_lslot, s_lh,
                             GROUP, CAUSAL, STAGES, False, False)),
            (_load_operand, (k_desc, k_smem, k_ready, k_empty, page_table, a, n_tiles, last_entry,
                             page_size, PAGE_ROWS, BLOCK_N, STAGES)),
            (_load_operand, (v_desc, v_smem, v_ready, v_empty, page_table, a, n_tiles, last_entry,
                             page_size, PAGE_ROWS, BLOCK_N, STAGES)),
        ], [num_warps, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
        _invalidate(k_ready)
        _invalidate(v_ready)
        _invalidate(k_empty)
        _invalidate(v_empty)
        _invalidate(turn)
