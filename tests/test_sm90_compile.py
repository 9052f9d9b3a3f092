"""The attention kernel compiles for Hopper (sm_90) on any machine, CPU-only CI included.

The interpreter runs kernels without compiling them, so it misses what only the compiler checks. Here
``tests/sm90_compile.py`` compiles the shipped tiles and the paths between them (row gathers, block
copies, register prefetch, page ids one tile ahead, a padded head dim with every option) in a
subprocess without ``TRITON_INTERPRET``, and the test holds:

* every case compiles, within the 227 KiB of shared memory a program may use;
* the row gathers are software-pipelined (some copy still in flight at a wait) where page ids are read
  one tile ahead (3 stages) or with 5 stages: the property the prefill's speed rests on;
* block-copy cases issue tensor copies;
* a launch that lets the merge after it start early (``LAUNCH_DEPENDENTS``) says so first thing, and no other does;
* the Gluon kernel (where this triton has Gluon) compiles warp-specialized (a loader warp with fewer
  registers: ``setmaxnreg``), issuing one tensor copy a page, spilling at most a few scalars;
* so does the fused shared-level + decode kernel (``_cascade_gluon.py``), within shared memory with its decode
  warps' stages beside the shared level's;
* and the Gluon decode kernel (``_decode_gluon.py``): warp-specialized, spilling at most a few scalars, and two programs an SM
  (registers at launch and shared memory for two).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PIPELINED = ("prefill-gather-lookahead", "prefill-gather-5-stages", "options-fp16-d96")
BLOCK_COPIES = ("prefill-blockcopy-lookahead", "decode-blockcopy")


@pytest.fixture(scope="module")
def compiled():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton cannot compile for NVIDIA GPUs: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run = subprocess.run([sys.executable, str(HERE / "sm90_compile.py")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, run.stdout.splitlines())}


def test_every_case_compiles_within_shared_memory(compiled):
    assert set(PIPELINED + BLOCK_COPIES + ("decode-prefetch",)) <= set(compiled), sorted(compiled)
    for r in compiled.values():
        assert 0 < r["shared"] <= r["smem_limit"], r


def test_row_gathers_are_pipelined(compiled):
    for case in PIPELINED:
        r = compiled[case]
        assert r["row_copies"] > 0 and r["pipelined"], r


def test_only_launches_asked_to_let_dependents_start(compiled):
    for case, r in compiled.items():
        assert r["launches_dependents"] == (case == "decode-blockcopy"), r


def test_block_copy_cases_issue_tensor_copies(compiled):
    for case in BLOCK_COPIES:
        assert compiled[case]["block_copies"] > 0, compiled[case]


def test_gluon_kernel_is_warp_specialized(compiled):
    from cascade_kernels import _gluon

    if _gluon.launcher() is None:
        pytest.skip("this triton has no Gluon with the parts the kernel uses")
    for case in ("gluon-prefill-p16", "gluon-prefill-p64-d64-fp16", "gluon-prefill-tile-copies"):
        r = compiled[case]
        assert r["warp_specialized"] and r["block_copies"] > 0 and r["row_copies"] == 0, r
        # a worker partition's scalar arguments spill (a few dozen words, reloaded once, in its epilogue)
        assert r["stack_bytes"] is None or r["stack_bytes"] <= 256, r


def test_fused_kernel_is_warp_specialized_within_shared_memory(compiled):
    from cascade_kernels import _fused

    if _fused.launcher() is None:
        pytest.skip("this triton has no Gluon with the parts the kernel uses")
    for case in ("fused-p16", "fused-runs-d64-fp16-group8"):
        r = compiled[case]
        assert r["warp_specialized"] and r["block_copies"] > 0 and r["row_copies"] == 0, r
        assert r["shared"] <= r["smem_limit"], r


def test_gluon_decode_kernel_fits_two_programs_an_sm(compiled):
    from cascade_kernels import _gluon

    if _gluon.decode_launcher() is None:
        pytest.skip("this triton has no Gluon with the parts the kernel uses")
    per_sm_smem, reserved, registers = 233472, 1024, 65536  # an H100/H200 SM; the driver's share a program
    for case in ("gluon-decode-d128", "gluon-decode-d64-fp16-group8-sinks"):
        r = compiled[case]
        assert r["warp_specialized"] and r["block_copies"] > 0 and r["row_copies"] == 0, r
        assert r["stack_bytes"] is None or r["stack_bytes"] <= 64, r  # triton 3.9: a few scalars
        programs = _gluon.DECODE_PROGRAMS_PER_SM
        assert programs * (r["shared"] + reserved) <= per_sm_smem, r
        assert r["registers"] is None or programs * 8 * 32 * r["registers"] <= registers, r
