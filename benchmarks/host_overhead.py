"""``python -m benchmarks.host_overhead``: host (CPU) time per call of the launch path's pieces, in us.

A tiny decode problem (one request, 64 KV tokens) keeps the GPU ahead of the host, so the wall time of
many back-to-back calls divided by their number is the host's cost per call.
"""

from __future__ import annotations

import time

import torch

import cascade_kernels as ck
from cascade_kernels import attention, configs, merge

from .layout import Shape, decode_data


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> int:
    ck.set_validation(False)
    shape = Shape()
    d = decode_data(1, 64, 16, shape, "cuda", seed=0)
    args = (d.q, d.q_pos, d.k_cache, d.v_cache, d.kv)
    geometry, options = attention.check_attention_args(*args, causal=True, sm_scale=None, window_left=None,
                                                       softcap=None, sinks=None)
    config = configs.select_config("decode", head_dim=shape.head_dim, group=shape.group, page_size=16,
                                   dtype=d.q.dtype, q_len=1, kv_len=64, device=d.q.device)
    qo_indptr, tile_indptr = attention.decode_indptrs(1, 1, d.q.device)
    o, lse = torch.empty_like(d.q), torch.empty(d.q.shape[:2], device="cuda")
    o_part = torch.empty((1, 4, shape.num_q_heads, shape.head_dim), device="cuda")
    lse_part = torch.empty((1, 4, shape.num_q_heads), device="cuda")
    level = ck.CascadeLevel(qo_indptr=torch.tensor([0, 1], dtype=torch.int32, device="cuda"), kv=d.kv)
    dims = dict(num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                page_size=16, dtype=d.q.dtype, fold=False)
    plan1, plan3 = ck.plan_cascade([level], **dims), ck.plan_cascade([level] * 3, **dims)
    rows = {
        "paged_decode (automatic splits)": lambda: ck.paged_decode(*args),
        "paged_decode (1 split)": lambda: ck.paged_decode(*args, num_splits=1),
        "argument checks (validation off)": lambda: attention.check_attention_args(
            *args, causal=True, sm_scale=None, window_left=None, softcap=None, sinks=None),
        "config lookup": lambda: configs.select_config("decode", head_dim=shape.head_dim, group=shape.group,
                                                       page_size=16, dtype=d.q.dtype, q_len=1, kv_len=64,
                                                       device=d.q.device),
        "attention kernel launch": lambda: attention.launch_attention(
            d.q, d.q_pos, qo_indptr, tile_indptr, 1, d.k_cache, d.v_cache, d.kv, geometry, options, config, 1,
            o, lse),
        "merge kernel launch (4 states)": lambda: merge._launch_merge_states(o_part, lse_part, (o, lse), None),
        "torch.empty": lambda: torch.empty((1, 4, shape.num_q_heads, shape.head_dim), device="cuda"),
        "torch in-place add (reference)": lambda: o.add_(0),
        "CascadePlan.run, 1 level": lambda: plan1.run(d.q, d.q_pos, d.k_cache, d.v_cache),
        "CascadePlan.run, 3 levels + merge": lambda: plan3.run(d.q, d.q_pos, d.k_cache, d.v_cache),
    }
    for name, fn in rows.items():
        print(f"{name:36s} {per_call_us(fn):8.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
