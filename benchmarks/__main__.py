"""``python -m benchmarks [suite ...] [--quick] [--out DIR] [--no-record]``: ceilings, then each suite.

A full run (about 8 minutes on an H200) measures the three ceilings, runs the suites (default: all),
prints one Markdown table per suite, appends them to ``benchmarks/RESULTS.md`` and the rows to
``benchmarks/results/<gpu>.json``, draws plots into ``benchmarks/plots/``, and writes all of it (plus
the log) under ``--out``. ``--quick`` runs every suite on tiny shapes (on a CPU under
``TRITON_INTERPRET=1``, timing by wall clock) to exercise the code paths, and records nothing.

Isolation (the default except with --quick): the ceilings and each suite run in a child process of
their own, under a time limit, so that a lost CUDA context (an illegal address in a kernel under
development) or a hang costs that suite only; the child saves its rows after every case.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from .suites import SUITE_NAMES

# Most seconds a suite may take (its cases stop being started after that, and the global budget
# bounds it too); a child still running HARD_MARGIN_S later is killed.
SUITE_CAP_S = {"ceilings": 120, "merge": 90, "decode": 180, "cascade": 180, "prefill": 180, "tuned": 120}
HARD_MARGIN_S = 45
CHILD_STARTUP_S = 30
ROOT = Path(__file__).resolve().parent.parent


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
    p.add_argument("suites", nargs="*", help=f"suites to run (default all): {', '.join(SUITE_NAMES)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes, wall clock; CPU interpreter without CUDA")
    p.add_argument("--out", default=None, help="also write the log, JSON rows, Markdown and plots here")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md and results/")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="after this many seconds, remaining cases are skipped (default 480)")
    p.add_argument("--impls", default=None, help="comma-separated implementation names to keep (default all)")
    p.add_argument("--peers-without-ours", action="store_true",
                   help="run a suite's peers even where cascade_kernels lacks the suite's API")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="ceilings and each suite in a child process (default without --quick)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="everything in this process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON file a child writes its results to
    p.add_argument("--ceilings-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITE_NAMES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; known: {', '.join(SUITE_NAMES)}")
    return args


def _set_interpreter(quick: bool) -> None:
    """``TRITON_INTERPRET=1`` for --quick without CUDA; must precede every @triton.jit definition."""
    import torch

    if quick and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _work(args, names, budget_s: float, ceilings: dict | None, sink=None) -> dict:
    """In this process: the environment, the ceilings (measured unless given), then the suites ``names``.

    Returns ``{"env", "ceilings", "rows", "notes"}`` (rows as dicts); ``sink(result)`` gets the result
    so far after every case and suite.
    """
    start = time.monotonic()
    import torch

    from . import report
    from .ceilings import Ceilings, measure_ceilings
    from .runner import Ctx, run_suite
    from .suites import load

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = report.env_info(device)
    env["interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    c = Ceilings(**ceilings) if ceilings else measure_ceilings(device, args.quick)
    result = {"env": env, "ceilings": dataclasses.asdict(c), "rows": [], "notes": {}}
    ctx = Ctx(device=device, quick=args.quick, ceilings=c, deadline=start + budget_s,
              peers_without_ours=args.peers_without_ours)
    ctx.notes = result["notes"]
    only = set(args.impls.split(",")) if args.impls else None
    done = []

    def save(rows):
        result["rows"] = [dataclasses.asdict(r) for r in done + rows]
        if sink is not None:
            sink(result)

    for name in names:
        try:
            suite_rows = run_suite(load(name), ctx, only, on_case=save)
        except Exception as e:  # a broken suite is reported and skipped, never the end of the run
            ctx.note(name, f"suite failed: {type(e).__name__}: {str(e)[:300]}")
            print(traceback.format_exc(limit=6))
            suite_rows = []
        done += suite_rows
        save([])
    return result


def _spawn(args, names, budget_s: float, ceilings: dict | None) -> tuple[dict | None, str]:
    """Run ``_work`` for ``names`` in a child process, its output copied into ours line by line.

    Returns ``(result or None, note)``; the note says how the child ended when it did not end well.
    """
    fd, path = tempfile.mkstemp(prefix="bench_child_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", "benchmarks", *names, "--child", path, "--budget-s", f"{budget_s:.0f}"]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--ceilings-json", json.dumps(ceilings)] if ceilings else []
    cmd += ["--impls", args.impls] if args.impls else []
    cmd += ["--peers-without-ours"] if args.peers_without_ours else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def copy():
        for line in proc.stdout:
            sys.stdout.write(line)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    note = ""
    limit = budget_s + HARD_MARGIN_S + CHILD_STARTUP_S
    try:
        rc = proc.wait(timeout=limit)
        if rc != 0:
            note = f"child process exited with status {rc}; rows saved before that are kept"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        note = f"child process killed after {limit:.0f} s; rows saved before that are kept"
    reader.join(timeout=10)
    try:
        text = Path(path).read_text()
        result = json.loads(text) if text.strip() else None
    except Exception:
        result = None
    finally:
        Path(path).unlink(missing_ok=True)
    return result, note


def _child(args) -> int:
    """Child mode: run ``_work`` and keep ``args.child`` up to date (atomically) with its results."""
    _set_interpreter(args.quick)
    if not args.quick:  # a hang shows where it is before the parent kills the child
        faulthandler.dump_traceback_later(args.budget_s + HARD_MARGIN_S / 2, exit=False)
    target = Path(args.child)

    def sink(result):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, target)

    ceilings = json.loads(args.ceilings_json) if args.ceilings_json else None
    sink(_work(args, args.suites, args.budget_s, ceilings, sink))
    return 0


def _footnote(name: str) -> str:
    """A suite's FOOTNOTE for its table, if the module loads."""
    from .suites import load

    try:
        return getattr(load(name), "FOOTNOTE", "")
    except Exception as e:
        return f"(suite module failed to load: {type(e).__name__})"


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return _child(args)
    start = time.monotonic()
    deadline = start + args.budget_s
    _set_interpreter(args.quick)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "bench.log", "a")
        sys.stdout, sys.stderr = _Tee(sys.stdout, log_file), _Tee(sys.stderr, log_file)
    isolate = (not args.quick) if args.isolate is None else args.isolate

    from . import report
    from .ceilings import NOMINAL, Ceilings
    from .runner import Row

    def unit(names, cap):
        budget = max(1.0, min(cap, deadline - time.monotonic()))
        if isolate:
            return _spawn(args, names, budget, ceil_dict)
        return _work(args, names, budget, ceil_dict), ""

    ceil_dict = None
    first, note = unit([], SUITE_CAP_S["ceilings"])
    if first is None:
        first = {"env": {"date": "?", "gpu": "unknown", "driver": "?", "torch": "?", "triton": "?",
                         "flashinfer": "?", "commit": "?", "src_hash": "?"},
                 "ceilings": {**NOMINAL, "source": {k: f"nominal H200 value ({note})" for k in NOMINAL}}}
    env, ceil_dict = first["env"], first["ceilings"]
    ceilings = Ceilings(**ceil_dict)
    print(" | ".join(f"{k} {v}" for k, v in env.items()) + f" | isolated {isolate}")

    record = not (args.no_record or args.quick)
    rows, tables = [], []
    try:
        for name in args.suites or SUITE_NAMES:
            notes = []
            if deadline - time.monotonic() < 10:
                notes.append("skipped: time budget spent")
                result = None
            else:
                result, note = unit([name], SUITE_CAP_S[name])
                notes += [note] if note else []
            suite_rows = []
            if result is not None:
                suite_rows = [Row(**{**d, "us_runs": tuple(d["us_runs"])}) for d in result["rows"]]
                notes = result["notes"].get(name, []) + notes
            elif not notes:
                notes.append("no result (the suite's process saved nothing)")
            rows += suite_rows
            tables.append(report.markdown(name, suite_rows, notes, ceilings, _footnote(name)))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
