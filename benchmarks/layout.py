"""Benchmark inputs: head shapes, paged caches filled with random data, and page tables over them.

Every page table is kept on the host (int64, for building peers' layouts) and turned into device int32
tensors on demand: a ``cascade_kernels.PagedKV`` for our kernels, ``(indptr, indices, last_page_len)``
for FlashInfer. Pages are handed out in a random order, as a serving engine's allocator would after a
while, so no kernel gets contiguous pages for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """Head counts, head dim and dtype of every case of a run."""

    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_token_bytes(self) -> int:
        """Bytes of one token's keys plus values over all KV heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.elem_bytes

    @property
    def q_token_bytes(self) -> int:
        """Bytes of one token's query (the output has the same size)."""
        return self.num_q_heads * self.head_dim * self.elem_bytes


FULL_SHAPE = Shape()
QUICK_SHAPE = Shape(num_q_heads=4, num_kv_heads=2, head_dim=32)


class PagePool:
    """Page ids ``0 .. num_pages - 1`` in a seeded random order, handed out without reuse."""

    def __init__(self, num_pages: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(num_pages, generator=gen)
        self.next = 0

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` page ids, int64 on the host."""
        if self.next + n > self.perm.numel():
            raise ValueError(f"page pool exhausted: {n} pages asked, {self.perm.numel() - self.next} left")
        out = self.perm[self.next : self.next + n]
        self.next += n
        return out


def pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


def make_cache(num_pages: int, page_size: int, shape: Shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(k_cache, v_cache)``, each ``[num_pages, page_size, num_kv_heads, head_dim]`` (never zeros)."""
    dims = (num_pages, page_size, shape.num_kv_heads, shape.head_dim)
    return (torch.randn(dims, dtype=shape.dtype, device=device),
            torch.randn(dims, dtype=shape.dtype, device=device))


@dataclass
class Segments:
    """``S`` KV segments in a paged cache, on the host: pages ``indices[indptr[s]:indptr[s+1]]`` hold
    ``lens[s]`` tokens at positions ``start_pos[s] ...``. All int64 ``[S+1]`` / ``[pages]`` / ``[S]``."""

    indptr: torch.Tensor
    indices: torch.Tensor
    lens: torch.Tensor
    start_pos: torch.Tensor
    page_size: int

    @staticmethod
    def from_pages(page_lists: list[torch.Tensor], lens: list[int], start_pos: list[int], page_size: int):
        """Segments from one page-id tensor per segment."""
        counts = torch.tensor([p.numel() for p in page_lists], dtype=torch.int64)
        indptr = torch.zeros(len(page_lists) + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        indices = torch.cat(page_lists) if page_lists else torch.zeros(0, dtype=torch.int64)
        return Segments(indptr, indices.to(torch.int64), torch.tensor(lens, dtype=torch.int64),
                        torch.tensor(start_pos, dtype=torch.int64), page_size)

    @staticmethod
    def allocate(pool: PagePool, lens: list[int], start_pos: list[int], page_size: int):
        """Fresh pages from ``pool`` for segments of the given lengths."""
        return Segments.from_pages([pool.take(pages_for(n, page_size)) for n in lens], lens, start_pos, page_size)

    @property
    def num_segments(self) -> int:
        return self.lens.numel()

    def pages(self, s: int) -> torch.Tensor:
        return self.indices[int(self.indptr[s]) : int(self.indptr[s + 1])]

    def paged_kv(self, device):
        """``cascade_kernels.PagedKV`` on ``device`` (int32)."""
        import cascade_kernels as ck

        i32 = lambda t: t.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
        return ck.PagedKV(i32(self.indptr), i32(self.indices), i32(self.lens), i32(self.start_pos))

    def flashinfer_tables(self, device):
        """``(indptr, indices, last_page_len)`` int32 on ``device``; last_page_len in ``1 .. page_size``."""
        last = self.lens - (self.indptr[1:] - self.indptr[:-1] - 1) * self.page_size
        i32 = lambda t: t.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
        return i32(self.indptr), i32(self.indices), i32(last)

    def dense(self, cache: torch.Tensor, s: int) -> torch.Tensor:
        """Segment ``s`` of ``cache`` as a contiguous ``[lens[s], Hkv, D]`` tensor (a copy)."""
        pages = self.pages(s).to(cache.device)
        return cache[pages].reshape(-1, *cache.shape[2:])[: int(self.lens[s])].contiguous()

    def dense_batch(self, cache: torch.Tensor, segs: list[int]) -> torch.Tensor:
        """Segments ``segs`` (all of one length) as a contiguous ``[len(segs), L, Hkv, D]`` tensor (a copy);
        ``.transpose(1, 2)`` of it is the ``[G, Hkv, L, D]`` view that SDPA takes."""
        length = int(self.lens[segs[0]])
        pages = torch.stack([self.pages(s) for s in segs]).to(cache.device)  # [G, pages per segment]
        return cache[pages].reshape(len(segs), -1, *cache.shape[2:])[:, :length].contiguous()


@dataclass
class AttnData:
    """Query segments over KV segments (decode: one query per segment; prefill: many).

    ``q [N, Hq, D]``, ``q_pos [N]`` int32 and ``qo_indptr [S+1]`` int32 on the device (``qo_host`` on the
    host); query segment ``s`` attends causally to KV segment ``s``, whose last tokens are the query's own.
    """

    q: torch.Tensor
    q_pos: torch.Tensor
    qo_indptr: torch.Tensor
    qo_host: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    seg: Segments
    kv: object  # cascade_kernels.PagedKV
    shape: Shape
    tag: str = ""  # the case's name, so that a capped peer can tell which cases it runs on

    @property
    def device(self):
        return self.q.device


def attn_data(new: list[int], cached: list[int], page_size: int, shape: Shape, device, seed: int = 0) -> AttnData:
    """Segment ``s`` appends ``new[s]`` query tokens after ``cached[s]`` cached ones: its KV holds
    ``cached[s] + new[s]`` tokens at positions ``0 ..``, its queries sit at positions ``cached[s] ..``."""
    torch.manual_seed(seed)
    lens = [c + n for c, n in zip(cached, new)]
    pool = PagePool(sum(pages_for(n, page_size) for n in lens), seed)
    seg = Segments.allocate(pool, lens, [0] * len(lens), page_size)
    k_cache, v_cache = make_cache(pool.perm.numel(), page_size, shape, device)
    qo = torch.zeros(len(new) + 1, dtype=torch.int64)
    qo[1:] = torch.cumsum(torch.tensor(new, dtype=torch.int64), 0)
    q_pos = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new)]).to(torch.int32)
    q = torch.randn((int(qo[-1]), shape.num_q_heads, shape.head_dim), dtype=shape.dtype, device=device)
    return AttnData(q, q_pos.to(device), qo.to(device=device, dtype=torch.int32), qo, k_cache, v_cache,
                    seg, seg.paged_kv(device), shape)


def decode_data(batch: int, ctx: int, page_size: int, shape: Shape, device, seed: int = 0) -> AttnData:
    """``batch`` requests of ``ctx`` cached tokens each, one query token per request at position ``ctx - 1``
    (the new token's own key is already in the cache)."""
    return attn_data([1] * batch, [ctx - 1] * batch, page_size, shape, device, seed)


def cpu_paged_kv(seg: Segments):
    """The same page table as a CPU ``PagedKV``, for the float64 reference."""
    return seg.paged_kv("cpu")
