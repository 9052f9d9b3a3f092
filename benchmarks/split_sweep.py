"""``python -m benchmarks.split_sweep``: paged decode time per fixed ``num_splits`` beside the automatic choice.

The decode suite's shapes (32 query heads, 8 KV heads, head_dim 128, bf16, pages of 16), each call
replayed from a CUDA graph (so host launch cost is excluded) and timed by ``triton.testing.do_bench``
medians; prints microseconds and the fraction of the read ceiling given by ``--read-tbps``.
"""

from __future__ import annotations

import argparse

import torch
import triton

import cascade_kernels as ck

from .layout import Shape, decode_data

CASES = [(1, 131072), (32, 4096), (256, 1024), (32, 32768), (128, 4096)]
SPLITS = [None, 1, 2, 4, 8, 16, 32, 64, 128, 256]


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--read-tbps", type=float, default=4.64, help="read ceiling (TB/s), from a benchmark run")
    args = p.parse_args(argv)
    ck.set_validation(False)
    shape = Shape()
    print(f"{'batch':>5} {'ctx':>7} {'splits':>6} {'us':>8} {'of read':>8}")
    for batch, ctx in CASES:
        d = decode_data(batch, ctx, 16, shape, "cuda", seed=2)
        nbytes = batch * ctx * shape.kv_token_bytes
        for splits in SPLITS:
            if splits is not None and splits * 32 > ctx:
                continue
            kw = {} if splits is None else {"num_splits": splits}
            ms = graph_ms(lambda: ck.paged_decode(d.q, d.q_pos, d.k_cache, d.v_cache, d.kv, **kw))
            frac = nbytes / (ms * 1e-3) / (args.read_tbps * 1e12)
            print(f"{batch:5d} {ctx:7d} {'auto' if splits is None else splits:>6} {ms * 1e3:8.1f} {frac:8.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
