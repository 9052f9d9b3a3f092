"""Reporting: the run's environment, a Markdown table per suite, JSON rows, RESULTS.md and plots.

Files of a run (``--out DIR``; the GPU runner brings back at most 8): ``bench.log`` (everything
printed), ``results.json`` (this run's rows), ``RESULTS_fragment.md`` (what is appended to
``benchmarks/RESULTS.md``), and ``decode.png``, ``prefill.png``, ``cascade.png``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except Exception:
        return ""


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except Exception:
        return "absent"


def source_hash() -> str:
    """sha1 (8 hex) of cascade_kernels' sources: names the kernel version where git is not available."""
    h = hashlib.sha1()
    for f in sorted((ROOT / "cascade_kernels").rglob("*")):
        if f.is_file() and f.suffix in (".py", ".json"):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:8]


def env_info(device: torch.device) -> dict:
    """Date (UTC), GPU name, driver, versions and the code's identity (git commit, or a source hash)."""
    import triton

    cuda = device.type == "cuda"
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if commit and _run(["git", "status", "--porcelain", "--", "cascade_kernels", "benchmarks"]):
        commit += "-dirty"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "driver": (_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines() or ["?"])[0]
        if cuda else "-",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "flashinfer": _version("flashinfer-python"),
        "commit": commit or f"src-{source_hash()}",
        "src_hash": source_hash(),
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def markdown(suite: str, rows: list, notes: list[str], ceilings, footnote: str = "") -> str:
    """One suite's table: both medians, spread, rates, fraction of the ceiling, ratio to ours, floor, plan."""
    out = [f"### {suite}", ""]
    if rows:
        out += ["| case | impl | us (run 1 / run 2) | spread | TFLOP/s | TB/s | of ceiling | x ours | floor us "
                "| plan ms | method | note |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            out.append(
                f"| {r.case} | {r.impl} | {r.us_runs[0]:.1f} / {r.us_runs[1]:.1f} | {r.spread:.1%} "
                f"| {_f(r.tflops, '.1f')} | {_f(r.tbps, '.3f')} | {_f(r.frac_of_ceiling, '.1%')} "
                f"| {_f(r.x_ours, '.2f')} | {_f(r.floor_us, '.1f')} | {_f(r.plan_ms, '.2f')} | {r.method} "
                f"| {r.note} |")
        out.append("")
        out.append("us: the lower of two medians; x ours: time over our kernel's time (>1: slower than ours); "
                   "floor: bytes over the bandwidth ceiling or FLOPs over the matmul ceiling, the larger; "
                   "of ceiling: the suite's rate (TFLOP/s for prefill, TB/s otherwise) over its ceiling; "
                   "plan: host-side planning, wall clock, not in us; our kernels timed with validation off."
                   + (f" {footnote}" if footnote else ""))
    else:
        out.append("(no rows)")
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def header(env: dict, ceilings) -> str:
    return (f"## {env['date']} - {env['gpu']}\n\n"
            f"driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, flashinfer "
            f"{env['flashinfer']}, commit {env['commit']} (sources {env['src_hash']}). Ceilings: read "
            f"{ceilings.read / 1e12:.3f} TB/s, copy {ceilings.copy / 1e12:.3f} TB/s (read + write), bf16 "
            f"matmul {ceilings.matmul / 1e12:.0f} TFLOP/s "
            f"({', '.join(f'{k}: {v}' for k, v in ceilings.source.items())}).\n")


def json_rows(rows: list, env: dict) -> list[dict]:
    """Rows as dicts with the fields suite, case, impl, us, tflops, tbps, frac_of_ceiling, date, gpu,
    commit, and the rest of the row (both medians, spread, floor, plan time, method, note)."""
    out = []
    for r in rows:
        d = dataclasses.asdict(r)
        d["us_runs"] = list(r.us_runs)
        d.update(date=env["date"], gpu=env["gpu"], commit=env["commit"])
        out.append(d)
    return out


def write_json_list(path: Path, new: list[dict], append: bool) -> None:
    """Write ``new`` as a JSON list, after the list already in ``path`` when ``append``."""
    old = []
    if append and path.exists():
        try:
            old = json.loads(path.read_text())
        except Exception:
            old = []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + new, indent=1) + "\n")


def plots(rows: list, ceilings, out_dirs: list[Path], log=print) -> None:
    """decode.png (TB/s per case), prefill.png (TFLOP/s per case), cascade.png (speedup over our flat
    decode against prefix length), into every directory of ``out_dirs``; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"  note: no plots ({type(e).__name__}: {e})")
        return

    def bars(suite, value, ylabel, ceiling, fname):
        sel = [r for r in rows if r.suite == suite]
        if not sel:
            return
        cases = list(dict.fromkeys(r.case for r in sel))
        impls = list(dict.fromkeys(r.impl for r in sel))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, c in enumerate(cases):
                r = next((r for r in sel if r.case == c and r.impl == impl), None)
                if r is not None:
                    xs.append(i + j * width - 0.4 + width / 2)
                    ys.append(value(r))
            ax.bar(xs, ys, width, label=impl)
        ax.axhline(ceiling, color="k", linestyle="--", linewidth=1, label="measured ceiling")
        ax.set_xticks(range(len(cases)), cases, rotation=20, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{suite} ({sel[0].method} medians)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        for d in out_dirs:
            d.mkdir(parents=True, exist_ok=True)
            fig.savefig(d / fname, dpi=110)
        plt.close(fig)

    bars("decode", lambda r: r.tbps, "KV TB/s", ceilings.read / 1e12, "decode.png")
    bars("prefill", lambda r: r.tflops, "causal TFLOP/s", ceilings.matmul / 1e12, "prefill.png")

    sel = [r for r in rows if r.suite == "cascade" and r.case.startswith("x_")]
    flat = {r.case: r.us for r in sel if r.impl == "ours-flat"}
    if sel and flat:
        prefix = lambda case: int(re.match(r"x_p(\d+)_", case).group(1))  # noqa: E731
        suffix, batch = re.match(r"x_p\d+_s(\d+)_b(\d+)", sel[0].case).groups()
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for impl in dict.fromkeys(r.impl for r in sel):
            pts = sorted((prefix(r.case), flat[r.case] / r.us) for r in sel if r.impl == impl and r.case in flat)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"shared prefix tokens (batch {batch}, own suffix {suffix})")
        ax.set_ylabel("speedup over our flat decode")
        ax.set_title("cascade crossover")
        ax.legend(fontsize=7)
        fig.tight_layout()
        for d in out_dirs:
            d.mkdir(parents=True, exist_ok=True)
            fig.savefig(d / "cascade.png", dpi=110)
        plt.close(fig)
