"""ck.cascade_attention and ck.plan_cascade: chunked, multi-level attention equals standard attention.

What is held, on layouts drawn by hypothesis:

* over random cascades (2-4 levels, shared and per-request levels, empty chunks and empty levels,
  positions with gaps, windows, soft caps, sinks counted once) the kernel equals
  ``reference.cascade_attention``, which takes one softmax over every level's keys and merges nothing;
* the seed problem: any partition of a sequence's KV into chunks, one chunk a level, gives what one
  level with the whole KV gives, kernel against kernel and both against the reference;
* a cascade equals the flat layout (one segment per request with all its KV);
* ``plan_cascade(...).run`` equals ``cascade_attention``, runs again with new queries, positions and
  cache contents, and writes every element of ``out=`` and nothing around it; a plan's runs on inputs of
  changing layouts (misaligned, strided, aliased) each give their reference (replaying recorded launches
  only for a layout like the last one's);
* on a GPU, ``plan.run`` captured in a CUDA graph and replayed with new inputs.

Explicit cases: the FlashInfer-style comparison of three, two and one level at lengths 17 and 37 and page
sizes 1 and 16, and batches where no level holds a key.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from cascade_kernels import _launch
from conftest import DEVICE, LARGE, assert_close, poison
from strategies import _CacheBuilder, _paged_kv, cascade_problem, partition_problem
from test_prefill import check_outputs, check_same, dirty_device_memory, fewer


def run_cascade(p, levels=None, **overrides):
    options = dict(p.options, **overrides)
    return ck.cascade_attention(p.q, p.q_pos, p.k_cache, p.v_cache, p.levels if levels is None else levels,
                                **options)


def reference_cascade(p, q=None, q_pos=None, k_cache=None, v_cache=None):
    return reference.cascade_attention(p.q if q is None else q, p.q_pos if q_pos is None else q_pos,
                                       p.k_cache if k_cache is None else k_cache,
                                       p.v_cache if v_cache is None else v_cache, p.levels, **p.options)


def plan_for(p, **overrides):
    return ck.plan_cascade(p.levels, num_q_heads=p.num_q_heads, num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
                           page_size=p.page_size, dtype=p.dtype, num_pages=p.k_cache.shape[0],
                           **dict(p.options, **overrides))


@given(cascade_problem(allow_gaps=True))
def test_cascade_matches_reference(p):
    dirty_device_memory()
    o, lse = run_cascade(p)
    check_outputs(o, lse, reference_cascade(p), p.q, msg=repr(p))


@given(partition_problem())
def test_any_partition_equals_the_whole_sequence(p):
    """Chunks of one sequence at separate levels (in any order, empty ones included) = the sequence whole."""
    expected = reference.attention(p.q, p.k, p.v, p.q_pos, p.kv_pos, **p.options)
    chunked = run_cascade(p)
    check_outputs(*chunked, expected, p.q, msg=f"chunks {p!r}")
    check_outputs(*chunked, reference_cascade(p), p.q, msg=f"chunks vs reference cascade {p!r}")
    whole = run_cascade(p, levels=[p.whole_level])
    check_outputs(*whole, expected, p.q, msg=f"whole {p!r}")
    check_same(chunked, whole, p.dtype, msg=f"chunks vs whole {p!r}")


@fewer(2)
@given(cascade_problem())
def test_cascade_equals_flat_attention(p):
    """The tree of shared and per-request levels = one segment per request holding all its KV."""
    assert p.flat_level is not None  # positions are consecutive without allow_gaps
    cascade = run_cascade(p)
    flat = run_cascade(p, levels=[p.flat_level])
    check_outputs(*flat, reference_cascade(p), p.q, msg=f"flat {p!r}")
    check_same(cascade, flat, p.dtype, msg=repr(p))
    prefill = ck.paged_prefill(p.q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, p.flat_kv, **p.options)
    check_same(cascade, prefill, p.dtype, msg=f"vs paged_prefill {p!r}")


def refill(cache: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``cache`` with new values in every slot that holds one (NaN slots stay NaN)."""
    fresh = torch.randn(cache.shape, generator=gen).to(cache.dtype).to(cache.device)
    out = cache.clone()
    out.copy_(torch.where(torch.isnan(cache), cache, fresh))
    return out


