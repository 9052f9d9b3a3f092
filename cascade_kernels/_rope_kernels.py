"""Triton kernels for rotary position embeddings (RoPE) and the paged KV append; wrappers in ``rope.py``.

RoPE rotates each pair ``(x1, x2)`` of a head by the angle ``pos * inv_freq[i]``:
``(x1 cos - x2 sin, x2 cos + x1 sin)``. The pairs are ``(i, i + R/2)`` (rotate halves: GPT-NeoX, HF
Llama) or ``(2i, 2i + 1)`` (interleaved: GPT-J, the original LLaMA, GGUF files), for ``i < R/2`` with
``R`` the rotary dim; dims ``R ... D-1`` pass through unrotated.

Numerics of the angle: in fp32, ``pos * inv_freq`` at ``pos = 1e6`` is an angle near ``1e6`` rad whose
fp32 ulp is 0.0625 rad, and ``inv_freq`` itself carries a relative error of 6e-8 (another 0.06 rad):
rotations would be wrong by a few degrees, more than bf16 rounding. So the angle is taken in turns and
reduced in fp64: ``t = pos * (inv_freq / 2pi)`` (fp64 product, absolute error below 2.4e-7 turns for any
int32 position), ``r = t - floor(t + 1/2)`` in ``[-1/2, 1/2]`` exactly, and only then ``2pi r`` in fp32,
where ``cos`` and ``sin`` see an argument in ``[-pi, pi]``. The angle error is below 1e-6 rad for every
int32 position (1e-9 at 1M); the fp64 work is one multiply and one floor per (token, frequency), shared
by all heads of the token.
"""

from __future__ import annotations

import triton
import triton.language as tl

TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _cos_sin(turns_ptr, p, half, BLOCK_HALF: tl.constexpr):
    """``cos`` and ``sin`` (fp32) of ``p * inv_freq`` with the reduction done in fp64.

    ``turns_ptr``: ``[R/2]`` fp64, ``inv_freq / 2pi``; ``p``: integer positions (or shifts) of shape
    ``[BN, 1, 1]`` (or a scalar). Returns two ``[BN, 1, BLOCK_HALF]`` tensors.
    """
    offs_i = tl.arange(0, BLOCK_HALF)[None, None, :]
    f = tl.load(turns_ptr + offs_i, mask=offs_i < half, other=0.0)
    t = p.to(tl.float64) * f
    r = t - tl.floor(t + 0.5)
    a = r.to(tl.float32) * TWO_PI
    return tl.cos(a), tl.sin(a)


@triton.jit
def _pair_dims(offs_i, half, INTERLEAVE: tl.constexpr):
    """Dims of the two elements of pair ``i``: ``(2i, 2i + 1)`` interleaved, else ``(i, i + R/2)``."""
    if INTERLEAVE:
        return 2 * offs_i, 2 * offs_i + 1
    else:
        return offs_i, offs_i + half


