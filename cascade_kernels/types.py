"""The two descriptions of a batch that every entry point takes: ``PagedKV`` and ``CascadeLevel``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import _int32_range_check, check_indptr, check_tensor, validation_enabled


@dataclass(frozen=True, eq=False)
class PagedKV:
    """``S`` segments of keys and values in a paged cache, each at explicit global positions.

    Segment ``s`` holds ``lens[s]`` tokens at positions ``start_pos[s] ... start_pos[s] + lens[s] - 1``,
    stored in order in pages ``indices[indptr[s]:indptr[s + 1]]``, filled from the first slot of the
    first page. All four tensors are int32 and on one device.

    Parameters
    ----------
    indptr : torch.Tensor
        ``[S + 1]`` int32, non-decreasing from 0: the pages of each segment in ``indices``.
    indices : torch.Tensor
        ``[num_used_pages]`` int32 page ids into the cache's first dimension.
    lens : torch.Tensor
        ``[S]`` int32 >= 0: tokens in each segment (0 is an empty segment).
    start_pos : torch.Tensor
        ``[S]`` int32 >= 0: global position of each segment's first token.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> kv = ck.PagedKV(indptr=i32(0, 2, 3), indices=i32(4, 0, 7), lens=i32(20, 5), start_pos=i32(0, 20))
    >>> kv.num_segments
    2
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    lens: torch.Tensor
    start_pos: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor("PagedKV.indptr", self.indptr, ndim=1, dtypes=(torch.int32,))
        if self.indptr.numel() < 1:
            raise ValueError("PagedKV.indptr must have S + 1 >= 1 entries, got 0")
        s = self.indptr.numel() - 1
        device = self.indptr.device
        check_tensor("PagedKV.indices", self.indices, ndim=1, dtypes=(torch.int32,), device=device)
        check_tensor("PagedKV.lens", self.lens, dtypes=(torch.int32,), shape=(s,), device=device)
        check_tensor("PagedKV.start_pos", self.start_pos, dtypes=(torch.int32,), shape=(s,), device=device)
        if not all(t.is_contiguous() for t in (self.indptr, self.indices, self.lens, self.start_pos)):
            raise ValueError("PagedKV tensors must be contiguous")
        if validation_enabled():
            check_indptr("PagedKV.indptr", self.indptr)
            last = int(self.indptr[-1].item())
            if last > self.indices.numel():
                raise ValueError(
                    f"PagedKV.indptr ends at {last} but indices holds only {self.indices.numel()} pages"
                )
            if bool((self.indices < 0).any()):
                raise ValueError("PagedKV.indices must be >= 0")
            if bool((self.lens < 0).any()):
                raise ValueError(f"PagedKV.lens must be >= 0, got {self.lens.tolist()[:16]}")
            if bool((self.start_pos < 0).any()):
                raise ValueError(f"PagedKV.start_pos must be >= 0, got {self.start_pos.tolist()[:16]}")
            _int32_range_check("PagedKV.start_pos + lens", self.start_pos.long() + self.lens.long())

    @property
    def num_segments(self) -> int:
        return self.lens.numel()

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def check_pages(self, page_size: int, num_pages: int, name: str = "kv") -> None:
        """Value checks against a cache: page ids below ``num_pages``, ``lens`` fitting their pages."""
        if not validation_enabled():
            return
        if self.indices.numel() and int(self.indices.max().item()) >= num_pages:
            raise ValueError(
                f"{name}.indices holds page {int(self.indices.max().item())}, "
                f"out of range for a cache of {num_pages} pages"
            )
        pages = (self.indptr[1:] - self.indptr[:-1]).long()
        over = self.lens.long() > pages * page_size
        if bool(over.any()):
            s = int(over.nonzero()[0].item())
            raise ValueError(
                f"{name}.lens[{s}] = {int(self.lens[s].item())} is longer than its "
                f"{int(pages[s].item())} pages of {page_size} slots hold"
            )


@dataclass(frozen=True, eq=False)
class CascadeLevel:
    """One level of a cascade: query segment ``s`` (``q[qo_indptr[s]:qo_indptr[s + 1]]``) reads kv segment ``s``.

    Parameters
    ----------
    qo_indptr : torch.Tensor
        ``[S + 1]`` int32, non-decreasing from 0 and ending at the number of query tokens.
    kv : PagedKV
        ``S`` KV segments.

    Examples
    --------
    A prefix shared by two requests of one token each, then one segment per request:

    >>> import torch, cascade_kernels as ck
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> shared = ck.CascadeLevel(i32(0, 2), ck.PagedKV(i32(0, 4), i32(0, 1, 2, 3), i32(64), i32(0)))
    >>> own = ck.CascadeLevel(i32(0, 1, 2), ck.PagedKV(i32(0, 1, 2), i32(4, 5), i32(3, 9), i32(64, 64)))
    """

    qo_indptr: torch.Tensor
    kv: PagedKV

    def __post_init__(self) -> None:
        if not isinstance(self.kv, PagedKV):
            raise TypeError(f"CascadeLevel.kv must be a PagedKV, got {type(self.kv).__name__}")
        check_tensor(
            "CascadeLevel.qo_indptr",
            self.qo_indptr,
            dtypes=(torch.int32,),
            shape=(self.kv.num_segments + 1,),
            device=self.kv.device,
        )
        if not self.qo_indptr.is_contiguous():
            raise ValueError("CascadeLevel.qo_indptr must be contiguous")
        check_indptr("CascadeLevel.qo_indptr", self.qo_indptr)

    @property
    def num_segments(self) -> int:
        return self.kv.num_segments
