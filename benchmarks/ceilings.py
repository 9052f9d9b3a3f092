"""The measured ceilings every result is compared with: read bandwidth, copy bandwidth, bf16 matmul rate.

* read: a Triton kernel that only streams a few GB in (each program sums its chunk and writes one
  float), bytes read over time; the ceiling of decode and cascade, which read far more than they write.
* copy: ``dst.copy_(src)`` device to device, bytes read plus bytes written; the ceiling of merge.
* matmul: a bf16 ``8192 x 8192 x 8192`` product on random data (zeros run faster, METHOD.md), 2 n^3 FLOPs.

With ``quick`` the same code runs on tiny sizes (wall clock, possibly on a CPU under the interpreter):
it only exercises the code paths, the numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .timing import measure

# Nominal H200 figures measured in this workplace (KINDS.md, peers/flashinfer/README.md): the floors
# table of NOTES.md uses them, and a run falls back to them when a measurement fails.
NOMINAL = {"read": 4.68e12, "copy": 4.3e12, "matmul": 7.9e14}


@dataclass
class Ceilings:
    """Bytes/s read-only and copy (read + write), FLOP/s bf16 matmul; ``source`` says how each was had."""

    read: float
    copy: float
    matmul: float
    source: dict

    def bandwidth(self, kind: str) -> float:
        return self.read if kind == "read" else self.copy


@triton.jit
def _read_kernel(
    x_ptr,    # [n] fp32
    out_ptr,  # [num_programs] fp32: one partial sum a program, so the loads cannot be dropped
    n,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``p`` sums ``x[p * CHUNK : (p + 1) * CHUNK]`` in ``BLOCK``-wide steps."""
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = pid * CHUNK + i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


# (BLOCK, CHUNK, num_warps): the best of three is the ceiling.
_READ_CONFIGS = [(4096, 65536, 8), (2048, 32768, 4), (8192, 131072, 8)]


def read_bandwidth(n_bytes: int, device, quick: bool) -> float:
    """Bytes/s of the best streaming-read config over an fp32 tensor of ``n_bytes`` random bytes."""
    n = n_bytes // 4
    x = torch.rand(n, dtype=torch.float32, device=device)
    best = 0.0
    for block, chunk, warps in (_READ_CONFIGS[:1] if quick else _READ_CONFIGS):
        if quick:
            block, chunk = 256, 1024
        grid = (triton.cdiv(n, chunk),)
        out = torch.empty(grid[0], dtype=torch.float32, device=device)

        def fn(block=block, chunk=chunk, warps=warps, out=out, grid=grid):
            _read_kernel[grid](x, out, n, CHUNK=chunk, BLOCK=block, num_warps=warps)

        fn()
        if not quick:  # the sums must be right, or the kernel read something else
            torch.testing.assert_close(out.sum().double(), x.sum().double(), rtol=1e-3, atol=1.0)
        best = max(best, n * 4 / (measure(fn, quick=quick).best_ms * 1e-3))
    return best


def copy_bandwidth(n_bytes: int, device, quick: bool) -> float:
    """Bytes/s of a device-to-device copy of ``n_bytes``, counting bytes read plus bytes written."""
    src = torch.rand(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), quick=quick)
    return 2 * src.numel() * 4 / (t.best_ms * 1e-3)


def matmul_rate(n: int, device, quick: bool) -> float:
    """FLOP/s of a bf16 ``n x n x n`` product of random matrices (``2 n^3`` FLOPs)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    t = measure(lambda: a @ b, quick=quick)
    return 2 * n**3 / (t.best_ms * 1e-3)


def measure_ceilings(device, quick: bool, log=print) -> Ceilings:
    """All three ceilings; a failing one is replaced by its nominal H200 value, with a note."""
    sizes = ({"read": 1 << 16, "copy": 1 << 16, "matmul": 64} if quick
             else {"read": 4 << 30, "copy": 2 << 30, "matmul": 8192})
    fns = {"read": read_bandwidth, "copy": copy_bandwidth, "matmul": matmul_rate}
    values, source = {}, {}
    for name, fn in fns.items():
        try:
            values[name] = fn(sizes[name], device, quick)
            source[name] = "measured (quick: tiny, meaningless)" if quick else "measured"
        except Exception as e:  # report, fall back, keep going
            values[name] = NOMINAL[name]
            source[name] = f"nominal H200 value ({type(e).__name__}: {str(e)[:120]})"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    c = Ceilings(values["read"], values["copy"], values["matmul"], source)
    log(f"ceilings: read {c.read / 1e12:.3f} TB/s [{source['read']}], copy (read+write) "
        f"{c.copy / 1e12:.3f} TB/s [{source['copy']}], bf16 matmul {c.matmul / 1e12:.1f} TFLOP/s "
        f"[{source['matmul']}]")
    return c
