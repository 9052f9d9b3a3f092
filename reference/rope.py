"""Naive float64 reference of the RoPE and KV-append entry points of cascade_kernels.

Same signatures as the kernels. The rotation is written as the textbook formula on explicit pairs, with
the angle ``pos * theta ** (-2i / R)`` and its ``cos``/``sin`` taken in float64 (angle error below 3e-7
rad at any int32 position). Paged writes go token by token through ``page = slot // page_size``.
"""

from __future__ import annotations

import torch

f64 = torch.float64

__all__ = ["rope_angles", "apply_rope", "append_kv", "rotate_keys", "paged_slots"]


def rope_angles(pos, rotary_dim, theta):
    """Angles ``[N, R/2]`` float64: ``pos[n] * theta ** (-2i / R)``."""
    inv_freq = theta ** -(torch.arange(0, rotary_dim, 2, dtype=f64, device=pos.device) / rotary_dim)
    return pos.to(f64)[:, None] * inv_freq[None, :]


def _pair_dims(rotary_dim, interleave):
    """Index tensors of the first and second element of each pair."""
    i = torch.arange(rotary_dim // 2)
    return (2 * i, 2 * i + 1) if interleave else (i, i + rotary_dim // 2)


def apply_rope(x, pos, *, theta=10000.0, interleave=False, rotary_dim=None, out=None):
    """Rotate pair ``i`` of every head of token ``n`` by ``pos[n] * theta ** (-2i / R)``; float64 result.

    ``x`` ``[N, H, D]``, ``pos`` ``[N]``. Pairs ``(i, i + R/2)``, or ``(2i, 2i + 1)`` with ``interleave``;
    dims ``R ... D-1`` unchanged. Returns ``[N, H, D]`` float64 (written into ``out`` too when given).
    """
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    a = rope_angles(pos, rotary_dim, theta)[:, None, :]  # [N, 1, R/2]
    cos, sin = torch.cos(a), torch.sin(a)
    d1, d2 = _pair_dims(rotary_dim, interleave)
    x = x.to(f64)
    y = x.clone()
    y[..., d1] = x[..., d1] * cos - x[..., d2] * sin
    y[..., d2] = x[..., d2] * cos + x[..., d1] * sin
    if out is not None:
        out.copy_(y)
    return y


def append_kv(k, v, k_cache, v_cache, slots, *, pos=None, rope_theta=None, rope_interleave=False,
              rotary_dim=None):
    """Write token ``n`` to ``cache[slots[n] // page_size, slots[n] % page_size]``, the key rotated at
    ``pos[n]`` when ``rope_theta`` is given; slots ``< 0`` are skipped. Writes in place (pass float64
    caches to keep the reference's precision)."""
    if rope_theta is not None:
        k = apply_rope(k, pos, theta=rope_theta, interleave=rope_interleave, rotary_dim=rotary_dim)
    page_size = k_cache.shape[1]
    for n, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        k_cache[slot // page_size, slot % page_size] = k[n]
        v_cache[slot // page_size, slot % page_size] = v[n]


def rotate_keys(k_cache, kv, delta, *, theta, interleave=False, rotary_dim=None):
    """Rotate, in place, the ``lens[s]`` cached keys of every segment ``s`` of ``kv`` by ``delta[s]``."""
    page_size = k_cache.shape[1]
    for s in range(kv.num_segments):
        pages = kv.indices[int(kv.indptr[s]) : int(kv.indptr[s + 1])].tolist()
        for j in range(int(kv.lens[s])):
            page, off = pages[j // page_size], j % page_size
            shift = delta[s : s + 1].to(torch.int64)
            k_cache[page, off] = apply_rope(k_cache[page, off][None], shift, theta=theta, interleave=interleave,
                                            rotary_dim=rotary_dim)[0]
    return k_cache


def paged_slots(kv, qo_indptr, page_size, *, num_tokens=None):
    """Slots (int64) and positions (int32) of tokens appended to each segment, token by token, and the
    segments' new lengths ``[S]`` (int32)."""
    slots, pos = [], []
    bounds = qo_indptr.tolist()
    lens = kv.lens.tolist()
    for s in range(kv.num_segments):
        pages = kv.indices[int(kv.indptr[s]) : int(kv.indptr[s + 1])].tolist()
        for j in range(bounds[s + 1] - bounds[s]):
            i = lens[s] + j
            slots.append(pages[i // page_size] * page_size + i % page_size)
            pos.append(int(kv.start_pos[s]) + i)
        lens[s] += bounds[s + 1] - bounds[s]
    return (torch.tensor(slots, dtype=torch.int64), torch.tensor(pos, dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32))
