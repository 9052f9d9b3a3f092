"""Compile the attention kernel for Hopper (sm_90) without a GPU, and report what the compiler made of it.

Triton's front end, its passes and ``ptxas`` (shipped with the triton wheel) run on any machine, so a
CPU can catch what the interpreter never sees: a type error in a branch the interpreter skips, shared
memory over the 227 KiB a program may use, a software pipeline that does not overlap any copy.

    python tests/sm90_compile.py [case ...]      # one JSON line per case; no GPU needed

Run it without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` makes no compilable function);
``tests/test_sm90_compile.py`` runs it in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sm90_compile.py: unset TRITON_INTERPRET (the interpreter's functions do not compile)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cascade_kernels._attention_kernel import _paged_attention_kernel  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory one program may opt into on an H100/H200

_BASE = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, HAS_WINDOW=False, HAS_SOFTCAP=False,
             HAS_SINKS=False, PAGE_ALIGNED=False, REVERSE_TILES=False, PREFETCH=False, LOOKAHEAD=False,
             TMA=False, DECODE_TILES=0, INTERPRET=False, LAUNCH_DEPENDENTS=False)

# name -> (dtype, constexprs over _BASE, num_warps, num_stages): the shipped H200 tiles and the paths
# between them (row gathers, block copies, register prefetch, padded head dim with every option).
CASES = {
    "prefill-gather-lookahead": ("bf16", dict(BLOCK_M=128, BLOCK_N=128, LOOKAHEAD=True, REVERSE_TILES=True), 8, 3),
    "prefill-blockcopy-lookahead": ("bf16", dict(BLOCK_M=128, BLOCK_N=128, LOOKAHEAD=True, REVERSE_TILES=True,
                                                 PAGE_ALIGNED=True, TMA=True), 8, 3),
    "prefill-gather-5-stages": ("bf16", dict(BLOCK_M=128, BLOCK_N=64, REVERSE_TILES=True), 8, 5),
    "prefill-d256": ("bf16", dict(BLOCK_M=128, BLOCK_N=64, HEAD_DIM=256, BLOCK_D=256, REVERSE_TILES=True), 8, 2),
    "decode-blockcopy": ("bf16", dict(BLOCK_M=16, BLOCK_N=16, PAGE_ALIGNED=True, TMA=True, DECODE_TILES=1,
                                      LAUNCH_DEPENDENTS=True), 1, 6),
    "decode-prefetch": ("bf16", dict(BLOCK_M=16, BLOCK_N=64, PREFETCH=True, DECODE_TILES=1), 4, 2),
    "options-fp16-d96": ("fp16", dict(BLOCK_M=64, BLOCK_N=32, HEAD_DIM=96, HAS_WINDOW=True, HAS_SOFTCAP=True,
                                      HAS_SINKS=True, LOOKAHEAD=True), 4, 3),
}

_INT_PTRS = ("q_pos_ptr", "qo_indptr_ptr", "tile_indptr_ptr", "kv_indptr_ptr", "kv_indices_ptr", "kv_lens_ptr",
             "kv_start_ptr", "d_qo_indptr_ptr", "d_kv_indptr_ptr", "d_kv_indices_ptr", "d_kv_lens_ptr", "d_kv_start_ptr")


# name -> (dtype, constexprs): the Gluon kernel (``_attention_gluon.py``, two warpgroups and a loader warp) at the
# page sizes it takes; compiled only where this triton has the Gluon parts it uses.
GLUON_CASES = {
    "gluon-prefill-p16": ("bf16", dict(HEAD_DIM=128, PAGE_ROWS=16)),
    "gluon-prefill-p64-d64-fp16": ("fp16", dict(HEAD_DIM=64, PAGE_ROWS=64)),
    "gluon-prefill-tile-copies": ("bf16", dict(HEAD_DIM=128, PAGE_ROWS=128)),
}
_GLUON_BASE = dict(GROUP=4, BLOCK_M=128, BLOCK_N=128, STAGES=2, CAUSAL=True, REVERSE_TILES=True,
                   PRODUCER_REGS=24, CONSUMER_REGS=240)

# name -> (dtype, constexprs): the fused shared-level + decode kernel (``_cascade_gluon.py``) as ``_fused`` launches
# it, pages of 16 gathered a page a copy, or page runs of the shared level (a copy a 64-key tile).
FUSED_CASES = {
    "fused-p16": ("bf16", dict(HEAD_DIM=128, PAGE_ROWS=16)),
    "fused-runs-d64-fp16-group8": ("fp16", dict(HEAD_DIM=64, PAGE_ROWS=64, GROUP=8)),
}

# name -> (dtype, constexprs): the Gluon decode kernel (``_decode_gluon.py``, four one-warp partitions) as
# ``launch_attention`` launches it; two programs must fit an SM.
DECODE_CASES = {
    "gluon-decode-d128": ("bf16", dict(HEAD_DIM=128, GROUP=4, HAS_SINKS=False)),
    "gluon-decode-d64-fp16-group8-sinks": ("fp16", dict(HEAD_DIM=64, GROUP=8, HAS_SINKS=True)),
}


def compile_case(name: str) -> dict:
    """Compile one case for sm_90; return its registers, spill bytes, shared memory and whether the KV
    loop's row gathers are software-pipelined (some ``cp.async.wait_group`` leaves copies in flight)."""
    if name in GLUON_CASES:
        return _compile_gluon(name)
    if name in FUSED_CASES:
        return _compile_fused(name)
    if name in DECODE_CASES:
        return _compile_decode(name)
    dtype, constexprs, num_warps, num_stages = CASES[name]
    const = {**_BASE, **constexprs}
    src = ASTSource(fn=_paged_attention_kernel, **_signature(_paged_attention_kernel, dtype, const))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    return _report(name, kernel)


