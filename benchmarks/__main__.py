"""``python -m benchmarks [suite ...] [--quick] [--out DIR] [--no-record]``: ceilings, then each suite.

A full run (about 8 minutes on an H200) measures the three ceilings, runs the suites (default: all),
prints one Markdown table per suite, appends them to ``benchmarks/RESULTS.md`` and the rows to
``benchmarks/results/<gpu>.json``, draws plots into ``benchmarks/plots/``, and writes all of it (plus
the log) under ``--out``. ``--quick`` runs every suite on tiny shapes (on a CPU under
``TRITON_INTERPRET=1``, timing by wall clock) to exercise the code paths, and records nothing.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
import traceback
from pathlib import Path

from .suites import SUITE_NAMES


class _Tee:
    """A stream that writes to the console stream and to the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="*",
                   help=f"suites to run (default all): {', '.join(SUITE_NAMES)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes, wall clock; CPU interpreter without CUDA")
    p.add_argument("--out", default=None, help="also write the log, JSON rows, Markdown and plots here")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md and results/")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="after this many seconds, remaining cases are skipped (default 480)")
    p.add_argument("--impls", default=None, help="comma-separated implementation names to keep (default all)")
    p.add_argument("--peers-without-ours", action="store_true",
                   help="run a suite's peers even where cascade_kernels lacks the suite's API")
    args = p.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITE_NAMES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; known: {', '.join(SUITE_NAMES)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    start = time.monotonic()
    import torch

    if args.quick and not torch.cuda.is_available():
        # must be set before any @triton.jit function is defined, so before cascade_kernels is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "bench.log", "a")
        sys.stdout, sys.stderr = _Tee(sys.stdout, log_file), _Tee(sys.stderr, log_file)
    if not args.quick:  # if something hangs (a JIT build, a deadlock), say where, once, and keep waiting
        faulthandler.dump_traceback_later(args.budget_s + 60, exit=False)

    from . import report
    from .ceilings import measure_ceilings
    from .runner import Ctx, run_suite
    from .suites import load

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = report.env_info(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()) + f" | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    ceilings = measure_ceilings(device, args.quick)
    ctx = Ctx(device=device, quick=args.quick, ceilings=ceilings, deadline=start + args.budget_s,
              peers_without_ours=args.peers_without_ours)
    only = set(args.impls.split(",")) if args.impls else None
    record = not (args.no_record or args.quick)
    rows, tables = [], []
    try:
        for name in args.suites or SUITE_NAMES:
            footnote = ""
            try:
                suite = load(name)
                footnote = getattr(suite, "FOOTNOTE", "")
                suite_rows = run_suite(suite, ctx, only)
            except Exception as e:  # a broken suite is reported and skipped, never the end of the run
                ctx.note(name, f"suite failed: {type(e).__name__}: {str(e)[:300]}")
                print(traceback.format_exc(limit=6))
                suite_rows = []
            rows += suite_rows
            tables.append(report.markdown(name, suite_rows, ctx.notes.get(name, []), ceilings, footnote))
            print("\n" + tables[-1])
            if out is not None:  # after every suite, so that a run cut short still leaves its files
                report.write_json_list(out / "results.json", report.json_rows(rows, env), append=False)
                (out / "RESULTS_fragment.md").write_text(report.header(env, ceilings) + "\n" + "\n".join(tables))
                report.plots(rows, ceilings, [out])
    finally:
        fragment = report.header(env, ceilings) + "\n" + "\n".join(tables)
        if record:
            with open(report.HERE / "RESULTS.md", "a") as f:
                f.write("\n" + fragment)
            report.write_json_list(report.HERE / "results" / f"{report.slug(env['gpu'])}.json",
                                   report.json_rows(rows, env), append=True)
            report.plots(rows, ceilings, [report.HERE / "plots"])
        print("\n==== summary ====\n" + fragment)
        print(f"total {time.monotonic() - start:.0f} s, {len(rows)} rows")
        faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
