"""Naive float64 PyTorch reference of every cascade_kernels entry point.

Written to be obviously right, not fast: keys are gathered token by token out of their pages, every
mask is built from explicit global positions, and every softmax is taken in float64 over the full set
of keys a query sees. No Triton. Outputs are float64; ``lse`` is the natural log of the softmax's sum of
exponentials, ``-inf`` (with a zero output) where a query sees no key.

``cascade_attention`` here does not merge per-level states: it gathers every level's keys for each
query token and takes one softmax, so it checks the library's merge path independently.
"""

from __future__ import annotations

import math

import torch

from .rope import append_kv, apply_rope, paged_slots, rotate_keys

__all__ = [
    "apply_rope",
    "append_kv",
    "paged_slots",
    "rotate_keys",
    "attention",
    "gather_segment",
    "paged_prefill",
    "paged_decode",
    "cascade_attention",
    "merge_state",
    "merge_states",
]

f64 = torch.float64


def _logits(q, k, q_pos, kv_pos, *, causal, sm_scale, window_left, softcap):
    """Scaled (and soft-capped) logits ``[Hq, Nq, Nk]`` with ``-inf`` where the mask hides a key."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # head h reads KV head h // group
    x = torch.einsum("qhd,khd->hqk", q.to(f64), k.to(f64)) * sm_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    visible = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
    if causal:
        qp = q_pos.to(torch.int64)[:, None]
        kp = kv_pos.to(torch.int64)[None, :]
        visible = kp <= qp
        if window_left is not None:
            visible = visible & (kp >= qp - window_left)
    return x.masked_fill(~visible[None], -math.inf)


def attention(q, k, v, q_pos, kv_pos, *, causal=True, sm_scale=None, window_left=None, softcap=None, sinks=None):
    """Dense attention with explicit global positions, in float64.

    Parameters
    ----------
    q : ``[Nq, Hq, D]``; k, v : ``[Nk, Hkv, D]`` with ``Hq % Hkv == 0``; q_pos ``[Nq]``, kv_pos ``[Nk]``
    integers. ``sinks`` (``[Hq]``) adds one logit per head whose value vector is zero.

    Returns
    -------
    o : ``[Nq, Hq, D]`` float64, lse : ``[Nq, Hq]`` float64 (natural log, ``-inf`` where nothing is visible).
    """
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    x = _logits(q, k, q_pos, kv_pos, causal=causal, sm_scale=sm_scale, window_left=window_left, softcap=softcap)
    if sinks is not None:  # one extra column per head: the sink logit, with a zero value vector
        sink_col = sinks.to(f64)[:, None, None].expand(-1, x.shape[1], 1)
        x = torch.cat([x, sink_col], dim=2)
    lse = torch.logsumexp(x, dim=2)  # [Hq, Nq]; -inf for an all -inf row
    p = torch.exp(x - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    if sinks is not None:
        p = p[..., :-1]
    group = q.shape[1] // v.shape[1]
    o = torch.einsum("hqk,khd->qhd", p, v.to(f64).repeat_interleave(group, dim=1))
    return o, lse.transpose(0, 1).contiguous()


def gather_segment(cache, kv, s):
    """Keys (or values) of segment ``s`` of ``kv`` as a dense ``[lens[s], Hkv, D]`` tensor, token by token."""
    page_size = cache.shape[1]
    pages = kv.indices[int(kv.indptr[s]) : int(kv.indptr[s + 1])].tolist()
    rows = [cache[pages[j // page_size], j % page_size] for j in range(int(kv.lens[s]))]
    if not rows:
        return cache.new_zeros((0, *cache.shape[2:]))
    return torch.stack(rows)


def segment_positions(kv, s):
    """Global positions ``[lens[s]]`` of segment ``s``'s tokens."""
    start = int(kv.start_pos[s])
    return torch.arange(start, start + int(kv.lens[s]), device=kv.lens.device)


