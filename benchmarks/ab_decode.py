"""``python -m benchmarks.ab_decode TAG``: one-level decode plans timed for an A/B of two package trees.

Run it once per tree (``PYTHONPATH=<tree>:. python -m benchmarks.ab_decode A``, then ``B``, alternating)
and compare the lines. Each case (32 query / 8 KV heads, head_dim 128, bf16, pages of 16) is one
``plan_cascade([level]).run`` timed eagerly with L2 flushed (``do_bench``) and as CUDA-graph replays
(``do_bench_cudagraph``), medians in microseconds.
"""

from __future__ import annotations

import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph

import cascade_kernels as ck

from .layout import Shape, decode_data

CASES = [(32, 4096), (256, 1024), (128, 4096), (1, 131072), (128, 1152)]


def main(argv=None) -> int:
    tag = (argv or sys.argv[1:] or ["?"])[0]
    ck.set_validation(False)
    for batch, ctx in CASES:
        d = decode_data(batch, ctx, 16, Shape(), "cuda", seed=2)
        s = d.shape
        plan = ck.plan_cascade([ck.CascadeLevel(qo_indptr=d.qo_indptr, kv=d.kv)], num_q_heads=s.num_q_heads,
                               num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, page_size=16, dtype=s.dtype,
                               causal=True)
        fn = lambda: plan.run(d.q, d.q_pos, d.k_cache, d.v_cache)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        events = do_bench(fn, return_mode="median") * 1e3
        graph = do_bench_cudagraph(fn, return_mode="median") * 1e3
        print(f"AB {tag} b{batch}_ctx{ctx} events {events:.1f} graph {graph:.1f}  {ck.__file__}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