@fewer(2)
@given(cascade_problem(allow_gaps=True), st.integers(0, 2**32 - 1))
def test_plan_runs_again_with_new_inputs(p, seed):
    """``plan.run`` = ``cascade_attention``; a second run with new q, shifted q_pos and new cache values
    gives the reference of the new inputs, in the same output buffers."""
    plan = plan_for(p)
    o1, lse1 = plan.run(p.q, p.q_pos, p.k_cache, p.v_cache)
    check_outputs(o1, lse1, reference_cascade(p), p.q, msg=f"first run {p!r}")
    check_same((o1, lse1), run_cascade(p), p.dtype, msg=f"run vs cascade_attention {p!r}")
    first = (o1.clone(), lse1.clone())

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(p.q.shape, generator=gen).to(p.dtype).to(DEVICE)
    shift = torch.randint(-3, 4, p.q_pos.shape, generator=gen, dtype=torch.int32).to(DEVICE)
    q_pos = (p.q_pos.long() + shift).clamp(0, 2**31 - 1).to(torch.int32)
    k_cache, v_cache = refill(p.k_cache, gen), refill(p.v_cache, gen)
    o2, lse2 = plan.run(q, q_pos, k_cache, v_cache)
    assert o2.data_ptr() == o1.data_ptr() and lse2.data_ptr() == lse1.data_ptr()
    check_outputs(o2, lse2, reference_cascade(p, q, q_pos, k_cache, v_cache), q, msg=f"second run {p!r}")
    if bool((first[0] != 0).any()):
        assert not torch.equal(first[0], o2), "the second run returned the first run's output"


@fewer(2)
@given(cascade_problem(allow_gaps=True), st.booleans())
def test_run_writes_every_output_element(p, strided):
    """``out=`` views of NaN-poisoned buffers (strided ones too) are filled; nothing around them is touched."""
    n, h, d = p.q.shape
    big_o = poison(torch.empty(n, h, 2 * d, dtype=p.dtype, device=DEVICE))
    big_lse = poison(torch.empty(n, 2 * h, device=DEVICE))
    if strided:
        out, rest = (big_o[..., ::2], big_lse[:, ::2]), (big_o[..., 1::2], big_lse[:, 1::2])
    else:
        out, rest = (big_o[..., :d], big_lse[:, :h]), (big_o[..., d:], big_lse[:, h:])
    o, lse = plan_for(p).run(p.q, p.q_pos, p.k_cache, p.v_cache, out=out)
    assert o.data_ptr() == out[0].data_ptr() and lse.data_ptr() == out[1].data_ptr()
    check_outputs(out[0], out[1], reference_cascade(p), p.q, msg=f"strided={strided} {p!r}")
    assert bool(torch.isnan(rest[0]).all()) and bool(torch.isnan(rest[1]).all()), "wrote outside out="


def _misaligned(t):
    """``t``'s values in a view whose data starts one element past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def _strided_cache(cache):
    """``cache``'s values in a view into a buffer twice as wide along head_dim (other strides)."""
    wide = poison(torch.empty(*cache.shape[:3], 2 * cache.shape[3], dtype=cache.dtype, device=cache.device))
    view = wide[..., : cache.shape[3]]
    view.copy_(cache)
    return view


