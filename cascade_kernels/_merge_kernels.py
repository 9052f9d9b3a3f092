"""Triton kernels that merge attention states ``(o, lse)``; the wrappers are in ``merge.py``.

Numerics: every state is weighted by ``exp(lse_i - m)`` with ``m`` the row's largest ``lse``, so no
weight exceeds 1 and no sum overflows, whatever the magnitudes of the logits. A row whose states are
all ``-inf`` (nothing visible anywhere) has ``m = -inf``; it is replaced by 0 before the subtraction so
that ``-inf - -inf`` never forms a NaN: then every weight is 0, the sum is 0, and the row is written as
``lse = -inf``, ``o = 0``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import wait_for_prior

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _weight(lse, m_safe):
    """``exp(lse - m)`` through exp2; 0 for an empty (``-inf``) state."""
    return tl.exp2((lse - m_safe) * LOG2E)


@triton.jit
def _finish(acc, total, m_safe):
    """Normalise the weighted sum; return ``(o, lse)`` with ``(0, -inf)`` where every weight was 0."""
    empty = total == 0.0
    o = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, -float("inf"), m_safe + tl.log2(tl.where(empty, 1.0, total)) * LN2)
    return o, lse


@triton.jit(do_not_specialize=["num_states"])  # split counts vary per batch: one compiled variant
def _merge_states_kernel(
    o_ptr,        # [n, k, H, D] any float dtype, any strides
    lse_ptr,      # [n, k, H] fp32
    sinks_ptr,    # [H] fp32, read only when HAS_SINKS
    out_ptr,      # [n, H, D] any float dtype
    out_lse_ptr,  # [n, H] fp32
    num_states, num_heads, head_dim,
    s_on, s_ok, s_oh, s_od,
    s_ln, s_lk, s_lh,
    s_outn, s_outh, s_outd,
    s_olsen, s_olseh,
    HAS_SINKS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WAIT_FOR_PRIOR: tl.constexpr,
):
    """One program merges the ``k`` states of row ``n`` for ``BLOCK_H`` heads, vectorised over D.
    ``WAIT_FOR_PRIOR``: launched as the programmatic dependent of the kernel that wrote the states
    (``_triton.wait_for_prior``).

    ``BLOCK_K`` states are loaded at once: 1 for many rows (each program streams its states one by one,
    and many programs keep the memory busy), more for the few long rows of a split-KV merge, where
    a loop of one dependent load per state would expose the load latency ``k`` times.
    """
    wait_for_prior(WAIT_FOR_PRIOR)
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < num_heads
    mask = mask_h[:, None] & (offs_d < head_dim)[None, :]

    # BLOCK_K == 1 (many rows): one state per load, the code measured at copy bandwidth on an H200 (the
    # [1, H, D] form of the batched loop compiles to nearly the same PTX and measured 20% slower for 4
    # states). BLOCK_K > 1 (few rows of many states): BLOCK_K states per load.
    offs_k = tl.arange(0, BLOCK_K)
    lse_row = lse_ptr + row * s_ln + offs_h[None, :] * s_lh                                  # [1, BLOCK_H]
    o_row = o_ptr + row * s_on + offs_h[None, :, None] * s_oh + offs_d[None, None, :] * s_od  # [1, BLOCK_H, BLOCK_D]

    # Pass 1 reads only the lse values (k * H floats) to find the row's maximum.
    m = tl.full([BLOCK_H], -float("inf"), tl.float32)
    if BLOCK_K == 1:
        for i in range(num_states):
            lse = tl.load(lse_ptr + row * s_ln + i * s_lk + offs_h * s_lh, mask=mask_h, other=-float("inf"))
            m = tl.maximum(m, lse)
    else:
        for k0 in range(0, num_states, BLOCK_K):
            in_k = (k0 + offs_k) < num_states
            lse = tl.load(lse_row + (k0 + offs_k)[:, None] * s_lk, mask=in_k[:, None] & mask_h[None, :],
                          other=-float("inf"))
            m = tl.maximum(m, tl.max(lse, 0))
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + offs_h, mask=mask_h, other=-float("inf"))
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == -float("inf"), 0.0, m)

    # Pass 2 streams the outputs once, each weighted by exp(lse_i - m) <= 1.
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if BLOCK_K == 1:
        for i in range(num_states):
            lse = tl.load(lse_ptr + row * s_ln + i * s_lk + offs_h * s_lh, mask=mask_h, other=-float("inf"))
            w = _weight(lse, m_safe)
            o = tl.load(o_ptr + row * s_on + i * s_ok + offs_h[:, None] * s_oh + offs_d[None, :] * s_od,
                        mask=mask, other=0.0)
            total += w
            acc += w[:, None] * o.to(tl.float32)
    else:
        for k0 in range(0, num_states, BLOCK_K):
            in_k = (k0 + offs_k) < num_states
            lse = tl.load(lse_row + (k0 + offs_k)[:, None] * s_lk, mask=in_k[:, None] & mask_h[None, :],
                          other=-float("inf"))
            w = _weight(lse, m_safe[None, :])                                              # [BLOCK_K, BLOCK_H]
            o = tl.load(o_row + (k0 + offs_k)[:, None, None] * s_ok,
                        mask=in_k[:, None, None] & mask[None, :, :], other=0.0)
            total += tl.sum(w, 0)
            acc += tl.sum(w[:, :, None] * o.to(tl.float32), 0)
    if HAS_SINKS:  # the sink is one more state whose value vector is zero
        total += _weight(sink, m_safe)

    o, lse = _finish(acc, total, m_safe)
    tl.store(out_ptr + row * s_outn + offs_h[:, None] * s_outh + offs_d[None, :] * s_outd,
             o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_lse_ptr + row * s_olsen + offs_h * s_olseh, lse, mask=mask_h)


@triton.jit
def _merge_two_kernel(
    oa_ptr, lsea_ptr,   # [n, H, D], [n, H]
    ob_ptr, lseb_ptr,   # [n, H, D], [n, H]
    out_ptr, out_lse_ptr,  # [n, H, D], [n, H]; may alias state a for an in-place merge
    num_heads, head_dim,
    s_oan, s_oah, s_oad, s_lan, s_lah,
    s_obn, s_obh, s_obd, s_lbn, s_lbh,
    s_outn, s_outh, s_outd, s_olsen, s_olseh,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge state a with state b for row ``n`` and ``BLOCK_H`` heads. Each element is read before it is
    written by the same program, so ``out`` may be state a itself."""
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < num_heads
    mask = mask_h[:, None] & (offs_d < head_dim)[None, :]

    lse_a = tl.load(lsea_ptr + row * s_lan + offs_h * s_lah, mask=mask_h, other=-float("inf"))
    lse_b = tl.load(lseb_ptr + row * s_lbn + offs_h * s_lbh, mask=mask_h, other=-float("inf"))
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    w_a = _weight(lse_a, m_safe)
    w_b = _weight(lse_b, m_safe)
    o_a = tl.load(oa_ptr + row * s_oan + offs_h[:, None] * s_oah + offs_d[None, :] * s_oad, mask=mask, other=0.0)
    o_b = tl.load(ob_ptr + row * s_obn + offs_h[:, None] * s_obh + offs_d[None, :] * s_obd, mask=mask, other=0.0)
    acc = w_a[:, None] * o_a.to(tl.float32) + w_b[:, None] * o_b.to(tl.float32)

    o, lse = _finish(acc, w_a + w_b, m_safe)
    tl.store(out_ptr + row * s_outn + offs_h[:, None] * s_outh + offs_d[None, :] * s_outd,
             o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_lse_ptr + row * s_olsen + offs_h * s_olseh, lse, mask=mask_h)
