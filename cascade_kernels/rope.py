"""Rotary position embeddings at global positions, fused with the paged KV append.

Keys are cached already rotated at their global positions, so attention over any partition of the
cache into chunks sees exactly the keys that standard attention over the whole sequence sees. Three
entry points:

- :func:`apply_rope` rotates queries (or anything) at explicit global positions;
- :func:`append_kv` writes new keys and values into a paged cache at flat slots, rotating the keys first;
- :func:`rotate_keys` shifts the cached keys of PagedKV segments to other positions in place, for reusing
  a cached chunk elsewhere (``R(p + d) = R(d) R(p)``).

:func:`paged_slots` computes the slots and positions of tokens appended to the segments of a
:class:`PagedKV`, and the ``PagedKV`` to attend over afterwards.

Angles are reduced in fp64 before the fp32 ``cos``/``sin`` (see ``_rope_kernels.py``): rotations stay
accurate to 1e-6 rad at every int32 position, where an fp32 angle is off by degrees at position 1M.
"""

from __future__ import annotations

import functools
import math

import torch

from ._rope_kernels import _append_kv_kernel, _rope_kernel, _rotate_keys_kernel
from ._triton import cdiv, interpreting, padded
from ._validation import FLOAT_DTYPES, check_indptr, check_tensor, validation_enabled
from .types import PagedKV

__all__ = ["apply_rope", "append_kv", "rotate_keys", "paged_slots"]

# A program covers BLOCK_N tokens x BLOCK_H heads x BLOCK_HALF pairs: 2048 pairs (4096 elements) keep
# 16-byte accesses in every thread of 4 warps, as in merge.py. The interpreter runs programs one after
# another in Python at a fixed cost each, so there a program takes 32x more pairs (measured: 93 tokens x
# 3 heads x 32 pairs went from 0.65 s as one program per token to 0.01 s as one program).
_PAIRS_PER_PROGRAM = 2048
_PAIRS_PER_PROGRAM_INTERPRETED = 65536


@functools.lru_cache(maxsize=64)
def _turns(theta: float, rotary_dim: int, device: torch.device) -> torch.Tensor:
    """``inv_freq / 2pi`` in turns per position, fp64 ``[rotary_dim / 2]``, computed once per device.

    ``inv_freq[i] = theta ** (-2i / rotary_dim)`` is evaluated in fp64: in fp32 its relative error of
    6e-8 alone moves the angle at position 1M by 0.06 rad.
    """
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return (theta ** -exponent / (2 * math.pi)).to(device)


def _check_theta(name: str, theta: object) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0 or math.isinf(theta):
        raise ValueError(f"{name} must be a finite float > 0, got {theta!r}")
    return float(theta)


