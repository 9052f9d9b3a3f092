"""``python -m benchmarks.decode_breakdown``: where a decode step's time goes, ours beside FlashInfer's.

For each case (32 query heads, 8 KV heads, head_dim 128, bf16, pages of 16): ``paged_decode`` (automatic
splits), a one-level ``plan_cascade(...).run``, ``paged_decode`` at fixed split counts, and FlashInfer's
tensor-core decode when it is installed. Each is timed eagerly (``triton.testing.do_bench``: L2 flushed
before each call, so host launch cost can show) and as CUDA-graph replays, and its kernels are listed
with their mean device time from ``torch.profiler``. Prints one line per implementation, a table last.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench, do_bench_cudagraph

import cascade_kernels as ck

from .layout import Shape, decode_data

CASES = [(32, 4096), (1, 131072), (128, 4096)]
SPLITS = [1, 2, 3, 4, 6]


def kernel_times(fn, calls: int = 20) -> dict[str, tuple[int, float]]:
    """Kernel name (first 40 characters) -> (launches per call, mean device us per launch)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            total = getattr(e, "device_time_total", None)
            if total is None:
                total = getattr(e, "cuda_time_total", 0)
            out[e.key[:40]] = (e.count // calls, total / e.count)
    return out


def implementations(d) -> tuple[dict, object]:
    s = d.shape
    level = ck.CascadeLevel(qo_indptr=d.qo_indptr, kv=d.kv)
    plan = ck.plan_cascade([level], num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                           page_size=d.seg.page_size, dtype=s.dtype, causal=True)
    impls = {"paged_decode": lambda: ck.paged_decode(d.q, d.q_pos, d.k_cache, d.v_cache, d.kv),
             "plan.run": lambda: plan.run(d.q, d.q_pos, d.k_cache, d.v_cache)}
    for n in SPLITS:
        impls[f"splits={n}"] = lambda n=n: ck.paged_decode(d.q, d.q_pos, d.k_cache, d.v_cache, d.kv, num_splits=n)
    try:
        from .peers import flashinfer_peers

        impls["flashinfer tc"] = flashinfer_peers.decode_tc(d).run
    except Exception as e:  # not installed, or no prebuilt module for this shape
        print(f"FlashInfer unavailable: {type(e).__name__}: {e}")
    return impls, plan


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    ck.set_validation(False)
    rows = []
    for batch, ctx in CASES:
        d = decode_data(batch, ctx, 16, Shape(), "cuda", seed=2)
        impls, plan = implementations(d)
        print(f"== batch {batch}, ctx {ctx}: {plan}", flush=True)
        for name, fn in impls.items():
            fn()
            torch.cuda.synchronize()
            events = do_bench(fn, return_mode="median") * 1e3
            graph = do_bench_cudagraph(fn, return_mode="median") * 1e3
            kernels = "; ".join(f"{k} x{n} {us:.1f}" for k, (n, us) in kernel_times(fn).items())
            rows.append((batch, ctx, name, events, graph, kernels))
            print(f"{name:14s} events {events:7.1f} us  graph {graph:7.1f} us | {kernels}", flush=True)
    print("\n| batch | ctx | implementation | events us | graph us | kernels (launches, mean us) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch, ctx, name, events, graph, kernels in rows:
        print(f"| {batch} | {ctx} | {name} | {events:.1f} | {graph:.1f} | {kernels} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
