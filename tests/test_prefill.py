"""ck.paged_prefill against reference.paged_prefill, and the properties that make chunked attention exact.

What is held, on layouts drawn by hypothesis (``strategies.paged_problem``: page sizes 1..64, GQA with
MQA and group 3, head dims that are not powers of two, empty segments, positions with gaps, queries
before / inside / after their keys, NHD, HND and fused caches whose unused slots are NaN):

* the kernel equals the float64 reference for every option (causal or not, windows, soft caps, sinks,
  ``sm_scale``), for any strides of ``q``; a row that sees no key is ``lse = -inf`` and ``o = 0``;
* forcing the KV split count (1, 2, 3, 7) changes nothing beyond rounding;
* cutting a segment's KV at any page boundary into two segments and merging the two states with
  ``ck.merge_state`` gives the unsplit result (the sink counted in one half only);
* the result does not depend on where the pages sit in memory;

and, as explicit cases, odd lengths (17, 37) at page sizes 1 and 16, queries ahead of every key, windows
of 0, batches with empty segments or no token at all, and soft caps so large they are almost no cap.

Helpers used by the other kernel test files (``check_outputs``, ``build``, ``fewer``...) live here.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from cascade_kernels._triton import padded
from cascade_kernels.attention import TileConfig
from cascade_kernels.configs import pinned_config
from conftest import DEVICE, LARGE, assert_close
from strategies import _CacheBuilder, _paged_kv, paged_problem


def fewer(divisor: int) -> settings:
    """The loaded profile's example count divided by ``divisor``, for tests that launch several kernels."""
    return settings(max_examples=max(4, settings.default.max_examples // divisor))


def check_outputs(o, lse, expected, q, msg=""):
    """Shapes, dtypes, no NaN, the reference within ``q``'s tolerance, and ``o == 0`` exactly where ``lse = -inf``."""
    ref_o, ref_lse = expected
    assert o.shape == q.shape and o.dtype == q.dtype and o.device == q.device, (o.shape, o.dtype)
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    assert_close(o, ref_o, q.dtype, "o", msg=msg)
    assert_close(lse, ref_lse, q.dtype, "lse", msg=msg)
    empty = torch.isneginf(ref_lse.to(lse.device))
    assert bool((o[empty] == 0).all()), f"rows with lse = -inf must have o = 0 exactly {msg}"


def dirty_device_memory(nbytes: int = 1 << 22) -> None:
    """On a GPU, hand a NaN-filled block back to the caching allocator, so that outputs allocated next (with
    ``torch.empty``) likely start as NaN and an element the kernel leaves unwritten fails the comparison.
    Best effort, and a no-op on the CPU (whose allocator hands out fresh pages)."""
    if DEVICE == "cuda":
        torch.full((nbytes // 4,), math.nan, dtype=torch.float32, device=DEVICE)


def check_same(a, b, dtype, msg=""):
    """Two kernel results ``(o, lse)`` agree within ``dtype``'s tolerance."""
    assert_close(a[0], b[0], dtype, "o", msg=msg)
    assert_close(a[1], b[1], dtype, "lse", msg=msg)


def restride(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` (3-D) as a view with other strides: its storage permuted, or every other element."""
    if layout == "permuted":  # storage [H, D, N]
        return t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if layout == "strided":
        big = torch.full((t.shape[0], t.shape[1], 2 * t.shape[2]), math.nan, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t


# ---------------------------------------------------------------------------------------------------------
# Random layouts


@given(paged_problem(), st.sampled_from(["contiguous", "permuted", "strided"]))
def test_prefill_matches_reference(p, q_layout):
    q = restride(p.q, q_layout)
    dirty_device_memory()
    o, lse = ck.paged_prefill(q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, p.kv, **p.options)
    check_outputs(o, lse, reference.paged_prefill(*p.args, **p.options), p.q, msg=repr(p))


@fewer(2)
@given(paged_problem(), st.sampled_from([2, 3, 7]))
def test_prefill_does_not_depend_on_num_splits(p, num_splits):
    """Forced split counts give the reference, and the one-split result, within rounding."""
    expected = reference.paged_prefill(*p.args, **p.options)
    one = ck.paged_prefill(*p.args, **p.options, num_splits=1)
    check_outputs(*one, expected, p.q, msg=f"num_splits=1 {p!r}")
    many = ck.paged_prefill(*p.args, **p.options, num_splits=num_splits)
    check_outputs(*many, expected, p.q, msg=f"num_splits={num_splits} {p!r}")
    check_same(many, one, p.dtype, msg=f"num_splits={num_splits} vs 1 {p!r}")


@fewer(2)
@given(paged_problem(), st.sampled_from([(16, 16, 1), (32, 32, 2), (16, 64, 4)]), st.sampled_from([1, 3]))
def test_page_id_lookahead_changes_nothing(p, tile, num_splits):
    """Page ids read one KV tile ahead (``TileConfig.lookahead``) give the reference, and the result of
    reading them in the tile's own iteration, within rounding: gathered and one-page tiles (block copies
    where the cache allows), splits cutting the KV range anywhere."""
    if 3 * 2 * tile[1] * padded(p.q.shape[-1]) * p.q.element_size() > 160 * 1024:
        tile = (16, 16, 1)  # three stages of a wide tile would not fit a GPU's shared memory
    expected = reference.paged_prefill(*p.args, **p.options)
    out = {}
    for lookahead in (False, True):
        with pinned_config("prefill", TileConfig(*tile, 3, lookahead=lookahead)):
            out[lookahead] = ck.paged_prefill(*p.args, **p.options, num_splits=num_splits)
        check_outputs(*out[lookahead], expected, p.q, msg=f"lookahead={lookahead} {tile} {p!r}")
    check_same(out[True], out[False], p.dtype, msg=f"{tile} {p!r}")


def split_at_pages(kv: ck.PagedKV, page_size: int, cuts: list[int]) -> tuple[ck.PagedKV, ck.PagedKV]:
    """Cut segment ``s`` of ``kv`` after its first ``cuts[s]`` pages: two PagedKV over the same pages."""
    indptr, indices = kv.indptr.tolist(), kv.indices.tolist()
    lens, starts = kv.lens.tolist(), kv.start_pos.tolist()
    head_pages, tail_pages, head_lens, tail_lens, tail_starts = [], [], [], [], []
    for s, cut in enumerate(cuts):
        pages = indices[indptr[s] : indptr[s + 1]]
        n = min(lens[s], cut * page_size)
        head_pages.append(pages[:cut])
        tail_pages.append(pages[cut:])
        head_lens.append(n)
        tail_lens.append(lens[s] - n)
        tail_starts.append(starts[s] + n)
    return _paged_kv(head_pages, head_lens, starts), _paged_kv(tail_pages, tail_lens, tail_starts)


@fewer(2)
@given(paged_problem(), st.data())
def test_split_at_a_page_boundary_then_merge_equals_unsplit(p, data):
    """Fact 2 of the contract on the kernels: two halves of every segment, merged, are the whole segment.

    The sink is one extra logit of the whole softmax, so only the first half's call counts it.
    """
    pages = (p.kv.indptr[1:] - p.kv.indptr[:-1]).tolist()
    cuts = [data.draw(st.integers(0, n), label=f"cut[{s}]") for s, n in enumerate(pages)]
    head, tail = split_at_pages(p.kv, p.page_size, cuts)
    o_a, lse_a = ck.paged_prefill(p.q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, head, **p.options)
    o_b, lse_b = ck.paged_prefill(p.q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, tail,
                                  **dict(p.options, sinks=None))
    merged = ck.merge_state(o_a, lse_a, o_b, lse_b)
    msg = f"cuts={cuts} {p!r}"
    check_outputs(*merged, reference.paged_prefill(*p.args, **p.options), p.q, msg=msg)
    check_same(merged, ck.paged_prefill(*p.args, **p.options), p.dtype, msg=msg)


def permute_pages(cache: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """A copy of ``cache`` whose page ``i`` sits at page ``perm[i]``."""
    moved = cache.clone()
    moved[perm] = cache
    return moved


@fewer(2)
@given(paged_problem(), st.randoms(use_true_random=False))
def test_page_order_in_memory_does_not_matter(p, rnd):
    """Moving every page (NaN spare pages included) elsewhere in the cache and remapping the ids."""
    num_pages = p.k_cache.shape[0]
    order = list(range(num_pages))
    rnd.shuffle(order)
    perm = torch.tensor(order, dtype=torch.long, device=DEVICE)
    kv = ck.PagedKV(p.kv.indptr, perm[p.kv.indices.long()].to(torch.int32), p.kv.lens, p.kv.start_pos)
    k_cache, v_cache = permute_pages(p.k_cache, perm), permute_pages(p.v_cache, perm)
    moved = ck.paged_prefill(p.q, p.q_pos, p.qo_indptr, k_cache, v_cache, kv, **p.options)
    msg = f"perm={order} {p!r}"
    check_outputs(*moved, reference.paged_prefill(*p.args, **p.options), p.q, msg=msg)
    check_same(moved, ck.paged_prefill(*p.args, **p.options), p.dtype, msg=msg)


# ---------------------------------------------------------------------------------------------------------
# Explicit cases


def build(segments, *, page_size, num_q_heads=4, num_kv_heads=2, head_dim=40, dtype=torch.float32, seed=0,
          layout="nhd"):
    """A prefill batch from ``segments``: a list of ``(kv_len, start_pos, query positions)``.

    Pages are shuffled and every unused slot is NaN (as in the strategies). Returns the positional
    arguments of ``paged_prefill``: ``(q, q_pos, qo_indptr, k_cache, v_cache, kv)``.
    """
    gen = torch.Generator().manual_seed(seed)
    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, dtype)
    q_pos, qo_indptr = [], [0]
    for kv_len, _, positions in segments:
        k = torch.randn((kv_len, num_kv_heads, head_dim), generator=gen).to(dtype)
        v = torch.randn((kv_len, num_kv_heads, head_dim), generator=gen).to(dtype)
        builder.add(k, v)
        q_pos += list(positions)
        qo_indptr.append(len(q_pos))
    k_cache, v_cache, pages = builder.build(gen, layout, spare_pages=2)
    kv = _paged_kv(pages, [n for n, _, _ in segments], [s for _, s, _ in segments])
    q = torch.randn((len(q_pos), num_q_heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return q, torch.tensor(q_pos, **i32), torch.tensor(qo_indptr, **i32), k_cache, v_cache, kv


def check_prefill(args, num_splits=None, **options):
    o, lse = ck.paged_prefill(*args, **options, num_splits=num_splits)
    check_outputs(o, lse, reference.paged_prefill(*args, **options), args[0],
                  msg=f"num_splits={num_splits} {options}")
    return o, lse


@pytest.mark.parametrize("page_size", [1, 16])
def test_odd_lengths(page_size):
    """Segments of 17 and 37 keys (partial last pages), prefilled over themselves and after a gap; GQA 3."""
    segments = [
        (17, 0, range(17)),                 # a prefill of its own keys
        (37, 1000, range(1030, 1037)),      # the last 7 of them
        (37, 50, range(90, 95)),            # after a gap: every key visible
    ]
    args = build(segments, page_size=page_size, num_q_heads=6, num_kv_heads=2, head_dim=40, dtype=torch.float16)
    check_prefill(args)
    check_prefill(args, causal=False, num_splits=7)
    check_prefill(args, window_left=5, softcap=5.0, num_splits=2)
    check_prefill(args, window_left=16, sm_scale=0.3, sinks=torch.linspace(-2, 3, 6, device=DEVICE))


@pytest.mark.parametrize("page_size", [1, 3])
def test_queries_before_the_kv_see_nothing(page_size):
    """Causal queries ahead of every key: ``lse = -inf`` and ``o = 0`` (``lse = sink`` with sinks)."""
    segments = [(17, 100, [0, 50, 99, 99]), (37, 2**31 - 100, [5, 2**31 - 101])]
    args = build(segments, page_size=page_size)
    o, lse = check_prefill(args)
    assert bool(torch.isneginf(lse).all()) and bool((o == 0).all())
    o, lse = ck.paged_prefill(*args, num_splits=7)
    assert bool(torch.isneginf(lse).all()) and bool((o == 0).all())
    o, lse = ck.paged_prefill(*args, window_left=3)
    assert bool(torch.isneginf(lse).all()) and bool((o == 0).all())

    sinks = torch.tensor([0.5, -1.0, 2.0, 7.0], device=DEVICE)
    o, lse = check_prefill(args, sinks=sinks)
    assert bool((o == 0).all())
    assert_close(lse, sinks.expand_as(lse), torch.float32, "lse")

    o, lse = check_prefill(args, causal=False)  # without the causal mask every key is visible
    assert bool(torch.isfinite(lse).all())


@pytest.mark.parametrize("page_size", [1, 16])
def test_window_of_zero_sees_only_its_own_position(page_size):
    """``window_left=0``: a query at the position of a key sees that key alone; past the keys, nothing."""
    segments = [(37, 10, [10, 20, 30, 46, 47, 60])]  # keys at 10..46; 47 and 60 see none
    q, q_pos, qo_indptr, k_cache, v_cache, kv = args = build(segments, page_size=page_size, num_q_heads=4,
                                                            num_kv_heads=1, head_dim=32)
    o, lse = check_prefill(args, window_left=0)
    k = reference.gather_segment(k_cache, kv, 0).double()
    v = reference.gather_segment(v_cache, kv, 0).double()
    for t, pos in enumerate(q_pos.tolist()[:4]):
        j = pos - 10
        assert_close(o[t], v[j].expand(4, -1), torch.float32, "o")
        assert_close(lse[t], (q[t].double() @ k[j, 0]) * 32**-0.5, torch.float32, "lse")
    assert bool(torch.isneginf(lse[4:]).all()) and bool((o[4:] == 0).all())


def test_empty_segments_and_empty_batches():
    """KV segments of length 0, query segments of length 0, and a batch with no query token at all."""
    segments = [(0, 0, [0, 5]), (17, 3, []), (0, 100, []), (5, 7, [11, 12]), (0, 2**31 - 1, [2**31 - 1])]
    args = build(segments, page_size=4)
    o, lse = check_prefill(args)
    assert bool(torch.isneginf(lse[:2]).all()) and bool((o[:2] == 0).all())
    assert bool(torch.isneginf(lse[4:]).all()) and bool((o[4:] == 0).all())
    check_prefill(args, causal=False, sinks=torch.zeros(4, device=DEVICE))
    for num_splits in (1, 3):
        check_prefill(args, num_splits=num_splits)

    args = build([(17, 0, []), (0, 0, [])], page_size=16)
    o, lse = ck.paged_prefill(*args)
    assert o.shape == (0, 4, 40) and lse.shape == (0, 4) and lse.dtype == torch.float32

    args = build([], page_size=16)
    o, lse = ck.paged_prefill(*args)
    assert o.shape == (0, 4, 40) and lse.shape == (0, 4)


@pytest.mark.parametrize("softcap", [50.0, 1e4, 1e30])
def test_large_softcap_is_almost_no_cap(softcap):
    """``c * tanh(x / c)`` tends to ``x`` as ``c`` grows: a large cap must give (almost) uncapped attention.

    In fp32 the reference's ``c * tanh(x / c)`` is within 1e-12 of ``x`` at ``c = 1e4`` and exactly ``x``
    at ``1e30``, so the kernel is held to the fp32 tolerance like any other option value.
    """
    args = build([(37, 0, range(30, 40)), (17, 5, [21, 30])], page_size=16, dtype=torch.float32)
    o, lse = check_prefill(args, softcap=softcap)
    if softcap >= 1e4:  # |x| < 10 here, so c * tanh(x / c) differs from x by less than x^3 / 3c^2 < 1e-5
        check_same((o, lse), ck.paged_prefill(*args), torch.float32, msg=f"softcap={softcap} vs none")


@pytest.mark.skipif(not LARGE, reason="a long sequence runs under the gpu hypothesis profile (CK_HYPOTHESIS_PROFILE=gpu)")
@pytest.mark.parametrize("page_size", [1, 16])
def test_long_sequence_prefill(page_size):
    """A prefill of 2000 keys over themselves, with and without a window, on the compiled kernel."""
    segments = [(2000, 0, range(2000)), (1500, 10**6, range(10**6 + 1400, 10**6 + 1600))]
    args = build(segments, page_size=page_size, num_q_heads=8, num_kv_heads=2, head_dim=128,
                 dtype=torch.bfloat16)
    check_prefill(args)
    check_prefill(args, window_left=255)
    check_prefill(args, window_left=100, num_splits=3)
