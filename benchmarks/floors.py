"""``python -m benchmarks.floors``: the floor of every benchmark case, as the Markdown table of NOTES.md.

The floor of a case is the larger of two times: the fewest bytes it must move over the bandwidth
ceiling (read for decode, prefill and cascade; copy, counting read + written bytes, for merge), and
its FLOPs over the bf16 matmul ceiling. No version of a kernel runs much faster than its floor.
"""

from __future__ import annotations

from .ceilings import NOMINAL
from .layout import FULL_SHAPE
from .suites import load

FLOOR_SUITES = ("merge", "decode", "prefill", "cascade")


def floors(ceilings: dict = NOMINAL, shape=FULL_SHAPE) -> list[dict]:
    """One dict a case: suite, case, bytes, flops, the two times in us, the floor and what bounds it."""
    out = []
    for name in FLOOR_SUITES:
        suite = load(name)
        for case in suite.cases(quick=False):
            w = suite.work(case, shape)
            t_bytes = w.bytes / ceilings[w.bandwidth] * 1e6
            t_flops = w.flops / ceilings["matmul"] * 1e6
            out.append({"suite": name, "case": case.name, "bytes": w.bytes, "flops": w.flops,
                        "bandwidth": w.bandwidth, "us_bytes": t_bytes, "us_flops": t_flops,
                        "floor_us": max(t_bytes, t_flops), "bound": "bytes" if t_bytes >= t_flops else "FLOPs"})
    return out


def markdown(ceilings: dict = NOMINAL) -> str:
    lines = [f"Ceilings: read {ceilings['read'] / 1e12:.2f} TB/s, copy {ceilings['copy'] / 1e12:.2f} TB/s "
             f"(read + write), bf16 matmul {ceilings['matmul'] / 1e12:.0f} TFLOP/s.", "",
             "| suite | case | MB moved | GFLOP | us over bandwidth | us over matmul | floor us | bound |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in floors(ceilings):
        lines.append(f"| {f['suite']} | {f['case']} | {f['bytes'] / 1e6:.1f} | {f['flops'] / 1e9:.1f} "
                     f"| {f['us_bytes']:.1f} ({f['bandwidth']}) | {f['us_flops']:.1f} | {f['floor_us']:.1f} "
                     f"| {f['bound']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
