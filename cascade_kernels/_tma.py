"""When the attention kernel may load KV tiles as block copies (Hopper's tensor memory accelerator).

A KV tile that lies inside one page (or in pages with consecutive ids, of a cache that holds its pages
one after another) is a block of contiguous cache rows, which a tensor descriptor
copies to shared memory in one instruction, without a per-row address computation: no registers for
the ``[BLOCK_N, BLOCK_D]`` pointer tile, and loads that Triton pipelines asynchronously. The kernel
builds its descriptors on the device; each needs a small global scratch (128 bytes a program), which
Triton asks its allocator for at launch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import interpreting

try:  # where Triton keeps its scratch allocator (triton >= 3.3, with on-device descriptors)
    from triton.runtime import _allocation
except ImportError:
    _allocation = None
# Block copies need on-device descriptors and an allocator API this module knows (checked: triton 3.6, 3.9).
_SUPPORTED = (hasattr(tl, "make_tensor_descriptor") and hasattr(_allocation, "_allocator")
              and hasattr(_allocation, "NullAllocator"))

_TMA_ALIGN = 16  # bytes: base address and every stride but the last
_MAX_BOX = 256  # elements per dimension of one block copy


@functools.lru_cache(maxsize=None)
def _device_has_tma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def rows_contiguous(cache: torch.Tensor) -> bool:
    """Whether the cache ``[pages, page_size, heads, dim]`` holds its pages one after another in rows:
    slot ``j`` of page ``p`` is row ``p * page_size + j`` of one KV head's ``[pages * page_size, ...]`` view
    (an NHD cache; not an HND view or one half of a fused cache)."""
    return cache.stride(0) == cache.shape[1] * cache.stride(1) or cache.shape[0] == 1


def cache_ok(cache: torch.Tensor) -> bool:
    """The cache's rows of one KV head form a 2-D view ``[pages * page_size, head_dim]`` a descriptor can
    address: unit stride along head_dim, pages one after another in rows, 16-byte aligned strides."""
    _, s_slot, s_head, s_dim = cache.stride()
    size = cache.element_size()
    return (s_dim == 1 and rows_contiguous(cache)
            and (s_slot * size) % _TMA_ALIGN == 0 and (s_head * size) % _TMA_ALIGN == 0
            and cache.data_ptr() % _TMA_ALIGN == 0)


def tma_usable(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int, block_d: int, prefetch: bool,
               page_runs: bool = False) -> bool:
    """Whether KV tiles of ``block_n`` rows can be loaded as block copies from these caches.

    Needs a GPU with a tensor memory accelerator (compute capability 9 or newer; always true under the
    interpreter, so the path is tested on a CPU), tiles that never cross a page (or, with ``page_runs``,
    only into the next page id, which the caller checked), caches whose pages are row-contiguous (an NHD
    cache, not an HND view or one half of a fused cache), and row indices in int32.
    """
    num_pages, page_size = k_cache.shape[:2]
    if prefetch or (page_size % block_n and not page_runs) or block_n > _MAX_BOX or block_d > _MAX_BOX:
        return False
    if num_pages * page_size >= 2**31 or not _SUPPORTED:
        return False
    if not (interpreting() or _device_has_tma(k_cache.device)):
        return False
    return cache_ok(k_cache) and cache_ok(v_cache)


def _scratch(size: int, alignment: int, stream):
    """Triton's global-scratch allocator: stream-ordered memory from PyTorch's caching allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton an allocator for kernel scratch where none is set (in this thread's context)."""
    if interpreting():
        return
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
