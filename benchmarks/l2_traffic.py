"""``python -m benchmarks.l2_traffic``: what a cascade plan moves through L2, and its fused kernel's two parts.

A cascade's byte lower bound counts DRAM reads (the prefix once, each request's KV once), but every program
of its shared level reads that level's KV through L2 once per query tile of a KV head: at batch 256 (1024
query rows a KV head, eight 128-row tiles) a 32K prefix is read from L2 eight times. This prints, for the
cascade suite's headline cases, the plan's time, the bytes its levels read through L2 (each level: its query
tiles a KV head x its longest segment's K and V, all KV heads), that over the time, and the fraction of the
L2 read ceiling measured first: a kernel whose programs read an L2-resident buffer (``.cg`` loads, L1
bypassed) chunk after chunk in a scattered order, as many SMs read one prefix tile. Where the plan fuses its
shared and decode levels (``_fused``), a second table times the fused kernel alone (no merge), and again with
the decode level's keys taken away (its shared part alone) and with the shared level's taken away (its decode
part alone): how much of the two parts' time the one launch overlaps.

Needs a GPU (the shared level's plans differ without one). Timing: ``triton.testing.do_bench`` medians, L2
flushed before each call.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import cascade_kernels as ck
from cascade_kernels import _fused

from .cascade_fusion import _Context, _plan
from .suites import cascade as suite

CASES = [(32768, 256, 64), (32768, 1024, 64), (32768, 256, 256), (32768, 1024, 256)]
CHUNK = 1 << 16  # floats a program reads in one go (256 KB)
PASSES = 16  # chunks a program reads


@triton.jit
def _l2_read_kernel(x_ptr, out_ptr, n_chunks, PASSES: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``p`` sums chunks ``(p + 7919 i) % n_chunks`` for ``i < PASSES`` of ``x`` (``CHUNK`` floats
    each) with loads that skip L1, and writes the sum to ``out[p]``."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(PASSES):
        chunk = ((pid + i * 7919) % n_chunks).to(tl.int64)
        for j in range(0, CHUNK, BLOCK):
            acc += tl.load(x_ptr + chunk * CHUNK + j + tl.arange(0, BLOCK), cache_modifier=".cg")
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def expected_sums(x: torch.Tensor, n_chunks: int, grid: int, passes: int) -> torch.Tensor:
    """What ``_l2_read_kernel`` writes for each of ``grid`` programs (float64)."""
    sums = x.view(n_chunks, -1).double().sum(1)
    pid = torch.arange(grid, device=x.device)
    return sum(sums[(pid + i * 7919) % n_chunks] for i in range(passes))


def l2_read_bandwidth(buffer_mb: int, programs_per_sm: int = 8, block: int = 4096, warps: int = 8) -> float:
    """Bytes/s read by ``_l2_read_kernel`` over a ``buffer_mb`` MB buffer (which L2 holds after the first
    pass), checked against the sums it must produce."""
    n_chunks = buffer_mb * (1 << 20) // (4 * CHUNK)
    x = torch.rand(n_chunks * CHUNK, dtype=torch.float32, device="cuda")
    grid = programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(grid, dtype=torch.float32, device="cuda")

    def fn():
        _l2_read_kernel[(grid,)](x, out, n_chunks, PASSES=PASSES, CHUNK=CHUNK, BLOCK=block, num_warps=warps)

    fn()
    torch.testing.assert_close(out.double(), expected_sums(x, n_chunks, grid, PASSES), rtol=1e-4, atol=1e-2)
    ms = do_bench(fn, return_mode="median")
    return grid * PASSES * CHUNK * 4 / (ms * 1e-3)


def plan_l2_bytes(plan, itemsize: int = 2) -> int:
    """An upper bound on the K/V bytes a plan's levels read through L2: each level's query tiles (per KV
    head) x its longest segment, K and V, every KV head."""
    g = plan.geometry
    return sum(lv.num_tiles * lv.max_kv_len * g.num_kv_heads * g.head_dim * 2 * itemsize for lv in plan.launches)


def _without_keys(launch):
    """``launch`` (a plan's ``LevelLaunch``) with every segment holding no keys: the fused kernel then reads
    nothing of that level and only writes its empty states (no segments at all would hand it empty tensors,
    whose null data pointers it dereferences)."""
    kv = launch.kv
    return replace(launch, kv=ck.PagedKV(kv.indptr, kv.indices, torch.zeros_like(kv.lens), kv.start_pos))


def fused_part_us(plan, data) -> dict:
    """Microseconds of the plan's fused launch alone, of its shared part alone and of its decode part alone
    (empty where the plan has no fused launch or these caches do not take it)."""
    if plan.fused is None:
        return {}
    s, d = plan.fused
    shared, decode = plan.launches[s], plan.launches[d]
    q, q_pos, k, v = data.q, data.q_pos, data.k_cache, data.v_cache
    rows = _fused.page_rows(q, k, v, plan.geometry, shared)
    if not rows:
        return {}
    parts = {"fused kernel": (shared, decode), "shared part alone": (shared, _without_keys(decode)),
             "decode part alone": (_without_keys(shared), decode)}
    times = {}
    for name, (sh, de) in parts.items():
        def fn(sh=sh, de=de):
            _fused.launch(q, q_pos, k, v, sh, de, plan.geometry, plan.options, plan.o_part, plan.lse_part, rows)
        fn()
        times[name] = do_bench(fn, return_mode="median") * 1e3
    return times


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read-tbps", type=_positive_float, default=4.68, help="the DRAM read ceiling, TB/s")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the plans and the L2 read rate are measured there)")
    ck.set_validation(False)
    l2 = max(l2_read_bandwidth(mb) for mb in (8, 16, 32))
    print(f"L2 read ceiling: {l2 / 1e12:.2f} TB/s (best of 8, 16, 32 MB buffers)", flush=True)
    rows = []
    for prefix, suffix, batch in CASES:
        data = suite.build(suite._case(prefix, suffix, batch), _Context)
        plan = _plan(data)
        run = lambda: plan.run(data.q, data.q_pos, data.k_cache, data.v_cache)  # noqa: E731
        run()
        us = do_bench(run, return_mode="median") * 1e3
        moved = plan_l2_bytes(plan)
        bound = (prefix + batch * suffix) * 8 * 128 * 2 * 2
        parts = fused_part_us(plan, data)
        rows.append((f"p{prefix}_s{suffix}_b{batch}", plan.fused is not None, us, moved, bound, parts))
        print(rows[-1], flush=True)
    print("\n| case | fused | us | L2 GB read | L2 TB/s | of L2 ceiling | byte bound us | us / bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, fused, us, moved, bound, _ in rows:
        bound_us = bound / (args.read_tbps * 1e12) * 1e6
        print(f"| {name} | {'yes' if fused else 'no'} | {us:.1f} | {moved / 1e9:.2f} | {moved / us / 1e6:.2f} | "
              f"{moved / us / 1e6 / (l2 / 1e12):.2f} | {bound_us:.1f} | {us / bound_us:.2f} |")
    print("\n| case | plan us | fused kernel us | shared part alone us | decode part alone us | parts' sum / fused |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _, us, _, _, t in rows:
        if t:
            print(f"| {name} | {us:.1f} | {t['fused kernel']:.1f} | {t['shared part alone']:.1f} | "
                  f"{t['decode part alone']:.1f} | {(t['shared part alone'] + t['decode part alone']) / t['fused kernel']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