def _check_rotary_dim(rotary_dim: object, head_dim: int) -> int:
    if rotary_dim is None:
        rotary_dim = head_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be None or an int, got {type(rotary_dim).__name__}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim = {head_dim}], got {rotary_dim}")
    return rotary_dim


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _blocks(num_rows: int, num_heads: int, half: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_H, BLOCK_HALF, BLOCK_PASS)``, powers of two: all pairs, then as many heads and
    then rows (tokens or slots) as fill a program."""
    budget = _PAIRS_PER_PROGRAM_INTERPRETED if interpreting() else _PAIRS_PER_PROGRAM
    block_half = padded(half, minimum=1)
    block_pass = padded(head_dim - 2 * half, minimum=1)
    block_h = min(padded(num_heads, minimum=1), max(1, budget // block_half))
    block_n = min(padded(num_rows, minimum=1), max(1, budget // (block_h * block_half)))
    return block_n, block_h, block_half, block_pass


def apply_rope(x, pos, *, theta=10000.0, interleave=False, rotary_dim=None, out=None):
    """Rotate every head of every token by its global position (rotary position embedding).

    Pair ``i < R/2`` of a head, ``(x[i], x[i + R/2])`` (or ``(x[2i], x[2i + 1])`` with
    ``interleave=True``), is rotated by the angle ``pos * theta ** (-2i / R)``; dims ``R ... D-1`` pass
    through unchanged. Computed in fp32 with the angle reduced in fp64 (accurate at any int32 position),
    rounded once to the output dtype.

    Parameters
    ----------
    x : torch.Tensor
        ``[N, H, D]`` fp16/bf16/fp32, any strides.
    pos : torch.Tensor
        ``[N]`` int32, the global position of each token (any sign).
    theta : float
        RoPE base (``10000.0`` for LLaMA 1/2, ``500000.0`` for LLaMA 3, ``1e5`` for SmolLM2).
    interleave : bool
        False (default): rotate halves, pairs ``(i, i + R/2)`` (GPT-NeoX, HF checkpoints).
        True: adjacent pairs ``(2i, 2i + 1)`` (GPT-J, Meta's LLaMA, GGUF files).
    rotary_dim : int, optional
        ``R``, the number of rotated dims (even, at most ``D``); default ``D``.
    out : torch.Tensor, optional
        ``[N, H, D]`` fp16/bf16/fp32, any strides; may be ``x`` itself for an in-place rotation.

    Returns
    -------
    torch.Tensor
        ``[N, H, D]``: ``out``, or a new tensor of ``x``'s dtype, shape and device.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> q = torch.randn(5, 8, 64)
    >>> pos = torch.tensor([0, 1, 2, 1000, 1000000], dtype=torch.int32)
    >>> q_rot = ck.apply_rope(q, pos, theta=10000.0)   # doctest: +SKIP
    >>> q_rot.shape                                     # doctest: +SKIP
    torch.Size([5, 8, 64])
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    n, num_heads, head_dim = x.shape
    check_tensor("pos", pos, dtypes=(torch.int32,), shape=(n,), device=x.device)
    theta = _check_theta("theta", theta)
    interleave = _check_bool("interleave", interleave)
    rotary_dim = _check_rotary_dim(rotary_dim, head_dim)
    if out is None:
        out = torch.empty_like(x)
    else:
        check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(n, num_heads, head_dim), device=x.device)
    if n == 0 or num_heads == 0:
        return out
    half = rotary_dim // 2
    block_n, block_h, block_half, block_pass = _blocks(n, num_heads, half, head_dim)
    _rope_kernel[(cdiv(n, block_n), cdiv(num_heads, block_h))](
        x, out, pos, _turns(theta, rotary_dim, x.device),
        n, num_heads, head_dim, half,
        *x.stride(), *out.stride(),
        INTERLEAVE=interleave, COPY_PASS=rotary_dim < head_dim and out.data_ptr() != x.data_ptr(),
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass, num_warps=4,
    )
    return out


def append_kv(k, v, k_cache, v_cache, slots, *, pos=None, rope_theta=None, rope_interleave=False,
              rotary_dim=None):
    """Write ``N`` new tokens' keys and values into a paged cache, rotating the keys at their positions.

    Token ``n`` goes to page ``slots[n] // page_size``, offset ``slots[n] % page_size``. With
    ``rope_theta`` the key is stored rotated at its global position ``pos[n]`` (as :func:`apply_rope`),
    in one pass: the cache then holds keys at global positions, which is what makes chunked attention
    equal standard attention. Values are copied. Stores cast to the cache dtype (rounded once).

    Parameters
    ----------
    k, v : torch.Tensor
        ``[N, Hkv, D]`` fp16/bf16/fp32, any strides.
    k_cache, v_cache : torch.Tensor
        ``[num_pages, page_size, Hkv, D]`` fp16/bf16/fp32, any strides (an HND cache as
        ``.transpose(1, 2)``, or each half of a fused ``[num_pages, 2, ...]`` cache). Written in place.
    slots : torch.Tensor
        ``[N]`` int64 flat slots ``page * page_size + offset``; ``-1`` skips a token (padding). When
        validation is on, slots must lie in ``[-1, num_pages * page_size)`` and be distinct.
    pos : torch.Tensor, optional
        ``[N]`` int32 global positions; required with ``rope_theta``, not allowed without it.
    rope_theta : float, optional
        RoPE base; None (default) stores the keys as they are.
    rope_interleave : bool
        Pair layout of the rotation, as ``interleave`` in :func:`apply_rope`.
    rotary_dim : int, optional
        Rotated dims of each key (default ``D``), as in :func:`apply_rope`.

    Returns
    -------
    None

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> k_cache, v_cache = torch.zeros(2, 8, 4, 10, 64).unbind(0)   # 10 pages of 8 slots, 4 KV heads
    >>> k, v = torch.randn(2, 3, 4, 64).unbind(0)                    # 3 new tokens
    >>> slots = torch.tensor([40, 41, 42])                           # page 5, offsets 0..2
    >>> pos = torch.tensor([100, 101, 102], dtype=torch.int32)
    >>> ck.append_kv(k, v, k_cache, v_cache, slots, pos=pos, rope_theta=1e4)   # doctest: +SKIP
    """
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    n, num_heads, head_dim = k.shape
    device = k.device
    check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=(n, num_heads, head_dim), device=device)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    num_pages, page_size = k_cache.shape[:2]
    check_tensor("k_cache", k_cache, shape=(None, None, num_heads, head_dim))
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, shape=tuple(k_cache.shape), device=device)
    check_tensor("slots", slots, dtypes=(torch.int64,), shape=(n,), device=device)
    rope_interleave = _check_bool("rope_interleave", rope_interleave)
    rope = rope_theta is not None
    if rope:
        rope_theta = _check_theta("rope_theta", rope_theta)
        check_tensor("pos", pos, dtypes=(torch.int32,), shape=(n,), device=device)
        rotary_dim = _check_rotary_dim(rotary_dim, head_dim)
    elif pos is not None or rotary_dim is not None:
        raise ValueError("pos and rotary_dim need rope_theta (without it keys are stored unrotated)")
    if validation_enabled() and n:
        used = slots[slots >= 0]
        if bool((slots < -1).any()) or (used.numel() and int(used.max().item()) >= num_pages * page_size):
            raise ValueError(
                f"slots must be -1 or in [0, num_pages * page_size = {num_pages * page_size}), "
                f"got values in [{int(slots.min().item())}, {int(slots.max().item())}]"
            )
        if used.unique().numel() != used.numel():
            raise ValueError("slots must be distinct (two tokens written to one slot)")
    if n == 0 or num_heads == 0:
        return
    half = rotary_dim // 2 if rope else head_dim // 2
    block_n, block_h, block_half, block_pass = _blocks(n, num_heads, half, head_dim)
    turns = _turns(rope_theta, rotary_dim, device) if rope else slots
    _append_kv_kernel[(cdiv(n, block_n), cdiv(num_heads, block_h))](
        k, v, k_cache, v_cache, slots, pos if rope else slots, turns,
        n, num_heads, head_dim, half, page_size,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        ROPE=rope, INTERLEAVE=rope_interleave, COPY_PASS=rope and rotary_dim < head_dim,
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=padded(head_dim, minimum=1), BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass, num_warps=4,
    )


