"""FlashInfer peers (0.7.2.post1, an ahead-of-time bundle for sm_90a): paged decode, paged
prefill (fa3, fa2), its multi-level cascade wrapper, a cascade built by hand from its pieces, and its
merges.

Conventions relied on (read in the bundle's ``flashinfer/decode.py``, ``prefill.py``, ``cascade.py``):
K/V pass as a tuple ``(k_cache, v_cache)`` of ``[num_pages, page_size, Hkv, D]`` (layout "NHD"); page
tables are int32 ``indptr [S+1]``, ``indices``, ``last_page_len [S]`` in ``1 .. page_size``; ``plan()``
takes ``q_data_type``/``kv_data_type`` (default float16, so always given); ``run(..., return_lse=True)``
returns ``(o, lse)`` with lse in base 2 (``finish`` converts it to natural log, outside the timing);
causal masks are aligned bottom-right, as our positions are. ``plan()`` is timed apart from ``run()``.
"""

from __future__ import annotations

import math

import torch

from ..runner import Impl, Unavailable

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
WORKSPACE_BYTES = 512 << 20

_FI = None
_WORKSPACE = {}


def _fi():
    """The ``flashinfer`` module, or Unavailable with the reason it cannot be imported."""
    global _FI
    if _FI is None:
        try:
            import flashinfer

            _FI = flashinfer
        except Exception as e:  # not installed, or its runtime dependency missing
            _FI = e
    if isinstance(_FI, Exception):
        raise Unavailable(f"flashinfer not importable ({type(_FI).__name__}: {str(_FI)[:160]})")
    return _FI


def _workspace(device) -> torch.Tensor:
    """One zeroed 512 MB float workspace per device, shared by the wrappers (they run one at a time)."""
    key = str(device)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _WORKSPACE[key]


def _require(data):
    """flashinfer, or Unavailable where its prebuilt modules (CUDA, bf16, head_dim 128) do not apply."""
    if data.q.device.type != "cuda":
        raise Unavailable("FlashInfer needs CUDA")
    fi = _fi()
    if data.q.dtype != torch.bfloat16 or data.q.shape[-1] != 128:
        raise Unavailable("the bundle holds bf16, head_dim 128 modules only")
    return fi


def _dims(data) -> tuple:
    s = data.shape
    return s.num_q_heads, s.num_kv_heads, s.head_dim


def _lse_natural(out):
    o, lse = out
    return o, lse * LN2


def decode_tc(data):
    """Factory: ``BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)``, one query a segment."""
    fi = _require(data)
    if not bool((data.qo_host[1:] - data.qo_host[:-1] == 1).all()):
        raise Unavailable("decode takes one query per segment")
    indptr, indices, last = data.seg.flashinfer_tables(data.device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(_workspace(data.device), "NHD", use_tensor_cores=True)

    def plan():
        w.plan(indptr, indices, last, *_dims(data), data.seg.page_size,
               q_data_type=data.q.dtype, kv_data_type=data.k_cache.dtype)

    plan()
    kv = (data.k_cache, data.v_cache)
    return Impl(run=lambda: w.run(data.q, kv, return_lse=True), finish=_lse_natural, plan=plan,
                note="tensor-core decode")


def prefill(backend: str):
    """Factory maker: ``BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)``, causal."""

    def factory(data):
        fi = _require(data)
        indptr, indices, last = data.seg.flashinfer_tables(data.device)
        w = fi.BatchPrefillWithPagedKVCacheWrapper(_workspace(data.device), "NHD", backend=backend)

        def plan():
            w.plan(data.qo_indptr, indptr, indices, last, *_dims(data), data.seg.page_size, causal=True,
                   q_data_type=data.q.dtype, kv_data_type=data.k_cache.dtype)

        plan()
        kv = (data.k_cache, data.v_cache)
        return Impl(run=lambda: w.run(data.q, kv, return_lse=True), finish=_lse_natural, plan=plan,
                    note=f"backend {backend}")

    return factory


def _cascade_tables(data):
    """Query indptrs and page tables of the two levels: the prefix for the whole batch, then each suffix."""
    b, dev = data.q.shape[0], data.device
    qo_top = torch.tensor([0, b], dtype=torch.int32, device=dev)
    qo_own = torch.arange(b + 1, dtype=torch.int32, device=dev)
    return qo_top, qo_own, data.prefix.flashinfer_tables(dev), data.suffix.flashinfer_tables(dev)


def cascade_wrapper(data):
    """Factory: ``MultiLevelCascadeAttentionWrapper(2, ws, "NHD")``; returns ``o`` only (no lse)."""
    fi = _require(data)
    qo_top, qo_own, top, own = _cascade_tables(data)
    w = fi.MultiLevelCascadeAttentionWrapper(2, _workspace(data.device), "NHD")

    def plan():
        w.plan([qo_top, qo_own], [top[0], own[0]], [top[1], own[1]], [top[2], own[2]], *_dims(data),
               data.prefix.page_size, causal=False, q_data_type=data.q.dtype, kv_data_type=data.k_cache.dtype)

    plan()
    kv = (data.k_cache, data.v_cache)
    return Impl(run=lambda: w.run(data.q, kv), finish=lambda o: (o, None), plan=plan,
                note="multi-level wrapper (backend auto)")


def cascade_by_hand(data):
    """Factory: fa2 prefill with ``return_lse=True`` over the prefix for the whole batch as one query
    segment, tensor-core decode over each suffix, then ``merge_state_in_place`` into the decode output."""
    fi = _require(data)
    qo_top, _, top, own = _cascade_tables(data)
    ws = _workspace(data.device)
    pre = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
    dec = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    dims, page, dt = _dims(data), data.prefix.page_size, data.q.dtype

    def plan():
        pre.plan(qo_top, *top, *dims, page, causal=False, q_data_type=dt, kv_data_type=dt)
        dec.plan(*own, *dims, page, q_data_type=dt, kv_data_type=dt)

    plan()
    kv = (data.k_cache, data.v_cache)

    def run():
        o_top, lse_top = pre.run(data.q, kv, return_lse=True)
        o, lse = dec.run(data.q, kv, return_lse=True)
        fi.merge_state_in_place(o, lse, o_top, lse_top)
        return o, lse

    return Impl(run=run, finish=_lse_natural, plan=plan, note="fa2 prefix + tc decode + merge_state_in_place")


def merge(data):
    """Factory: ``merge_state`` for two states, ``merge_states`` (``[n, k, H, D]``) for more."""
    if data.states[0][0].device.type != "cuda":
        raise Unavailable("FlashInfer needs CUDA")
    fi = _fi()
    if len(data.states) == 2:
        (o_a, l_a), (o_b, l_b) = data.states
        l_a2, l_b2 = l_a * LOG2E, l_b * LOG2E  # its lse is base 2
        run = lambda: fi.merge_state(o_a, l_a2, o_b, l_b2)  # noqa: E731
    else:
        o, lse = data.stacked
        lse2 = lse * LOG2E
        run = lambda: fi.merge_states(o, lse2)  # noqa: E731
    return Impl(run=run, finish=_lse_natural, note="base-2 lse")
