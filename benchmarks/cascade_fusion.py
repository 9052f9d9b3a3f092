"""``python -m benchmarks.cascade_fusion``: a cascade's fused launch against its levels one after the other.

For each case (the cascade suite's layout: a shared prefix of ``P`` tokens in shuffled pages of 16 read by ``B``
requests, each with ``S`` tokens of its own and one decode token; 32 query / 8 KV heads, head_dim 128, bf16) the
plan is made twice, once as ``plan_cascade`` makes it and once with the fused launch turned off
(``_fused.pick`` returning None), and both are timed alternately, twice each, in one process (``do_bench``: L2
flushed before each call); the lower median is kept. Prints one line per case and a table last, with the plan's
own estimate of the decode level's time over the shared level's (the quantity its fusion rule compares with
``_fused.MIN_DECODE_SHARE``); ``--force`` sets that threshold to 0, so that every case whose shared level fills
the GPU fuses (how the rule was measured); ``--cases P:S:B,...`` times other sizes. ``--variant NAME=N,...``
(repeatable) times the fused plan once per set of the fused kernel's constants instead (``TUNABLES``, e.g.
``--variant STAGES=2,DECODE_STAGES=4 --variant STAGES=3,DECODE_STAGES=3``), alternately with each other and with
level by level, one column each. Needs a Hopper GPU for the fused launch to exist at all.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from triton.testing import do_bench

import cascade_kernels as ck
from cascade_kernels import _fused

from .layout import FULL_SHAPE
from .suites import cascade as suite

CASES = [(32768, 256, 64), (32768, 1024, 64), (32768, 256, 256), (32768, 1024, 256), (32768, 128, 256),
         (16384, 256, 256), (2048, 1024, 128), (4096, 1024, 128), (8192, 1024, 128), (32768, 1024, 128),
         (8192, 256, 64), (32768, 64, 128)]


# the fused kernel's constants a --variant may set (``_fused`` reads them at plan and launch time)
TUNABLES = ("STAGES", "DECODE_STAGES", "CONSUMER_REGS", "DECODE_REGS")


class _Context:
    shape = FULL_SHAPE
    device = "cuda"


def decode_share(prefix: int, suffix: int, batch: int, group: int = 4, block_m: int = 128) -> float:
    """The plan's estimate for these sizes (``_fused.pick``): the decode level's bytes at its rate over the shared
    level's FLOPs at its rate, per KV head."""
    tiles = -(-batch * group // block_m)
    shared = tiles * block_m * prefix * 4 / _fused.SHARED_FLOPS_PER_S
    decode = batch * suffix * 2 * 2 / _fused.DECODE_BYTES_PER_S
    return decode / shared


@contextlib.contextmanager
def _constants(variant: dict):
    """``_fused``'s constants set to ``variant`` inside the block, restored after it."""
    saved = {name: getattr(_fused, name) for name in variant}
    for name, value in variant.items():
        setattr(_fused, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_fused, name, value)


def compare(prefix: int, suffix: int, batch: int, reps: int = 2,
            variants: tuple = ({},)) -> tuple[bool, list[float], float]:
    """(fused?, fused us for each set of constants in ``variants``, level-by-level us) for one case."""
    data = suite.build(suite._case(prefix, suffix, batch), _Context)
    real = _fused.pick
    plans = []  # (constants, plan); the last one level by level
    try:
        for variant in variants:
            with _constants(variant):
                plans.append((variant, _plan(data)))
        _fused.pick = lambda *a, **k: None
        plans.append(({}, _plan(data)))
    finally:
        _fused.pick = real
    args = (data.q, data.q_pos, data.k_cache, data.v_cache)
    times = [[] for _ in plans]
    for _ in range(reps):
        for (variant, plan), t in zip(plans, times):
            def run(plan=plan):
                return plan.run(*args)
            with _constants(variant):  # the launch reads them too
                run()
                torch.cuda.synchronize()
                t.append(do_bench(run, return_mode="median") * 1e3)
    best = [min(t) for t in times]
    return plans[0][1].fused is not None, best[:-1], best[-1]


def _plan(data):
    return ck.plan_cascade(data.levels, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                           dtype=torch.bfloat16, causal=True)


def _cases(text: str) -> list[tuple[int, int, int]]:
    """``"32768:1024:64,4096:256:128"`` -> ``[(32768, 1024, 64), (4096, 256, 128)]``."""
    try:
        cases = [tuple(int(n) for n in case.split(":")) for case in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cases must be PREFIX:SUFFIX:BATCH[,...], got {text!r}") from None
    if not cases or any(len(case) != 3 or min(case) < 1 for case in cases):
        raise argparse.ArgumentTypeError(f"cases must be PREFIX:SUFFIX:BATCH[,...] of positive sizes, got {text!r}")
    return cases


def _variant(text: str) -> dict:
    """``"STAGES=3,DECODE_STAGES=3"`` -> ``{"STAGES": 3, "DECODE_STAGES": 3}``, names from ``TUNABLES``."""
    variant = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in TUNABLES or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"a variant is NAME=N[,...] with NAME one of {', '.join(TUNABLES)} "
                                             f"and N a positive integer, got {text!r}")
        variant[name] = int(value)
    return variant


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fuse whatever the decode level's share")
    parser.add_argument("--cases", type=_cases, default=CASES,
                        help="PREFIX:SUFFIX:BATCH[,...] instead of the default cases")
    parser.add_argument("--variant", type=_variant, action="append", default=None,
                        help=f"NAME=N[,...] ({', '.join(TUNABLES)}): time the fused plan with these constants; "
                             "repeat for more")
    args = parser.parse_args(argv)
    if args.force:
        _fused.MIN_DECODE_SHARE = 0.0
    variants = tuple(args.variant or ({},))
    labels = [",".join(f"{k}={v}" for k, v in variant.items()) or "fused" for variant in variants]
    ck.set_validation(False)
    rows = []
    for prefix, suffix, batch in args.cases:
        fused, t_fused, t_sep = compare(prefix, suffix, batch, variants=variants)
        share = decode_share(prefix, suffix, batch)
        rows.append((prefix, suffix, batch, share, fused, t_fused, t_sep))
        timed = ", ".join(f"{label} {t:.1f} us" for label, t in zip(labels, t_fused))
        print(f"p{prefix} s{suffix} b{batch}: decode/shared {share:.2f}, fused={fused}: {timed}, "
              f"level by level {t_sep:.1f} us ({t_sep / t_fused[0]:.3f}x)", flush=True)
    columns = " | ".join(f"{label} us" for label in labels)
    print(f"\n| case | decode / shared | fused? | {columns} | level by level us | level by level / {labels[0]} |")
    print("| --- " * (5 + len(labels)) + "|")
    for prefix, suffix, batch, share, fused, t_fused, t_sep in rows:
        timed = " | ".join(f"{t:.1f}" for t in t_fused)
        print(f"| p{prefix}_s{suffix}_b{batch} | {share:.2f} | {'yes' if fused else 'no'} | {timed} | "
              f"{t_sep:.1f} | {t_sep / t_fused[0]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