def rotate_keys(k_cache, kv, delta, *, theta, interleave=False, rotary_dim=None):
    """Move the cached keys of each segment of ``kv`` by ``delta[s]`` positions, in place.

    RoPE composes, ``R(p + d) = R(d) R(p)``: a key cached rotated at position ``p`` becomes exactly the
    key at ``p + d``. This reuses a cached chunk (a document, a prompt) at another global position without
    recomputing it; the caller then attends with ``start_pos + delta``. Values do not depend on position
    and are left alone. Only the ``lens[s]`` filled slots of each segment are touched.

    Parameters
    ----------
    k_cache : torch.Tensor
        ``[num_pages, page_size, Hkv, D]`` fp16/bf16/fp32, any strides; rotated in place.
    kv : PagedKV
        ``S`` segments whose keys to move. A page may belong to one segment only (checked when
        validation is on): a page listed twice would be rotated twice.
    delta : torch.Tensor
        ``[S]`` int32, the shift of each segment (any sign).
    theta, interleave, rotary_dim
        As in :func:`apply_rope`; must match how the keys were rotated.

    Returns
    -------
    torch.Tensor
        ``k_cache``.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> k_cache = torch.randn(4, 16, 2, 64)
    >>> doc = ck.PagedKV(indptr=i32(0, 2), indices=i32(3, 1), lens=i32(20), start_pos=i32(0))
    >>> ck.rotate_keys(k_cache, doc, i32(500), theta=1e4)   # doctest: +SKIP
    >>> moved = ck.PagedKV(doc.indptr, doc.indices, doc.lens, doc.start_pos + 500)
    """
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    num_pages, page_size, num_heads, head_dim = k_cache.shape
    if not isinstance(kv, PagedKV):
        raise TypeError(f"kv must be a PagedKV, got {type(kv).__name__}")
    check_tensor("kv.indptr", kv.indptr, device=k_cache.device)
    check_tensor("delta", delta, dtypes=(torch.int32,), shape=(kv.num_segments,), device=k_cache.device)
    theta = _check_theta("theta", theta)
    interleave = _check_bool("interleave", interleave)
    rotary_dim = _check_rotary_dim(rotary_dim, head_dim)
    kv.check_pages(page_size, num_pages, name="kv")
    if validation_enabled():
        pages = kv.indices[: int(kv.indptr[-1].item())]
        if pages.unique().numel() != pages.numel():
            raise ValueError("kv.indices lists a page twice: its keys would be rotated twice")
    num_entries = kv.indices.numel()
    if num_entries == 0 or kv.num_segments == 0 or num_heads == 0:
        return k_cache
    half = rotary_dim // 2
    block_t, block_h, block_half, _ = _blocks(page_size, num_heads, half, head_dim)
    grid = (num_entries, cdiv(page_size, block_t), cdiv(num_heads, block_h))
    _rotate_keys_kernel[grid](
        k_cache, kv.indptr, kv.indices, kv.lens, delta, _turns(theta, rotary_dim, k_cache.device),
        kv.num_segments, num_heads, head_dim, half, page_size,
        *k_cache.stride(),
        SEARCH_STEPS=max(1, math.ceil(math.log2(kv.num_segments + 1))), INTERLEAVE=interleave,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
    )
    return k_cache