def paged_prefill(q, q_pos, qo_indptr, k_cache, v_cache, kv, *, causal=True, sm_scale=None,
                  window_left=None, softcap=None, sinks=None):
    """Query segment ``s`` attends to KV segment ``s`` of the paged cache. Same signature as the kernel."""
    o = torch.zeros(q.shape, dtype=f64, device=q.device)
    lse = torch.full(q.shape[:2], -math.inf, dtype=f64, device=q.device)
    bounds = qo_indptr.tolist()
    for s in range(kv.num_segments):
        a, b = bounds[s], bounds[s + 1]
        if a == b:
            continue
        k = gather_segment(k_cache, kv, s)
        v = gather_segment(v_cache, kv, s)
        o[a:b], lse[a:b] = attention(q[a:b], k, v, q_pos[a:b], segment_positions(kv, s), causal=causal,
                                     sm_scale=sm_scale, window_left=window_left, softcap=softcap, sinks=sinks)
    return o, lse


def paged_decode(q, q_pos, k_cache, v_cache, kv, *, causal=True, sm_scale=None, window_left=None,
                 softcap=None, sinks=None):
    """One query token per KV segment: ``q`` is ``[S, Hq, D]``. Same signature as the kernel."""
    qo_indptr = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill(q, q_pos, qo_indptr, k_cache, v_cache, kv, causal=causal, sm_scale=sm_scale,
                         window_left=window_left, softcap=softcap, sinks=sinks)


def cascade_attention(q, q_pos, k_cache, v_cache, levels, *, causal=True, sm_scale=None, window_left=None,
                      softcap=None, sinks=None):
    """Each token attends, in one softmax, to the keys of its segment at every level.

    No state merging: for every query token the keys (and positions) of all levels are concatenated
    and :func:`attention` runs once, so sinks count once per query by construction.
    """
    o = torch.zeros(q.shape, dtype=f64, device=q.device)
    lse = torch.full(q.shape[:2], -math.inf, dtype=f64, device=q.device)
    gathered = [
        [(gather_segment(k_cache, lv.kv, s), gather_segment(v_cache, lv.kv, s), segment_positions(lv.kv, s))
         for s in range(lv.kv.num_segments)]
        for lv in levels
    ]
    bounds = [lv.qo_indptr.tolist() for lv in levels]
    for t in range(q.shape[0]):
        ks, vs, ps = [], [], []
        for level, (segments, b) in enumerate(zip(gathered, bounds)):
            s = next(s for s in range(len(b) - 1) if b[s] <= t < b[s + 1])  # the segment holding token t
            k, v, p = segments[s]
            ks.append(k), vs.append(v), ps.append(p)
        o[t : t + 1], lse[t : t + 1] = attention(
            q[t : t + 1], torch.cat(ks), torch.cat(vs), q_pos[t : t + 1], torch.cat(ps), causal=causal,
            sm_scale=sm_scale, window_left=window_left, softcap=softcap, sinks=sinks)
    return o, lse


def merge_states(o, lse):
    """Merge the ``k`` states of each row: ``o [n, k, H, D]``, ``lse [n, k, H]`` -> ``[n, H, D]``, ``[n, H]``.

    ``lse = log(sum_i exp(lse_i))`` and ``o = sum_i exp(lse_i - lse) o_i``; a row whose states are all
    ``-inf`` merges to ``-inf`` and zeros.
    """
    lse = lse.to(f64)
    total = torch.logsumexp(lse, dim=1)  # [n, H]
    w = torch.exp(lse - total[:, None].masked_fill(torch.isinf(total)[:, None], 0.0))  # [n, k, H]
    return torch.einsum("nkh,nkhd->nhd", w, o.to(f64)), total


def merge_state(o_a, lse_a, o_b, lse_b):
    """Merge two states ``o [n, H, D]``, ``lse [n, H]`` into one."""
    return merge_states(torch.stack([o_a, o_b], dim=1), torch.stack([lse_a, lse_b], dim=1))