@triton.jit
def _rope_tile(
    src_ptr, src_rows, s_src_d,   # src_rows: [BN, BH, 1] int64 offsets of each (token, head) row
    dst_ptr, dst_rows, s_dst_d,   # dst_rows: [BN, BH, 1] int64; dst may be src (in place)
    row_mask,                     # [BN, BH, 1] rows to write
    cos, sin,                     # fp32, broadcastable to [BN, BH, BLOCK_HALF]
    half, head_dim,
    INTERLEAVE: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate a tile of (token, head) rows and store it, cast to the destination dtype.

    Every element is loaded before any is stored by this program, so ``dst`` may alias ``src``. With
    ``COPY_PASS`` the unrotated dims ``R ... D-1`` are copied too (not needed in place).
    """
    offs_i = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = row_mask & (offs_i < half)
    d1, d2 = _pair_dims(offs_i, half, INTERLEAVE)
    x1 = tl.load(src_ptr + src_rows + d1 * s_src_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + src_rows + d2 * s_src_d, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    tl.store(dst_ptr + dst_rows + d1 * s_dst_d, y1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_ptr + dst_rows + d2 * s_dst_d, y2.to(dst_ptr.dtype.element_ty), mask=mask)
    if COPY_PASS:
        offs_p = 2 * half + tl.arange(0, BLOCK_PASS)[None, None, :]
        mask_p = row_mask & (offs_p < head_dim)
        x = tl.load(src_ptr + src_rows + offs_p * s_src_d, mask=mask_p, other=0.0)
        tl.store(dst_ptr + dst_rows + offs_p * s_dst_d, x.to(dst_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _copy_tile(src_ptr, src_rows, s_src_d, dst_ptr, dst_rows, s_dst_d, row_mask, head_dim,
               BLOCK_D: tl.constexpr):
    """Copy a tile of (token, head) rows, cast to the destination dtype."""
    offs_d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = row_mask & (offs_d < head_dim)
    x = tl.load(src_ptr + src_rows + offs_d * s_src_d, mask=mask, other=0.0)
    tl.store(dst_ptr + dst_rows + offs_d * s_dst_d, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])  # batch-dependent: one compiled variant for all
def _rope_kernel(
    x_ptr,      # [N, H, D] fp16/bf16/fp32, any strides
    out_ptr,    # [N, H, D] fp16/bf16/fp32, any strides; may be x itself
    pos_ptr,    # [N] int32 global positions
    turns_ptr,  # [R/2] fp64, inv_freq / 2pi
    num_tokens, num_heads, head_dim, half,
    s_xn, s_xh, s_xd,
    s_on, s_oh, s_od,
    INTERLEAVE: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """One program rotates ``BLOCK_N`` tokens x ``BLOCK_H`` heads; cos/sin are computed once per token."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    mask_n = offs_n < num_tokens
    cos, sin = _cos_sin(turns_ptr, tl.load(pos_ptr + offs_n, mask=mask_n, other=0), half, BLOCK_HALF)
    _rope_tile(x_ptr, offs_n * s_xn + offs_h * s_xh, s_xd, out_ptr, offs_n * s_on + offs_h * s_oh, s_od,
               mask_n & (offs_h < num_heads), cos, sin, half, head_dim,
               INTERLEAVE, COPY_PASS, BLOCK_HALF, BLOCK_PASS)


@triton.jit(do_not_specialize=["num_tokens"])
def _append_kv_kernel(
    k_ptr, v_ptr,        # [N, Hkv, D] fp16/bf16/fp32, any strides
    kc_ptr, vc_ptr,      # [num_pages, page_size, Hkv, D] fp16/bf16/fp32, any strides
    slots_ptr,           # [N] int64, page * page_size + offset; < 0 skips the token
    pos_ptr,             # [N] int32, read only when ROPE
    turns_ptr,           # [R/2] fp64, read only when ROPE
    num_tokens, num_heads, head_dim, half, page_size,
    s_kn, s_kh, s_kd,
    s_vn, s_vh, s_vd,
    s_kcp, s_kcs, s_kch, s_kcd,
    s_vcp, s_vcs, s_vch, s_vcd,
    ROPE: tl.constexpr, INTERLEAVE: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """One program writes ``BLOCK_N`` tokens x ``BLOCK_H`` heads: ``k`` (rotated at ``pos`` when
    ``ROPE``) and ``v``, each token into its slot. Slot arithmetic is int64, so caches past 2**31
    elements work."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    mask_n = offs_n < num_tokens
    slot = tl.load(slots_ptr + offs_n, mask=mask_n, other=-1)
    rows = (slot >= 0) & (offs_h < num_heads)
    slot = tl.maximum(slot, 0)
    page = slot // page_size
    off = slot % page_size
    _copy_tile(v_ptr, offs_n * s_vn + offs_h * s_vh, s_vd,
               vc_ptr, page * s_vcp + off * s_vcs + offs_h * s_vch, s_vcd, rows, head_dim, BLOCK_D)
    kc_rows = page * s_kcp + off * s_kcs + offs_h * s_kch
    if ROPE:
        cos, sin = _cos_sin(turns_ptr, tl.load(pos_ptr + offs_n, mask=mask_n, other=0), half, BLOCK_HALF)
        _rope_tile(k_ptr, offs_n * s_kn + offs_h * s_kh, s_kd, kc_ptr, kc_rows, s_kcd, rows, cos, sin,
                   half, head_dim, INTERLEAVE, COPY_PASS, BLOCK_HALF, BLOCK_PASS)
    else:
        _copy_tile(k_ptr, offs_n * s_kn + offs_h * s_kh, s_kd, kc_ptr, kc_rows, s_kcd, rows, head_dim, BLOCK_D)


@triton.jit(do_not_specialize=["num_segments"])
def _rotate_keys_kernel(
    kc_ptr,      # [num_pages, page_size, Hkv, D] fp16/bf16/fp32, any strides; rotated in place
    indptr_ptr,  # [S + 1] int32, PagedKV.indptr
    indices_ptr, # [>= indptr[S]] int32, PagedKV.indices
    lens_ptr,    # [S] int32, PagedKV.lens
    delta_ptr,   # [S] int32, the shift of each segment's positions
    turns_ptr,   # [R/2] fp64, inv_freq / 2pi
    num_segments, num_heads, head_dim, half, page_size,
    s_kcp, s_kcs, s_kch, s_kcd,
    SEARCH_STEPS: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Program ``(e, tb, hb)`` rotates ``BLOCK_T`` slots of page entry ``e`` (page ``indices[e]``) by
    ``delta[s]``, ``s`` the segment owning entry ``e``, where a slot holds one of its ``lens[s]`` tokens.

    Rotation composes, ``R(p + d) = R(d) R(p)``, so a key cached at ``p`` becomes the key at ``p + d``.
    One angle per program: every token of a segment moves by the same ``delta[s]``. Segment ``s`` is
    found by binary search in ``indptr`` (no host-side table): the largest ``s`` with ``indptr[s] <= e``,
    which skips empty segments.
    """
    e = tl.program_id(0)
    if e < tl.load(indptr_ptr + num_segments):
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + num_segments - 1
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi + 1) // 2
            ok = tl.load(indptr_ptr + mid) <= e
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        s = lo
        offs_t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]
        offs_h = (tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
        token = (e - tl.load(indptr_ptr + s)) * page_size + offs_t
        rows = (offs_t < page_size) & (token < tl.load(lens_ptr + s)) & (offs_h < num_heads)
        page = tl.load(indices_ptr + e).to(tl.int64)
        kc_rows = page * s_kcp + offs_t.to(tl.int64) * s_kcs + offs_h * s_kch
        cos, sin = _cos_sin(turns_ptr, tl.load(delta_ptr + s), half, BLOCK_HALF)
        _rope_tile(kc_ptr, kc_rows, s_kcd, kc_ptr, kc_rows, s_kcd, rows, cos, sin, half, head_dim,
                   INTERLEAVE, False, BLOCK_HALF, 1)
