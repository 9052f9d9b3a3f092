"""The benchmark suite's --quick path: every suite on tiny shapes, so its code runs before a GPU sees it.

Two runs, each in a subprocess (``TRITON_INTERPRET`` must be set before any kernel is defined):
1. the real kernels under the interpreter, each suite in a child process as on the GPU (--isolate):
   the run completes and every suite whose public API exists has rows for our kernel (so they also
   passed the float64 check the suite runs first);
2. float64-reference stand-ins for the whole public API (cast back to the input dtype), so that every
   suite's code path, plan-style and tuned variants included, runs whatever the kernels' state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_kernels._triton import interpreter_problem

ROOT = Path(__file__).resolve().parents[1]
if interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

# Suite -> the public API it needs (benchmarks/suites/*.py REQUIRES).
SUITE_API = {
    "merge": ("merge_state", "merge_states"),
    "decode": ("paged_decode",),
    "prefill": ("paged_prefill",),
    "cascade": ("plan_cascade",),
    "tuned": ("use_tuned_configs",),
}

STAND_INS = r"""
import contextlib, sys, torch
import cascade_kernels as ck
import reference as ref

def cast(q, out):
    o, lse = out
    return o.to(q.dtype), lse.to(torch.float32)

def paged_decode(q, q_pos, k, v, kv, **kw):
    return cast(q, ref.paged_decode(q, q_pos, k, v, kv, **kw))

def paged_prefill(q, q_pos, qo_indptr, k, v, kv, **kw):
    return cast(q, ref.paged_prefill(q, q_pos, qo_indptr, k, v, kv, **kw))

class Plan:
    def __init__(self, fn):
        self.fn = fn
    def run(self, q, q_pos, k, v):
        return self.fn(q, q_pos, k, v)

def plan_cascade(levels, *, causal=True, **dims):
    return Plan(lambda q, q_pos, k, v: cast(q, ref.cascade_attention(q, q_pos, k, v, levels, causal=causal)))

def plan_decode(kv, *, causal=True, **dims):
    return Plan(lambda q, q_pos, k, v: paged_decode(q, q_pos, k, v, kv, causal=causal))

def plan_prefill(qo_indptr, kv, *, causal=True, **dims):
    return Plan(lambda q, q_pos, k, v: paged_prefill(q, q_pos, qo_indptr, k, v, kv, causal=causal))

def merge_state(o_a, lse_a, o_b, lse_b):
    o, lse = ref.merge_state(o_a, lse_a, o_b, lse_b)
    return o.to(o_a.dtype), lse.float()

def merge_states(o, lse):
    m, l = ref.merge_states(o, lse)
    return m.to(o.dtype), l.float()

@contextlib.contextmanager
def use_tuned_configs(enabled):
    yield

for name, fn in list(globals().items()):
    if name in ("paged_decode", "paged_prefill", "plan_cascade", "plan_decode", "plan_prefill",
                "merge_state", "merge_states", "use_tuned_configs"):
        setattr(ck, name, fn)

from benchmarks.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _run(args: list[str], out: Path, code: str | None = None) -> list[dict]:
    # The CPU path CI takes, also on a GPU machine: the interpreter on host tensors.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "benchmarks"]
    proc = subprocess.run(cmd + args + ["--quick", "--no-record", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def _summary(out: Path) -> str:
    path = out / "RESULTS_fragment.md"
    return path.read_text()[-6000:] if path.exists() else "(no fragment)"


def test_quick_run_has_rows_for_our_kernels(tmp_path):
    import cascade_kernels as ck

    rows = _run(["--isolate"], tmp_path)
    present = [s for s, api in SUITE_API.items() if all(hasattr(ck, n) for n in api)]
    assert "merge" in present  # the merge kernels are the first thing the package shipped
    for suite in present:
        ours = [r for r in rows if r["suite"] == suite and r["impl"] == "ours"]
        assert ours, f"no rows for our kernel in suite {suite}:\n{_summary(tmp_path)}"
    for r in rows:
        assert r["us"] > 0 and len(r["us_runs"]) == 2
        assert {"suite", "case", "impl", "us", "tflops", "tbps", "frac_of_ceiling", "date", "gpu", "commit"} <= r.keys()
    assert (tmp_path / "bench.log").stat().st_size > 0


def test_quick_run_every_suite_with_reference_stand_ins(tmp_path):
    rows = _run([], tmp_path, code=STAND_INS)
    impls = {(r["suite"], r["impl"]) for r in rows}
    expected = {("merge", "ours"), ("merge", "torch-merge"), ("decode", "ours"), ("decode", "ours-plan"),
                ("decode", "naive-paged"), ("prefill", "ours"), ("prefill", "ours-plan"),
                ("prefill", "naive-paged"), ("cascade", "ours"), ("cascade", "ours-flat"),
                ("cascade", "torch-cascade"), ("tuned", "ours"), ("tuned", "ours-tuned")}
    missing = expected - impls
    assert not missing, f"missing rows {sorted(missing)}:\n{_summary(tmp_path)}"
    cases = {(r["suite"], r["case"]) for r in rows if r["impl"] == "ours"}
    assert ("cascade", "x_p16_s20_b3") in cases and ("prefill", "chunked_2x16_p5") in cases
    for r in rows:
        if r["impl"] != "ours":
            assert r["x_ours"] is not None, r


L2_READ = r"""
import torch
from benchmarks.l2_traffic import _l2_read_kernel, expected_sums
n_chunks, chunk, grid, passes = 5, 64, 7, 3
x = torch.rand(n_chunks * chunk)
out = torch.full((grid,), float("nan"))
_l2_read_kernel[(grid,)](x, out, n_chunks, PASSES=passes, CHUNK=chunk, BLOCK=32)
torch.testing.assert_close(out.double(), expected_sums(x, n_chunks, grid, passes), rtol=1e-5, atol=1e-5)
from benchmarks.l2_traffic import main
for argv in (["--read-tbps", "0"], ["--read-tbps", "nan"], ["--read-tbps", "fast"], []):  # [] : no GPU here
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 2, (argv, e.code)
    else:
        raise AssertionError(f"{argv} was accepted")
print("ok")
"""


def test_l2_read_kernel_reads_what_it_says():
    """The L2 read-rate kernel of ``benchmarks.l2_traffic`` sums the chunks its docstring names (so the bytes it
    is credited with were read), and its command line refuses a ceiling that is not a positive number and a machine
    without a GPU with a usage error."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", L2_READ], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