@fewer(2)
@given(cascade_problem(allow_gaps=True), st.integers(0, 2**32 - 1))
def test_plan_runs_inputs_of_every_layout(p, seed):
    """One plan run on inputs laid out in turn as before (new tensors), with q misaligned, with strided
    caches, with one tensor for both caches, and as at first again: each run gives its inputs' reference.
    Where launches are direct (a GPU), a run laid out as the one before replays its recorded launches and
    every other run launches anew."""
    plan = plan_for(p)
    replays = []
    original = _launch.Bound.__call__
    gen = torch.Generator().manual_seed(seed)

    def fresh_q():
        return torch.randn(p.q.shape, generator=gen).to(p.dtype).to(DEVICE)

    def fresh():  # new tensors, laid out alike (fresh allocations: aligned, the problem's strides)
        return fresh_q(), refill(p.k_cache, gen), refill(p.v_cache, gen)

    same_cache = refill(p.k_cache, gen)
    runs = [
        ("first", *fresh(), False),
        ("same layout", *fresh(), True),
        ("q misaligned", _misaligned(fresh_q()), *fresh()[1:], False),
        ("strided caches", fresh_q(), _strided_cache(p.k_cache), _strided_cache(p.v_cache), False),
        ("one tensor for k and v", fresh_q(), same_cache, same_cache, False),
        ("k and v apart again", *fresh(), False),
        ("first layout again", *fresh(), True),
    ]
    for name, q, k_cache, v_cache, replayed in runs:
        before = len(replays)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_launch.Bound, "__call__", lambda self, tensors: (replays.append(1), original(self, tensors)))
            o, lse = plan.run(q, p.q_pos, k_cache, v_cache)
        check_outputs(o, lse, reference_cascade(p, q, p.q_pos, k_cache, v_cache), q, msg=f"{name}: {p!r}")
        if _launch.fast_launch_supported() and p.q.shape[0] > 0:
            assert (len(replays) > before) == replayed, f"{name}: replayed={not replayed}"
        else:
            assert len(replays) == before, "replayed launches that were not direct"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@fewer(10)
@given(cascade_problem(allow_gaps=True), st.integers(0, 2**32 - 1))
def test_plan_run_in_a_cuda_graph(p, seed):
    """Capture ``plan.run`` once; replays with new q, q_pos and cache contents give the new references.

    ``run`` allocates nothing (the plan owns its outputs and scratch), checked before the capture.
    """
    assume(p.q.shape[0] > 0)  # nothing to launch: an empty graph
    plan = plan_for(p)
    q, q_pos = p.q.clone(), p.q_pos.clone()
    k_cache, v_cache = p.k_cache.clone(), p.v_cache.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        plan.run(q, q_pos, k_cache, v_cache)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    plan.run(q, q_pos, k_cache, v_cache)
    assert torch.cuda.memory_allocated() == allocated, "plan.run allocated device memory"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = plan.run(q, q_pos, k_cache, v_cache)

    gen = torch.Generator().manual_seed(seed)
    for replay in range(2):
        q.copy_(torch.randn(q.shape, generator=gen).to(p.dtype))
        shift = torch.randint(-3, 4, q_pos.shape, generator=gen, dtype=torch.int32).to(DEVICE)
        q_pos.copy_((p.q_pos.long() + shift).clamp(0, 2**31 - 1).to(torch.int32))
        k_cache.copy_(refill(p.k_cache, gen))
        v_cache.copy_(refill(p.v_cache, gen))
        graph.replay()
        torch.cuda.synchronize()
        check_outputs(o, lse, reference_cascade(p, q, q_pos, k_cache, v_cache), q, msg=f"replay {replay} {p!r}")


# ---------------------------------------------------------------------------------------------------------
# Explicit cases