def paged_slots(kv, qo_indptr, page_size, *, num_tokens=None):
    """Slots and positions for appending tokens to the segments of ``kv``, and the ``PagedKV`` after it.

    Tokens ``qo_indptr[s] ... qo_indptr[s + 1] - 1`` (in the order the model sees them) are appended to
    segment ``s`` after its ``lens[s]`` tokens: the ``i``-th token of the segment lives in page
    ``indices[indptr[s] + i // page_size]`` at offset ``i % page_size``, at global position
    ``start_pos[s] + i``. The segments' pages must already be allocated (checked when validation is on).

    A prefill or decode step is then::

        slots, pos, kv = ck.paged_slots(kv, qo_indptr, page_size)
        ck.append_kv(k, v, k_cache, v_cache, slots, pos=pos, rope_theta=theta)
        o, lse = ck.cascade_attention(q_rotated, pos, k_cache, v_cache, [*shared, ck.CascadeLevel(qo_indptr, kv)])

    Parameters
    ----------
    kv : PagedKV
        ``S`` segments before the append.
    qo_indptr : torch.Tensor
        ``[S + 1]`` int32, non-decreasing from 0: the new tokens of each segment.
    page_size : int
        Slots per page of the cache.
    num_tokens : int, optional
        ``qo_indptr[-1]``, the number of new tokens; given, no device-to-host copy is needed (with
        validation off), else it is read from ``qo_indptr``.

    Returns
    -------
    slots : torch.Tensor
        ``[num_tokens]`` int64, for :func:`append_kv`.
    pos : torch.Tensor
        ``[num_tokens]`` int32 global positions, for :func:`append_kv` and as the queries' ``q_pos``.
    kv_after : PagedKV
        ``kv`` with ``lens + (qo_indptr[1:] - qo_indptr[:-1])``.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> kv = ck.PagedKV(indptr=i32(0, 2, 3), indices=i32(4, 0, 7), lens=i32(14, 0), start_pos=i32(0, 40))
    >>> slots, pos, kv = ck.paged_slots(kv, i32(0, 2, 3), page_size=8)
    >>> slots.tolist(), pos.tolist(), kv.lens.tolist()
    ([6, 7, 56], [14, 15, 40], [16, 1])
    """
    if not isinstance(kv, PagedKV):
        raise TypeError(f"kv must be a PagedKV, got {type(kv).__name__}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    num_segments = kv.num_segments
    check_tensor("qo_indptr", qo_indptr, dtypes=(torch.int32,), shape=(num_segments + 1,), device=kv.device)
    if num_tokens is None:
        num_tokens = int(qo_indptr[-1].item())
    elif isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be None or an int >= 0, got {num_tokens!r}")
    check_indptr("qo_indptr", qo_indptr, end=num_tokens, end_name="num_tokens")
    counts = qo_indptr[1:] - qo_indptr[:-1]
    lens_after = kv.lens + counts
    if validation_enabled():
        room = (kv.indptr[1:] - kv.indptr[:-1]).long() * page_size
        over = lens_after.long() > room
        if bool(over.any()):
            s = int(over.nonzero()[0].item())
            raise ValueError(
                f"qo_indptr appends {int(counts[s].item())} tokens to segment {s}, which holds "
                f"{int(kv.lens[s].item())} of the {int(room[s].item())} slots its pages have"
            )
    seg = torch.repeat_interleave(
        torch.arange(num_segments, device=kv.device), counts.long(), output_size=num_tokens
    )
    i = (torch.arange(num_tokens, device=kv.device) - qo_indptr[seg] + kv.lens[seg]).long()
    page = kv.indices[kv.indptr[seg].long() + i // page_size].long()
    slots = page * page_size + i % page_size
    pos = (kv.start_pos[seg] + i).to(torch.int32)
    return slots, pos, PagedKV(kv.indptr, kv.indices, lens_after.to(torch.int32), kv.start_pos)
