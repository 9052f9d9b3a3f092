"""PyTorch peers: SDPA (flash, cuDNN) and FlexAttention on contiguous KV, a naive paged baseline,
a torch cascade composition, and a torch merge of attention states.

Contiguous-KV peers are an upper bound that a paged kernel must approach: their KV is copied out of
the pages once, at setup, into ``[G, L, Hkv, D]`` (the layout flash kernels read natively) and passed as
``[G, Hkv, L, D]`` views. Segments of one shape (query count, KV length) form a group and run as one
batched call; a ragged batch runs one call per group.

Positions follow the usual append layout (``layout.attn_data``): a segment's queries are its last
tokens, so "causal" is SDPA's ``is_causal`` when queries and keys are equally many, the lower-right
causal bias when keys also hold cached tokens, and no mask for a single decode query.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..runner import Impl, Unavailable

LN2 = math.log(2.0)


def _groups(data) -> list[tuple[list[int], int, int]]:
    """Segments grouped by (query count, KV length): ``[(segments, n_q, kv_len)]`` in first-seen order."""
    qo = data.qo_host
    groups: dict[tuple[int, int], list[int]] = {}
    for s in range(data.seg.num_segments):
        groups.setdefault((int(qo[s + 1] - qo[s]), int(data.seg.lens[s])), []).append(s)
    return [(segs, nq, kv_len) for (nq, kv_len), segs in groups.items() if nq > 0]


def _query_rows(data, segs) -> torch.Tensor:
    """Row indices of ``q`` of segments ``segs``, in order (device int64)."""
    qo = data.qo_host
    return torch.cat([torch.arange(int(qo[s]), int(qo[s + 1])) for s in segs]).to(data.device)


def _mask(nq: int, kv_len: int) -> dict:
    """SDPA mask arguments for ``nq`` queries that are the last of ``kv_len`` keys, causal."""
    if nq == 1:
        return {}
    if nq == kv_len:
        return {"is_causal": True}
    from torch.nn.attention.bias import causal_lower_right

    return {"attn_mask": causal_lower_right(nq, kv_len)}


class _Grouped:
    """Per group: queries ``[G, Hq, nq, D]`` and output rows; dense keys/values built by ``kv_fn``."""

    def __init__(self, data):
        self.data = data
        self.groups = []
        for segs, nq, kv_len in _groups(data):
            rows = _query_rows(data, segs)
            q = data.q[rows].view(len(segs), nq, *data.q.shape[1:]).transpose(1, 2)
            self.groups.append((segs, nq, kv_len, rows, q))

    def finish(self, outs):
        """Scatter the groups' outputs ``[G, Hq, nq, D]`` back into ``[N, Hq, D]``; no lse."""
        o = torch.zeros_like(self.data.q)
        for (segs, nq, _, rows, _), out in zip(self.groups, outs):
            o[rows] = out.transpose(1, 2).reshape(len(segs) * nq, *o.shape[1:]).to(o.dtype)
        return o, None


def _sdpa_impl(data, backends, kv_fn, label_note, kv_static):
    """SDPA over every group, with keys/values from ``kv_fn(segs) -> (k, v)`` ``[G, Hkv, L, D]``.

    ``kv_static``: ``kv_fn`` returns tensors made at setup (fetched once here) rather than work done on
    every call. Tries native GQA (``enable_gqa=True``) first; if the backend refuses it, repeats the KV
    heads (at setup when static) and says so in the row's note: that moves ``group`` times the KV bytes.
    """
    from torch.nn.attention import sdpa_kernel

    grouped = _Grouped(data)
    group = data.shape.group

    def repeated(k, v):
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    def make(repeat: bool):
        prepared = []
        for segs, nq, kv_len, _, q in grouped.groups:
            kv = (repeated(*kv_fn(segs)) if repeat else kv_fn(segs)) if kv_static else None
            prepared.append((q, segs, kv, _mask(nq, kv_len)))

        def run():
            outs = []
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                for q, segs, kv, mask in prepared:
                    k, v = kv if kv is not None else (repeated(*kv_fn(segs)) if repeat else kv_fn(segs))
                    outs.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=not repeat, **mask))
            return outs

        return run

    run = make(repeat=False)
    note = label_note
    try:
        run()
    except RuntimeError as first:
        try:
            run = make(repeat=True)
            run()
        except RuntimeError:
            # the backend refuses this case (shape, mask, GQA): not applicable here, say why
            raise Unavailable(f"backend refused: {str(first).strip().splitlines()[0][:200]}") from None
        note = f"{label_note}; GQA refused: KV heads repeated x{group}"
    return Impl(run=run, finish=grouped.finish, note=note)


def _dense_kv(data):
    """``kv_fn`` over contiguous copies of every group's keys and values (made once, here)."""
    cache = {}
    for segs, _, _ in _groups(data):
        cache[tuple(segs)] = (data.seg.dense_batch(data.k_cache, segs).transpose(1, 2),
                              data.seg.dense_batch(data.v_cache, segs).transpose(1, 2))
    return lambda segs: cache[tuple(segs)]


def sdpa(backend_name: str):
    """Factory: SDPA restricted to one backend (``"flash"`` or ``"cudnn"``) on contiguous KV."""

    def factory(data):
        if data.device.type != "cuda":
            raise Unavailable(f"SDPA {backend_name} needs CUDA")
        from torch.nn.attention import SDPBackend

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
        return _sdpa_impl(data, [backend], _dense_kv(data), "contiguous KV", kv_static=True)

    return factory


