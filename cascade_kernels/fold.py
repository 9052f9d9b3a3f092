"""Folding a shared cascade level into the level after it, when reading it once does not pay.

A shared level costs one more kernel pass and one more merge slot; it saves reading its KV once per
request. For a short shared chunk the saving is smaller than the cost: measured on an H200 (batch 128,
own suffix 1024, page 16, bf16, 32/8 heads, head_dim 128; benchmarks/RESULTS.md, 2026-11-28) the
cascade was 0.94x the flat path at a 128-token shared prefix, 1.0x at 256 and 1.07x at 512; with the
decode configs tuned on several batches (2026-11-29) the flat path got faster and the cascade was 0.95x it
at 512 (folded 3.7% faster than kept apart) and 1.10x at 1024. So a level whose segments hold at most
``FOLD_MAX_KV`` tokens is folded: each segment of the next level gets the
pages of the shared segment its queries belong to, prepended to its own, and the two levels become one.
A level that no two segments of the next level share is always folded (cascading it saves nothing).

Folding is exact only where the two KV segments form one valid segment: the shared one fills whole
pages (so the next one starts on a page boundary) and the next starts at the position right after it.
Where that does not hold for every segment, the levels stay separate.
"""

from __future__ import annotations

import torch

from .types import CascadeLevel, PagedKV

FOLD_MAX_KV = 512


def _host(t: torch.Tensor) -> list[int]:
    return t.detach().to("cpu", torch.int64).tolist()


def _fold_pair(outer: CascadeLevel, inner: CascadeLevel, page_size: int) -> CascadeLevel | None:
    """One level equal to ``outer`` then ``inner``, or None when their segments cannot be joined."""
    o_qo, i_qo = _host(outer.qo_indptr), _host(inner.qo_indptr)
    o_ptr, i_ptr = _host(outer.kv.indptr), _host(inner.kv.indptr)
    o_idx, i_idx = _host(outer.kv.indices), _host(inner.kv.indices)
    o_len, i_len = _host(outer.kv.lens), _host(inner.kv.lens)
    o_pos, i_pos = _host(outer.kv.start_pos), _host(inner.kv.start_pos)
    indptr, indices, lens, start_pos = [0], [], [], []
    s = 0
    for t in range(len(i_len)):
        a, b = i_qo[t], i_qo[t + 1]
        pages = i_idx[i_ptr[t] : i_ptr[t + 1]]
        n, start = i_len[t], i_pos[t]
        if a < b:  # the outer segment holding this query segment; segments are ordered by token
            while s < len(o_len) and o_qo[s + 1] <= a:
                s += 1
            if s == len(o_len) or not (o_qo[s] <= a and b <= o_qo[s + 1]):
                return None  # the query segment straddles two outer segments
            m = o_len[s]
            if m:
                if n and (m % page_size or i_pos[t] != o_pos[s] + m):
                    return None
                pages = o_idx[o_ptr[s] : o_ptr[s] + -(-m // page_size)] + (pages if n else [])
                n, start = m + n, o_pos[s]
        indices += pages
        indptr.append(len(indices))
        lens.append(n)
        start_pos.append(start)
    device = inner.kv.device
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    kv = PagedKV(indptr=i32(indptr), indices=i32(indices), lens=i32(lens), start_pos=i32(start_pos))
    return CascadeLevel(inner.qo_indptr, kv)


def _worth_folding(outer: CascadeLevel, inner: CascadeLevel) -> bool:
    """Fold a short shared level, or one that no two query segments of the next level share."""
    if max(_host(outer.kv.lens), default=0) <= FOLD_MAX_KV:
        return True
    o_qo, i_qo = _host(outer.qo_indptr), _host(inner.qo_indptr)
    starts = [i_qo[t] for t in range(len(i_qo) - 1) if i_qo[t] < i_qo[t + 1]]
    readers = [sum(1 for a in starts if o_qo[s] <= a < o_qo[s + 1]) for s in range(len(o_qo) - 1)]
    return max(readers, default=0) <= 1


def fold_levels(levels: list[CascadeLevel], page_size: int, fold: bool | None) -> list[CascadeLevel]:
    """``levels`` with every foldable level joined into the next (``fold=None``: where it does not pay
    to keep it apart; ``True``: wherever the layout allows; ``False``: never)."""
    if fold is False:
        return list(levels)
    out = [levels[0]]
    for inner in levels[1:]:
        outer = out[-1]
        joined = _fold_pair(outer, inner, page_size) if (fold or _worth_folding(outer, inner)) else None
        if joined is None:
            out.append(inner)
        else:
            out[-1] = joined
    return out