def i32(values):
    return torch.tensor(list(values), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("lengths", [(17, 37, 17), (37, 17, 5)])
def test_three_two_and_one_levels_agree(page_size, lengths):
    """Two requests share a prefix and a document, then have their own tokens (decode and prefill).

    Three levels (prefix, document, own), two (prefix + document as one chunk, own) and one (flat)
    must agree with each other and with the reference; sinks count once whatever the number of levels.
    """
    prefix, document, own = lengths
    num_q_heads, num_kv_heads, head_dim, dtype = 6, 2, 40, torch.float16
    gen = torch.Generator().manual_seed(page_size + prefix)

    def randn(n):
        return torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)

    shared = [randn(prefix + document) for _ in range(2)]  # keys, values at positions 0 ..
    mine = [[randn(own + r) for _ in range(2)] for r in range(2)]  # request r: own + r tokens after them
    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, dtype)
    h_prefix = builder.add(shared[0][:prefix], shared[1][:prefix])
    h_document = builder.add(shared[0][prefix:], shared[1][prefix:])
    h_shared = builder.add(*shared)
    h_own = [builder.add(*mine[r]) for r in range(2)]
    h_flat = [builder.add(torch.cat([shared[0], mine[r][0]]), torch.cat([shared[1], mine[r][1]])) for r in range(2)]
    k_cache, v_cache, pages = builder.build(gen, "nhd", spare_pages=1)

    n_shared = prefix + document
    # request 0 prefills its own tokens; request 1 decodes one token after its own
    q_pos = i32([*range(n_shared, n_shared + own), n_shared + own + 1])
    qo = [0, own, own + 1]
    q = torch.randn((own + 1, num_q_heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    every = i32([0, own + 1])
    own_level = ck.CascadeLevel(i32(qo), _paged_kv([pages[h] for h in h_own], [own, own + 1], [n_shared] * 2))
    three = [ck.CascadeLevel(every, _paged_kv([pages[h_prefix]], [prefix], [0])),
             ck.CascadeLevel(every, _paged_kv([pages[h_document]], [document], [prefix])),
             own_level]
    two = [ck.CascadeLevel(every, _paged_kv([pages[h_shared]], [n_shared], [0])), own_level]
    one = [ck.CascadeLevel(i32(qo), _paged_kv([pages[h] for h in h_flat], [n_shared + own, n_shared + own + 1],
                                              [0, 0]))]
    sinks = torch.linspace(-3.0, 6.0, num_q_heads, device=DEVICE)
    for options in (dict(), dict(window_left=20, sinks=sinks), dict(causal=False, softcap=3.0)):
        expected = reference.cascade_attention(q, q_pos, k_cache, v_cache, three, **options)
        results = [ck.cascade_attention(q, q_pos, k_cache, v_cache, levels, **options) for levels in (three, two, one)]
        for name, result in zip(("three", "two", "one"), results):
            check_outputs(*result, expected, q, msg=f"{name} levels, {options}")
        check_same(results[0], results[2], dtype, msg=f"three vs one level, {options}")


@pytest.mark.parametrize("empty_segment", [False, True])
def test_a_decode_level_of_one_token_per_segment_finds_tiles_by_division(empty_segment):
    """A decode level whose segments all hold one token gives each the same number of work tiles, found by
    division (``decode_tiles``); one segment without a token falls back to the search. Both are exact."""
    num_q_heads, num_kv_heads, head_dim, page_size = 8, 2, 32, 4
    gen = torch.Generator().manual_seed(11 + empty_segment)
    lens = [9, 1, 14, 0, 6]
    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, torch.float32)
    handles = [builder.add(*(torch.randn((n, num_kv_heads, head_dim), generator=gen) for _ in range(2))) for n in lens]
    k_cache, v_cache, pages = builder.build(gen, "nhd", spare_pages=1)
    kv = _paged_kv([pages[h] for h in handles], lens, [3] * len(lens))
    counts = [1, 1, 0, 1, 1] if empty_segment else [1] * len(lens)
    qo = [0]
    for c in counts:
        qo.append(qo[-1] + c)
    q = torch.randn((qo[-1], num_q_heads, head_dim), generator=gen).to(DEVICE)
    q_pos = i32([3 + n for n, c in zip(lens, counts) if c])
    levels = [ck.CascadeLevel(i32(qo), kv)]
    plan = ck.plan_cascade(levels, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           page_size=page_size, dtype=torch.float32)
    assert plan.launches[0].kind == "decode"
    assert plan.launches[0].decode_tiles == (0 if empty_segment else 1)
    o, lse = plan.run(q, q_pos, k_cache, v_cache)
    check_outputs(o, lse, reference.cascade_attention(q, q_pos, k_cache, v_cache, levels), q,
                  msg=f"empty_segment={empty_segment}")


@pytest.mark.parametrize("num_tokens", [0, 3])
def test_no_level_holds_a_visible_key(num_tokens):
    """Empty levels and keys all ahead of the queries: ``-inf`` and zeros; with sinks ``lse`` is the sink."""
    num_q_heads, head_dim = 4, 32
    k_cache = torch.randn(4, 16, 2, head_dim, device=DEVICE)
    v_cache = torch.randn(4, 16, 2, head_dim, device=DEVICE)
    q = torch.randn(num_tokens, num_q_heads, head_dim, device=DEVICE)
    q_pos = i32(range(num_tokens))
    levels = [
        ck.CascadeLevel(i32([0, num_tokens]), ck.PagedKV(i32([0, 0]), i32([]), i32([0]), i32([0]))),
        ck.CascadeLevel(i32([0, num_tokens]), ck.PagedKV(i32([0, 2]), i32([3, 1]), i32([20]), i32([100]))),
        ck.CascadeLevel(i32([0, 0, num_tokens]), ck.PagedKV(i32([0, 1, 1]), i32([2]), i32([16, 0]), i32([50, 0]))),
    ]
    o, lse = ck.cascade_attention(q, q_pos, k_cache, v_cache, levels)
    assert o.shape == (num_tokens, num_q_heads, head_dim) and lse.shape == (num_tokens, num_q_heads)
    assert bool(torch.isneginf(lse).all()) and bool((o == 0).all())
    sinks = torch.tensor([-1.0, 0.0, 2.5, 9.0], device=DEVICE)
    for levels_used in (levels, levels[:1]):  # several levels (merged) and one level (written directly)
        o, lse = ck.cascade_attention(q, q_pos, k_cache, v_cache, levels_used, sinks=sinks)
        assert bool((o == 0).all())
        assert_close(lse, sinks.expand(num_tokens, -1), torch.float32, "lse")
    o, lse = ck.cascade_attention(q, q_pos, k_cache, v_cache, levels, causal=False, sinks=sinks)
    check_outputs(o, lse, reference.cascade_attention(q, q_pos, k_cache, v_cache, levels, causal=False, sinks=sinks),
                  q)


@pytest.mark.skipif(not LARGE, reason="large problems run under the gpu hypothesis profile (CK_HYPOTHESIS_PROFILE=gpu)")
def test_long_shared_prefix_with_many_requests():
    """A 4000-token prefix shared by 32 decoding requests, each with its own 1..300 tokens."""
    gen = torch.Generator().manual_seed(7)
    num_q_heads, num_kv_heads, head_dim, page_size, dtype = 32, 8, 128, 16, torch.bfloat16
    prefix, requests = 4000, 32
    own = [1 + (37 * r) % 300 for r in range(requests)]
    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, dtype)

    def randn(n):
        return torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)

    h_prefix = builder.add(randn(prefix), randn(prefix))
    h_own = [builder.add(randn(n), randn(n)) for n in own]
    k_cache, v_cache, pages = builder.build(gen, "nhd", spare_pages=3)
    q = torch.randn((requests, num_q_heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    q_pos = i32([prefix + n for n in own])
    levels = [ck.CascadeLevel(i32([0, requests]), _paged_kv([pages[h_prefix]], [prefix], [0])),
              ck.CascadeLevel(i32(range(requests + 1)), _paged_kv([pages[h] for h in h_own], own, [prefix] * requests))]
    for options in (dict(), dict(window_left=1000), dict(sinks=torch.zeros(num_q_heads, device=DEVICE))):
        o, lse = ck.cascade_attention(q, q_pos, k_cache, v_cache, levels, **options)
        check_outputs(o, lse, reference.cascade_attention(q, q_pos, k_cache, v_cache, levels, **options), q,
                      msg=str(options))


@fewer(2)
@given(problem=cascade_problem(), fold=st.sampled_from([True, None, False]))
def test_folding_a_level_into_the_next_changes_nothing(problem, fold):
    """``plan_cascade(fold=...)`` joins a shared level into the next where the layout allows: the
    result equals the reference whether levels are folded (always, where it pays, or never)."""
    p = problem
    plan = ck.plan_cascade(p.levels, num_q_heads=p.num_q_heads, num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
                           page_size=p.page_size, dtype=p.dtype, fold=fold, **p.options)
    o, lse = plan.run(p.q, p.q_pos, p.k_cache, p.v_cache)
    ro, rlse = reference.cascade_attention(p.q, p.q_pos, p.k_cache, p.v_cache, p.levels, **p.options)
    check_outputs(o, lse, (ro, rlse), p.q)


def test_tiles_in_page_runs():
    """Page runs: every ``block_n``-key tile of every segment in consecutive page ids, counted per segment."""
    from cascade_kernels.cascade import tiles_in_page_runs

    def kv(*segments):
        return _paged_kv([list(s) for s in segments], [16 * len(s) for s in segments], [0] * len(segments))

    assert tiles_in_page_runs(kv([7, 8, 9, 10], [3, 4, 20]), page_size=16, block_n=32)  # tiles 7-8, 9-10, 3-4, 20
    assert tiles_in_page_runs(kv([7, 8, 9, 10, 11, 12, 13, 14]), page_size=16, block_n=128)
    assert not tiles_in_page_runs(kv([7, 8, 9, 11]), page_size=16, block_n=32)  # tile 9-11
    assert not tiles_in_page_runs(kv([5], [7, 9]), page_size=16, block_n=32)  # tiles are per segment
    assert tiles_in_page_runs(kv([5], [7, 8]), page_size=16, block_n=32)
    assert not tiles_in_page_runs(kv([7, 8]), page_size=16, block_n=16)  # a tile in one page already
    assert not tiles_in_page_runs(kv([7, 8]), page_size=24, block_n=32)  # pages do not divide tiles
    assert not tiles_in_page_runs(kv(), page_size=16, block_n=32)


@pytest.mark.parametrize("layout", ["nhd", "hnd", "nhd, no block copies"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_chunk_in_consecutive_pages(layout, dtype, monkeypatch):
    """A shared prefix in consecutive pages (an engine's one-piece allocation) is read as page runs where
    the cache holds its pages in rows (NHD; as block copies, or as contiguous rows where block copies are
    unavailable), gathered otherwise (an HND view); all equal the reference. Queries sit after the prefix
    and inside it (masked tiles of a run), the prefix ends inside a page and inside a tile (rows past its
    end hold NaN)."""
    import cascade_kernels.attention as attention
    from cascade_kernels.cascade import tiles_in_page_runs

    if layout.endswith("no block copies"):
        monkeypatch.setattr(attention, "tma_usable", lambda *args, **kwargs: False)
        layout = "nhd"

    gen = torch.Generator().manual_seed(11)
    num_q_heads, num_kv_heads, head_dim, page_size = 8, 2, 64, 16
    prefix, own = 300, [5, 40, 1]
    builder = _CacheBuilder(page_size, num_kv_heads, head_dim, dtype)

    def randn(n):
        return torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)

    h_prefix = builder.add(randn(prefix), randn(prefix))
    h_own = [builder.add(randn(n), randn(n)) for n in own]
    k_cache, v_cache, pages = builder.build(gen, layout, spare_pages=2, runs=(h_prefix,))
    assert pages[h_prefix] == list(range(pages[h_prefix][0], pages[h_prefix][0] + len(pages[h_prefix])))
    # request 0 decodes after its own tokens, request 1 prefills 6 tokens of which 3 sit inside the prefix
    # (positions 100-102), request 2 decodes
    q_pos = [prefix + own[0], 100, 101, 102, prefix + 30, prefix + 31, prefix + 39, prefix + own[2]]
    qo = [0, 1, 7, 8]
    q = torch.randn((len(q_pos), num_q_heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    levels = [ck.CascadeLevel(i32([0, len(q_pos)]), _paged_kv([pages[h_prefix]], [prefix], [0])),
              ck.CascadeLevel(i32(qo), _paged_kv([pages[h] for h in h_own], own, [prefix] * 3))]
    sinks = torch.linspace(-2.0, 3.0, num_q_heads, device=DEVICE)
    for options in (dict(), dict(window_left=150, sinks=sinks), dict(causal=False, softcap=5.0)):
        plan = ck.plan_cascade(levels, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                               page_size=page_size, dtype=dtype, num_pages=k_cache.shape[0], fold=False, **options)
        shared = plan.launches[0]
        assert shared.page_runs == (shared.config.block_n > page_size), plan
        assert shared.page_runs == tiles_in_page_runs(levels[0].kv, page_size, shared.config.block_n)
        o, lse = plan.run(q, i32(q_pos), k_cache, v_cache)
        expected = reference.cascade_attention(q, i32(q_pos), k_cache, v_cache, levels, **options)
        check_outputs(o, lse, expected, q, msg=f"{layout} {options} {plan}")