def naive_paged(data):
    """Factory: gather each group's pages with ``index_select`` on every call, then default SDPA."""
    seg, page = data.seg, data.seg.page_size
    pages = {}
    for segs, _, kv_len in _groups(data):
        pages[tuple(segs)] = (torch.stack([seg.pages(s) for s in segs]).to(data.device), kv_len)

    def kv_fn(segs):
        idx, kv_len = pages[tuple(segs)]
        g = len(segs)
        k = data.k_cache.index_select(0, idx.flatten()).view(g, -1, *data.k_cache.shape[2:])[:, :kv_len]
        v = data.v_cache.index_select(0, idx.flatten()).view(g, -1, *data.v_cache.shape[2:])[:, :kv_len]
        return k.transpose(1, 2), v.transpose(1, 2)

    return _sdpa_impl(data, None, kv_fn, f"gathers pages of {page} every call", kv_static=False)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex(data):
    """Factory: ``torch.compile``'d ``flex_attention`` with a causal block mask, contiguous KV, one group."""
    if data.device.type != "cuda":
        raise Unavailable("FlexAttention compiled needs CUDA here")
    groups = _groups(data)
    if len(groups) != 1:
        raise Unavailable("ragged batch (one flex call needs one shape)")
    from torch.nn.attention.flex_attention import create_block_mask

    segs, nq, kv_len = groups[0]
    offset = kv_len - nq

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    block_mask = create_block_mask(causal, None, None, nq, kv_len, device=data.device)
    grouped = _Grouped(data)
    q = grouped.groups[0][4]
    k, v = _dense_kv(data)(segs)
    fn = _compiled_flex()
    kwargs = dict(block_mask=block_mask, enable_gqa=True)
    note = "contiguous KV, compiled"
    try:
        fn(q, k, v, **kwargs)
    except Exception as err:  # noqa: BLE001 - Inductor found no kernel choice for its default tiles
        # Seen on an H200 (torch 2.11, triton 3.6) for the 16K-token prefill: "NoValidChoicesError". Retry
        # once with the smaller tiles Inductor's own flex heuristics use for long head dims.
        kwargs["kernel_options"] = dict(BLOCK_M=64, BLOCK_N=64, num_stages=2, num_warps=4)
        note = f"contiguous KV, compiled with 64x64 tiles (default tiles: {type(err).__name__})"
    return Impl(run=lambda: [fn(q, k, v, **kwargs)], finish=grouped.finish, note=note)


def _attend_lse(q, k, v):
    """Non-causal attention ``q [B, H, Lq, D]`` over ``k, v [B, H, L, D]`` -> ``(o [B, H, Lq, D],
    lse [B, H, Lq] fp32 natural log)``: the flash kernel on CUDA, plain float32 math elsewhere."""
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
        return out[0], out[1][..., : q.shape[2]]
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse


def torch_cascade(data):
    """Factory: the cascade built from torch pieces, on contiguous KV.

    The batch's ``B`` decode queries are packed into one query block per KV head (``[1, Hkv, B*g, D]``)
    for one flash call over the shared prefix; each request's own suffix is one more flash call
    (``[B, Hkv, g, D]`` over ``[B, Hkv, S, D]``); ``ck.merge_state`` merges the two states.
    """
    import cascade_kernels as ck

    if len(set(data.suffix.lens.tolist())) != 1:
        raise Unavailable("suffixes of different lengths")
    b, hq, d = data.q.shape
    hkv, g = data.shape.num_kv_heads, data.shape.group
    kp = data.prefix.dense(data.k_cache, 0)[None].transpose(1, 2)  # [1, Hkv, P, D]
    vp = data.prefix.dense(data.v_cache, 0)[None].transpose(1, 2)
    segs = list(range(b))
    ks = data.suffix.dense_batch(data.k_cache, segs).transpose(1, 2)  # [B, Hkv, S, D]
    vs = data.suffix.dense_batch(data.v_cache, segs).transpose(1, 2)

    def run():
        qg = data.q.view(b, hkv, g, d)
        qp = qg.permute(1, 0, 2, 3).reshape(1, hkv, b * g, d)
        op, lp = _attend_lse(qp, kp, vp)
        op = op.reshape(hkv, b, g, d).permute(1, 0, 2, 3).reshape(b, hq, d)
        lp = lp.reshape(hkv, b, g).permute(1, 0, 2).reshape(b, hq)
        os_, ls = _attend_lse(qg, ks, vs)
        return ck.merge_state(op, lp.float(), os_.reshape(b, hq, d), ls.reshape(b, hq).float())

    return Impl(run=run, note="contiguous KV, flash + ck.merge_state")


def merge_torch(states):
    """Merge a list of states ``(o [n, H, D], lse [n, H] fp32)`` with torch ops, guarding all ``-inf``."""
    m = states[0][1]
    for _, lse in states[1:]:
        m = torch.maximum(m, lse)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    total = torch.zeros_like(m)
    acc = None
    for o, lse in states:
        w = torch.exp(lse - m)
        total = total + w
        term = w[..., None] * o.float()
        acc = term if acc is None else acc + term
    o = (acc / torch.where(total == 0, 1.0, total)[..., None]).to(states[0][0].dtype)
    lse = torch.where(total == 0, -math.inf, m + torch.log(total))
    return o, lse


def torch_merge(data):
    """Factory: the merge of ``data.states`` in eager torch."""
    return Impl(run=lambda: merge_torch(data.states), note="eager torch")
