"""When an attention launch takes the Gluon kernel (``_attention_gluon.py``), and its launcher.

The Gluon kernel reads each KV tile with block copies issued by loader warps beside two MMA warpgroups;
measured on an H200 it runs causal prefill 1.4-1.5x faster than the ``tl`` kernel's row gathers at pages
of 16, and 1.1x faster than the ``tl`` kernel's own block copies at pages of 256 (RESULTS.md). It covers
the common serving case only; every other launch (and every launch under the interpreter, which has no
Gluon) takes the ``tl`` kernel:

- a Hopper GPU (compute capability 9: warpgroup MMAs), a Triton whose Gluon has the parts it uses;
- prefill tiles (``config.block_m == 128``), fp16/bf16, head_dim 64 or 128;
- a cache whose pages are row-contiguous (NHD) with 16-byte aligned rows, and either pages of 8 to 64
  tokens (one copy a page, eight rows at least), pages of a multiple of 128 tokens, or tiles the caller
  found in consecutive pages (``page_runs``; one copy a 128-key tile in both);
- no sliding window, soft cap, or sinks applied in the launch (a split or cascade launch leaves sinks
  to the merge, so those still qualify).

Decode launches (one query token a segment) on Hopper take the Gluon decode kernel (``_decode_gluon.py``:
four one-warp partitions a program, each with its own pipeline of block copies) where ``decode_takes``
says so: fp16/bf16, head_dim 64 or 128, GQA groups of up to 8, pages of a multiple of 16 tokens, no
window or soft cap, caches as above (``decode_caches_ok``). Its programs are four times the ``tl`` decode
kernel's, so it takes its own split count (``decode_splits``).

``CASCADE_KERNELS_GLUON=0`` in the environment turns both paths off (every launch takes the ``tl`` kernel).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from ._launch import Launcher
from ._tma import cache_ok
from ._triton import cdiv, interpreting

BLOCK_M = 128  # query rows a program: two warpgroups of 4 warps x 16 rows
BLOCK_N = 128  # keys a KV tile
NUM_WARPS = 4  # the program's own warps: the first MMA warpgroup (the second and the loader are workers)
STAGES = 2  # KV tiles in shared memory (2 x 64 KB at head_dim 128); 3 measured no faster
CONSUMER_REGS = 240  # registers a thread of the second MMA warpgroup
PRODUCER_REGS = 24  # registers a thread of the loader warp
HEAD_DIMS = (64, 128)
MIN_PAGE = 8  # rows of one block copy: eight 16-byte rows at least

# The decode kernel: two programs an SM (8 warps each: 4 partitions beside the program's own warpgroup), each
# partition with this many 16-key K/V tiles in flight (96 KB of shared memory a program) and these registers.
DECODE_STAGES = {64: 6, 128: 3}
DECODE_REGS = 128
DECODE_MAXNREG = 128  # registers a thread at launch: 2 x 256 threads x 128 fill the register file
DECODE_PROGRAMS_PER_SM = 2
DECODE_MIN_SPLIT = 256  # keys a split at least: four tiles a partition


def optional_launcher(module: str, name: str) -> Launcher | None:
    """A launcher over the Gluon kernel ``name`` of this package's ``module``, or None where this Triton cannot
    build it (no Gluon, or one whose API the module does not know)."""
    try:
        kernel = getattr(importlib.import_module(f".{module}", __package__), name)
    except Exception:
        return None
    return Launcher(kernel)


@functools.lru_cache(maxsize=None)
def launcher() -> Launcher | None:
    """The launcher over the Gluon prefill kernel, or None where this Triton cannot build it."""
    return optional_launcher("_attention_gluon", "_paged_attention_gluon")


@functools.lru_cache(maxsize=None)
def decode_launcher() -> Launcher | None:
    """The launcher over the Gluon decode kernel, or None where this Triton cannot build it."""
    return optional_launcher("_decode_gluon", "_paged_decode_gluon")


@functools.lru_cache(maxsize=None)
def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def enabled() -> bool:
    return os.environ.get("CASCADE_KERNELS_GLUON", "1") != "0"


def page_rows(q, k_cache, v_cache, head_dim, block_m, window_left, softcap, has_sinks, page_runs) -> int:
    """Rows of one block copy when this launch takes the Gluon kernel, else 0: the page size for pages
    of 8 to 64 tokens, a whole tile (128) for pages of a multiple of 128 tokens and where ``page_runs``
    says every 128-key tile of the launch lies in consecutive pages."""
    num_pages, page_size = k_cache.shape[:2]
    if interpreting() or block_m != BLOCK_M or head_dim not in HEAD_DIMS:
        return 0
    if q.dtype not in (torch.float16, torch.bfloat16) or window_left is not None or softcap is not None or has_sinks:
        return 0
    if page_runs or page_size % BLOCK_N == 0:
        rows = BLOCK_N
    elif MIN_PAGE <= page_size < BLOCK_N and BLOCK_N % page_size == 0:
        rows = page_size
    else:
        return 0
    if num_pages * page_size >= 2**31 or not (cache_ok(k_cache) and cache_ok(v_cache)):
        return 0
    if not (enabled() and _is_hopper(q.device) and launcher() is not None):
        return 0
    return rows



def decode_takes(dtype: torch.dtype, head_dim: int, group: int, page_size: int, window_left, softcap,
                 device: torch.device, num_programs: int, num_sms: int) -> bool:
    """Whether a decode launch of this shape (every segment one query token; ``num_programs``: segments x KV
    heads) takes the Gluon decode kernel, its caches permitting (``decode_caches_ok``); known when a plan is
    made. Only batches whose programs fit one round of it (two an SM): on an H200 it was 1.02x the ``tl``
    kernel at (32, 4096) and 1.01x at (32, 32768) (one split instead of three, no merge launch), level at
    (1, 131072), and 0.99-1.0x where several rounds run (128 and 256 requests: 1024-2048 programs)."""
    if num_programs > DECODE_PROGRAMS_PER_SM * num_sms:
        return False
    if interpreting() or dtype not in (torch.float16, torch.bfloat16) or head_dim not in DECODE_STAGES:
        return False
    if group > 8 or page_size % 16 or window_left is not None or softcap is not None:
        return False
    return enabled() and _is_hopper(device) and decode_launcher() is not None


def decode_caches_ok(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The caches a Gluon decode launch can read: row-contiguous pages addressable by block copies."""
    num_pages, page_size = k_cache.shape[:2]
    return num_pages * page_size < 2**31 and cache_ok(k_cache) and cache_ok(v_cache)


def decode_splits(num_programs: int, max_kv_len: int, num_sms: int) -> int:
    """Splits a segment for the Gluon decode kernel: as many as fit in one round of programs (two an SM),
    each of ``DECODE_MIN_SPLIT`` keys at least. At (batch 32 x 8 KV heads, 4096 keys) that is one: each
    (request, KV head) one program of four warps, no merge launch."""
    if num_programs <= 0 or max_kv_len <= 0:
        return 1
    one_round = DECODE_PROGRAMS_PER_SM * num_sms // num_programs
    return max(1, min(one_round, cdiv(max_kv_len, DECODE_MIN_SPLIT), 256))
