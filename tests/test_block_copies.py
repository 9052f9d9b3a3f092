"""KV tiles loaded as block copies (tensor descriptors, ``cascade_kernels/_tma.py``).

Where a KV tile lies inside one page of a row-contiguous (NHD) cache, the attention kernel copies it as
one block instead of gathering its rows. Held here, on layouts drawn by hypothesis with pages of 128 and
256 slots (a multiple of every KV tile the configs use, so every tile is page-aligned):

* prefill and decode equal the float64 reference, with the block-copy path taken (on the GPU only where
  it has a tensor memory accelerator, by the Gluon kernels where they take the launch; always under the
  interpreter), unused slots NaN;
* the same problems through the row-gather path (block copies and the Gluon kernels turned off) agree within rounding;

and, directly, which caches qualify: NHD yes; HND views, halves of a fused cache, misaligned bases,
page sizes that are not multiples of the tile, prefetching configs no.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import cascade_kernels as ck
import reference
from cascade_kernels import _gluon, _tma, attention
from cascade_kernels._triton import interpreting
from conftest import DEVICE
from strategies import decode_problem, paged_problem
from test_prefill import check_outputs, check_same, dirty_device_memory, fewer

PAGES = (128, 256)


def _has_tma() -> bool:
    return interpreting() or (DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9)


def _check_both_paths(p, kernel, ref, args, launches_expected: bool):
    """``kernel(*args)`` equals ``ref(*args)`` with block copies (each launch taking them exactly where
    it should: on a GPU with a TMA and under the interpreter, unless the config prefetches) and
    agrees within rounding with the row-gather path."""
    answers, real, real_rows = [], attention.tma_usable, _gluon.page_rows

    def spy(k_cache, v_cache, block_n, block_d, prefetch, page_runs=False):
        answers.append((real(k_cache, v_cache, block_n, block_d, prefetch, page_runs), _has_tma() and not prefetch))
        return answers[-1][0]

    def rows_spy(*args):  # a launch the Gluon kernel takes reads its tiles as block copies of its own
        rows = real_rows(*args)
        if rows:
            answers.append((True, True))
        return rows

    real_decode = attention.gluon_decode

    def decode_spy(*args):  # so does a launch the Gluon decode kernel takes
        taken = real_decode(*args)
        if taken:
            answers.append((True, True))
        return taken

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "tma_usable", spy)
        mp.setattr(_gluon, "page_rows", rows_spy)
        mp.setattr(attention, "gluon_decode", decode_spy)
        dirty_device_memory()
        fast = kernel(*args, **p.options)
    check_outputs(*fast, ref(*args, **p.options), p.q, msg=repr(p))
    if launches_expected:
        assert answers and all(used == expected for used, expected in answers), answers
    with pytest.MonkeyPatch.context() as mp:  # the tl kernel's row gathers
        mp.setattr(attention, "tma_usable", lambda *a, **k: False)
        mp.setattr(_gluon, "page_rows", lambda *a, **k: 0)
        mp.setattr(attention, "gluon_decode", lambda *a, **k: False)
        gathered = kernel(*args, **p.options)
    check_same(fast, gathered, p.dtype, msg=repr(p))


@fewer(2)
@given(paged_problem(page_size_choices=PAGES, layouts=("nhd",), max_kv=300))
def test_prefill_with_block_copies(p):
    _check_both_paths(p, ck.paged_prefill, reference.paged_prefill, p.args,
                      launches_expected=bool(p.q.shape[0] and p.kv.indices.numel()))


@fewer(2)
@given(decode_problem(page_size_choices=PAGES, layouts=("nhd",), max_kv=600))
def test_decode_with_block_copies(p):
    _check_both_paths(p, ck.paged_decode, reference.paged_decode, p.decode_args,
                      launches_expected=bool(p.kv.indices.numel()))


def _cache(num_pages=4, page_size=128, heads=2, head_dim=64, dtype=torch.float16):
    return torch.randn(num_pages, page_size, heads, head_dim).to(dtype).to(DEVICE)


def test_which_caches_qualify():
    """Only row-contiguous pages with 16-byte aligned rows, tiles inside a page, no register prefetch."""
    k, v = _cache(), _cache()
    expected = _has_tma()
    assert _tma.tma_usable(k, v, block_n=64, block_d=64, prefetch=False) == expected
    assert not _tma.tma_usable(k, v, block_n=64, block_d=64, prefetch=True)
    assert not _tma.tma_usable(_cache(page_size=96), _cache(page_size=96), block_n=64, block_d=64, prefetch=False)
    hnd = _cache().transpose(1, 2).contiguous().transpose(1, 2)  # [P, Hkv, page, D] storage
    assert not _tma.tma_usable(hnd, hnd, block_n=64, block_d=64, prefetch=False)
    fused = torch.stack([k, v], dim=1)  # [P, 2, page, Hkv, D]: a half's pages are not row-contiguous
    assert not _tma.tma_usable(fused[:, 0], fused[:, 1], block_n=64, block_d=64, prefetch=False)
    wide = _cache(head_dim=72)
    misaligned = wide[..., 4:]  # base 8 bytes past a 16-byte boundary, rows of 144 bytes
    assert not _tma.tma_usable(misaligned, misaligned, block_n=64, block_d=128, prefetch=False)