def _compile_gluon(name: str) -> dict:
    from triton.experimental.gluon._runtime import GluonASTSource

    from cascade_kernels import _gluon

    dtype, constexprs = GLUON_CASES[name]
    fn = _gluon.launcher().fn
    src = GluonASTSource(fn=fn, **_signature(fn, dtype, {**_GLUON_BASE, **constexprs}))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=_gluon.NUM_WARPS))
    return _report(name, kernel)


def _compile_fused(name: str) -> dict:
    from triton.experimental.gluon._runtime import GluonASTSource

    from cascade_kernels import _fused, _gluon

    dtype, constexprs = FUSED_CASES[name]
    base = dict(GROUP=4, BLOCK_M=_gluon.BLOCK_M, BLOCK_N=_fused.BLOCK_N, STAGES=_fused.STAGES, CAUSAL=True,
                REVERSE_TILES=True, PRODUCER_REGS=_fused.PRODUCER_REGS, CONSUMER_REGS=_fused.CONSUMER_REGS,
                DECODE_STAGES=_fused.DECODE_STAGES, DECODE_REGS=_fused.DECODE_REGS)
    fn = _fused.launcher().fn
    sig = _signature(fn, dtype, {**base, **constexprs})
    sig["signature"]["o_ptr"] = "*fp32"  # the split scratch
    src = GluonASTSource(fn=fn, **sig)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=_gluon.NUM_WARPS))
    return _report(name, kernel)


def _compile_decode(name: str) -> dict:
    from triton.experimental.gluon._runtime import GluonASTSource

    from cascade_kernels import _gluon

    dtype, constexprs = DECODE_CASES[name]
    const = dict(CAUSAL=True, DECODE_TILES=1, PAGE_SIZE=16, PART_REGS=_gluon.DECODE_REGS, **constexprs)
    const["STAGES"] = _gluon.DECODE_STAGES[const["HEAD_DIM"]]
    fn = _gluon.decode_launcher().fn
    src = GluonASTSource(fn=fn, **_signature(fn, dtype, const))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, maxnreg=_gluon.DECODE_MAXNREG))
    return _report(name, kernel)


def _signature(fn, dtype: str, const: dict) -> dict:
    """``signature``, ``constexprs`` and ``attrs`` of a kernel over the attention arguments, as Triton would
    specialize them for 16-byte aligned pointers and strides."""
    names = list(fn.arg_names)
    signature, fixed, attrs = {}, {}, {}
    for i, arg in enumerate(names):
        if arg in const:
            signature[arg] = "constexpr"
            fixed[(i,)] = const[arg]
        elif arg in _INT_PTRS:
            signature[arg] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in ("sinks_ptr", "lse_ptr"):
            signature[arg] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg.endswith("_ptr"):
            signature[arg] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in ("qk_scale", "softcap"):
            signature[arg] = "fp32"
        elif arg in ("s_qd", "s_kd", "s_vd", "s_od", "s_lh"):
            signature[arg] = "constexpr"  # unit strides, as Triton specializes them
            fixed[(i,)] = 1
        else:
            signature[arg] = "i32"
            if arg.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return dict(signature=signature, constexprs=fixed, attrs=attrs)


def _report(name: str, kernel) -> dict:
    ptx = kernel.asm["ptx"]
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    return dict(case=name, **_resources(kernel.asm["cubin"]), shared=kernel.metadata.shared, smem_limit=SMEM_LIMIT,
                row_copies=len(re.findall(r"cp\.async\.c[ag]", ptx)), pipelined=any(w > 0 for w in waits),
                block_copies=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                warp_specialized=bool(re.search(r"setmaxnreg", ptx)),
                launches_dependents="griddepcontrol.launch_dependents" in ptx, triton=triton.__version__)


def _resources(cubin: bytes) -> dict:
    """Registers a thread and stack bytes (spills) from ``cuobjdump -res-usage``, when the wheel ships it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return dict(registers=None, stack_bytes=None)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(registers=int(m.group(1)) if m else None, stack_bytes=int(m.group(2)) if m else None)


def _gluon_available() -> bool:
    from cascade_kernels import _gluon

    return _gluon.launcher() is not None


if __name__ == "__main__":
    for case in sys.argv[1:] or list(CASES) + (list(GLUON_CASES) + list(FUSED_CASES) + list(DECODE_CASES) if _gluon_available() else []):
        print(json.dumps(compile_case(case)), flush=True)
