"""A cascade's shared level and its decode level as one launch (``cascade_kernels/_fused.py``, ``_cascade_gluon.py``).

The kernel runs compiled on a Hopper GPU only (Gluon has no interpreter); the CPU suite compiles it for sm_90
(``test_sm90_compile.py``). Held on a Hopper GPU, over cascades drawn by hypothesis (a shared prompt of 1 to
3000 tokens read by 2 to 40 requests, each with 0 to 300 tokens of its own in shuffled pages of 16 whose unused
slots are NaN, queries at the end of their keys or earlier (their last keys hidden), GQA groups of 1 to 8, fp16
and bf16, head dims 64 and 128, causal or not, sinks or not, the prompt's pages shuffled or in order (its tiles
page runs), scratch and outputs NaN before the run):

* the plan fuses the two levels (a small launch is allowed to, for the test) and ``run`` takes the fused launch;
* its result equals the float64 reference;

and, on any device (a Hopper GPU stood in), which plans fuse (a prefill launch filling the GPU, a decode
level of a sizeable share of the work): the decode level then takes one split and the slots follow one another;
page runs the plan found reach the kernel as block copies only where they are runs of its own 64-key tiles; a plan whose caches do not allow the launch runs its levels one by one.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from cascade_kernels import _fused, _gluon
from cascade_kernels._triton import interpreting
from cascade_kernels.attention import TileConfig
from cascade_kernels.configs import pinned_config
from conftest import DEVICE
from test_gluon import _Counting
from test_prefill import check_outputs, dirty_device_memory, fewer

HOPPER = DEVICE == "cuda" and not interpreting() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not (HOPPER and _fused.launcher() is not None),
                                  reason="the fused kernel runs compiled on a Hopper GPU only")
PREFILL_TILE = TileConfig(128, 128, 8, 2)  # the prefill tile the Gluon kernels take
PAGE = _fused.PAGE_SIZE


def _cascade(prompt, own, hidden, group, kv_heads, dim, dtype, in_order, seed):
    """A prompt of ``prompt`` tokens shared by ``len(own)`` requests (one decode token each, at position
    ``prompt + own[i] - 1 - hidden[i]``: its last ``hidden[i]`` keys after it), over a cache of pages of 16 in
    shuffled order whose unused slots are NaN; the prompt's pages in order where ``in_order``.
    Returns (levels, q, q_pos, k_cache, v_cache)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(own)
    shared_pages = -(-prompt // PAGE)
    counts = [-(-n // PAGE) for n in own]
    num_pages = shared_pages + sum(counts) + 2
    k_cache = torch.full((num_pages, PAGE, kv_heads, dim), math.nan, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    if in_order:
        first = torch.arange(1, 1 + shared_pages, dtype=torch.int32)
        perm = torch.cat([first, perm[~torch.isin(perm, first)]])

    def fill(pages, n):
        for i, p in enumerate(pages.tolist()):
            rows = min(PAGE, n - i * PAGE)
            k_cache[p, :rows] = torch.randn(rows, kv_heads, dim, generator=gen).to(dtype)
            v_cache[p, :rows] = torch.randn(rows, kv_heads, dim, generator=gen).to(dtype)

    i32 = dict(dtype=torch.int32)
    shared_idx = perm[:shared_pages].contiguous()
    fill(shared_idx, prompt)
    bounds = torch.tensor([0] + counts, **i32).cumsum(0).to(torch.int32)
    own_idx = perm[shared_pages:shared_pages + sum(counts)].contiguous()
    for i, n in enumerate(own):
        fill(own_idx[bounds[i]:bounds[i + 1]], n)
    shared = ck.PagedKV(indptr=torch.tensor([0, shared_pages], **i32), indices=shared_idx,
                        lens=torch.tensor([prompt], **i32), start_pos=torch.tensor([0], **i32))
    mine = ck.PagedKV(indptr=bounds, indices=own_idx, lens=torch.tensor(own, **i32),
                      start_pos=torch.full((batch,), prompt, **i32))
    levels = [ck.CascadeLevel(torch.tensor([0, batch], **i32), shared),
              ck.CascadeLevel(torch.arange(batch + 1, **i32), mine)]
    q = torch.randn(batch, kv_heads * group, dim, generator=gen).to(dtype)
    q_pos = torch.tensor([max(prompt + n - 1 - h, 0) for n, h in zip(own, hidden)], **i32)
    return levels, q, q_pos, k_cache, v_cache


def _to(levels, device):
    return [ck.CascadeLevel(lv.qo_indptr.to(device),
                            ck.PagedKV(indptr=lv.kv.indptr.to(device), indices=lv.kv.indices.to(device),
                                       lens=lv.kv.lens.to(device), start_pos=lv.kv.start_pos.to(device)))
            for lv in levels]


@st.composite
def cascades(draw):
    batch = draw(st.integers(2, 40))  # one query token would make the shared level a decode level
    own = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    hidden = [draw(st.integers(0, max(n - 1, 0))) if draw(st.booleans()) else 0 for n in own]
    return dict(prompt=draw(st.integers(1, 3000)), own=own, hidden=hidden, in_order=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


# the constexprs that make a new compiled variant, a few at a time (each compiles for ~15 s)
VARIANTS = [
    dict(group=4, kv_heads=2, dim=128, dtype=torch.bfloat16, causal=True, sinks=False),
    dict(group=8, kv_heads=1, dim=64, dtype=torch.float16, causal=True, sinks=True),
    dict(group=1, kv_heads=3, dim=128, dtype=torch.float16, causal=False, sinks=False),
]


@needs_hopper
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"g{v['group']}-d{v['dim']}-{str(v['dtype'])[6:]}"
                         f"{'-causal' if v['causal'] else ''}{'-sinks' if v['sinks'] else ''}")
@fewer(3)
@given(cascades())
def test_fused_cascade_matches_reference(variant, case):
    levels, q, q_pos, k_cache, v_cache = _cascade(group=variant["group"], kv_heads=variant["kv_heads"],
                                                  dim=variant["dim"], dtype=variant["dtype"], **case)
    heads = q.shape[1]
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(case["seed"])) if variant["sinks"] else None
    options = dict(causal=variant["causal"], sinks=sinks)
    expected = reference.cascade_attention(q, q_pos, k_cache, v_cache, levels, **options)
    dev = [t.to(DEVICE) for t in (q, q_pos, k_cache, v_cache)]
    counting = _Counting(_fused.launcher())
    with pytest.MonkeyPatch.context() as mp, pinned_config("prefill", PREFILL_TILE):
        mp.setattr(_fused, "MIN_FILL", 0.0)  # small launches fuse too, here, whatever their sizes
        mp.setattr(_fused, "MIN_DECODE_SHARE", 0.0)
        mp.setattr(_fused, "launcher", lambda: counting)
        plan = ck.plan_cascade(_to(levels, DEVICE), num_q_heads=heads, num_kv_heads=variant["kv_heads"],
                               head_dim=variant["dim"], page_size=PAGE, dtype=q.dtype, fold=False,
                               causal=variant["causal"], sinks=None if sinks is None else sinks.to(DEVICE))
        assert plan.fused == (0, 1), plan
        for t in (plan.o, plan.lse, plan.o_part, plan.lse_part):
            t.fill_(math.nan)
        dirty_device_memory()
        o, lse = plan.run(*dev)
    assert counting.calls == 1, "the run did not take the fused launch"
    check_outputs(o, lse, expected, dev[0], msg=f"{variant} {case} {plan}")


def _stand_in_hopper(mp):
    mp.setattr(_fused, "interpreting", lambda: False)
    mp.setattr(_gluon, "_is_hopper", lambda device: True)
    mp.setattr(_fused, "launcher", lambda: object())
    mp.delenv("CASCADE_KERNELS_GLUON", raising=False)


def test_which_plans_fuse(monkeypatch):
    """``_fused.pick`` on any device, a Hopper GPU stood in: a prefill level on the Gluon tile and a decode level;
    the decode level then takes one split and the slots stay in order; every other plan is left alone."""
    _stand_in_hopper(monkeypatch)
    levels, q, *_ = _cascade(prompt=600, own=[20, 33, 0, 90], hidden=[0] * 4, group=4, kv_heads=2, dim=64,
                             dtype=torch.bfloat16, in_order=False, seed=1)
    levels = _to(levels, DEVICE)

    def plan(min_fill=0.0, **kwargs):
        monkeypatch.setattr(_fused, "MIN_FILL", min_fill)
        args = dict(num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=PAGE, dtype=torch.bfloat16, fold=False)
        with pinned_config("prefill", kwargs.pop("tile", PREFILL_TILE)):
            return ck.plan_cascade(kwargs.pop("levels", levels), **{**args, **kwargs})

    fused = plan()
    assert fused.fused == (0, 1)
    shared, decode = fused.launches
    assert decode.num_splits == 1 and shared.slot_offset == 0 and decode.slot_offset == shared.num_splits
    assert fused.num_slots == shared.num_splits + 1 and fused.o_part.shape[1] == fused.num_slots
    assert plan(min_fill=1e9).fused is None  # a prefill launch that would not fill the GPU
    short = _to(_cascade(prompt=600, own=[1, 2, 1, 3], hidden=[0] * 4, group=4, kv_heads=2, dim=64,
                         dtype=torch.bfloat16, in_order=False, seed=1)[0], DEVICE)
    assert plan(levels=short).fused == (0, 1)  # a small decode level beside a shared level of one tile a KV head
    monkeypatch.setattr(_fused, "MAX_LIGHT_TILES", 0)
    assert plan(levels=short).fused is None  # ... too small to repay the slower shared part of more tiles
    assert plan().fused == (0, 1)
    for kwargs in (dict(window_left=64), dict(softcap=20.0), dict(dtype=torch.float32), dict(tile=TileConfig(64, 64, 4, 2)),
                   dict(levels=levels[:1]), dict(levels=levels[1:]), dict(num_q_heads=32)):
        assert plan(**kwargs).fused is None, kwargs
    monkeypatch.setattr(_gluon, "_is_hopper", lambda device: False)
    assert plan().fused is None
    monkeypatch.setattr(_gluon, "_is_hopper", lambda device: True)
    monkeypatch.setenv("CASCADE_KERNELS_GLUON", "0")
    assert plan().fused is None


def test_a_fused_plan_whose_caches_do_not_qualify_runs_level_by_level(monkeypatch):
    """At run time the caches decide (``_fused.page_rows``: under the interpreter, or for caches the block copies
    cannot read, 0): the plan then launches each level with the fused plan's slots (one decode split) and still
    equals the reference."""
    _stand_in_hopper(monkeypatch)
    monkeypatch.setattr(_fused, "MIN_FILL", 0.0)
    monkeypatch.setattr(_fused, "page_rows", lambda *args: 0)
    levels, q, q_pos, k_cache, v_cache = _cascade(prompt=150, own=[20, 0, 45], hidden=[3, 0, 0], group=2, kv_heads=2,
                                                  dim=64, dtype=torch.float16, in_order=True, seed=2)
    with pinned_config("prefill", PREFILL_TILE):
        plan = ck.plan_cascade(_to(levels, DEVICE), num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=PAGE,
                               dtype=torch.float16, fold=False)
        assert plan.fused == (0, 1) and plan.launches[1].num_splits == 1
        o, lse = plan.run(*(t.to(DEVICE) for t in (q, q_pos, k_cache, v_cache)))
    check_outputs(o, lse, reference.cascade_attention(q, q_pos, k_cache, v_cache, levels), q.to(DEVICE))


@pytest.mark.parametrize("block_n", [32, 128])
def test_page_runs_reach_the_fused_kernel_as_its_own_tiles(block_n, monkeypatch):
    """The fused kernel reads 64-key shared-level tiles; a plan finds page runs for its config's ``block_n``.
    Runs of 32-key tiles need not make runs of 64 keys, so such a launch must ask for page-sized copies."""
    _stand_in_hopper(monkeypatch)
    monkeypatch.setattr(_fused, "MIN_FILL", 0.0)
    levels, q, q_pos, k_cache, v_cache = _cascade(prompt=300, own=[20, 45, 33], hidden=[0] * 3, group=2, kv_heads=2,
                                                  dim=64, dtype=torch.float16, in_order=True, seed=3)
    seen = []

    def spy(*args):
        seen.append(args[-1])  # page_runs
        return 0  # then every level runs alone: only the question is checked here

    monkeypatch.setattr(_gluon, "page_rows", spy)
    with pinned_config("prefill", TileConfig(128, block_n, 8, 2)):
        plan = ck.plan_cascade(_to(levels, DEVICE), num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=PAGE,
                               dtype=torch.float16, fold=False)
        assert plan.fused == (0, 1) and plan.launches[0].page_runs
        plan.run(*(t.to(DEVICE) for t in (q, q_pos, k_cache, v_cache)))
    assert seen[0] is (block_n == 128), seen


@needs_hopper
def test_a_fused_plan_replays_in_a_cuda_graph(monkeypatch):
    """``run`` of a fused plan captured once; replays with new q, q_pos and cache contents give the new references."""
    monkeypatch.setattr(_fused, "MIN_FILL", 0.0)
    monkeypatch.setattr(_fused, "MIN_DECODE_SHARE", 0.0)
    levels, q, q_pos, k_cache, v_cache = _cascade(prompt=700, own=[40, 0, 130, 17, 64], hidden=[0, 0, 9, 0, 0],
                                                  group=4, kv_heads=2, dim=128, dtype=torch.bfloat16, in_order=False,
                                                  seed=5)
    with pinned_config("prefill", PREFILL_TILE):
        plan = ck.plan_cascade(_to(levels, DEVICE), num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=PAGE,
                               dtype=torch.bfloat16, fold=False)
    assert plan.fused == (0, 1), plan
    dev = [t.to(DEVICE) for t in (q, q_pos, k_cache, v_cache)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and record outside the capture
        plan.run(*dev)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = plan.run(*dev)
    gen = torch.Generator().manual_seed(6)
    for replay in range(2):
        q_new = torch.randn(q.shape, generator=gen).to(q.dtype)
        q_pos_new = (q_pos - torch.randint(0, 3, q_pos.shape, generator=gen, dtype=torch.int32)).clamp(min=0)
        k_new = torch.where(k_cache.isnan(), k_cache, torch.randn(k_cache.shape, generator=gen).to(k_cache.dtype))
        v_new = torch.where(v_cache.isnan(), v_cache, torch.randn(v_cache.shape, generator=gen).to(v_cache.dtype))
        for t, new in zip(dev, (q_new, q_pos_new, k_new, v_new)):
            t.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.cascade_attention(q_new, q_pos_new, k_new, v_new, levels)
        check_outputs(o, lse, expected, dev[0], msg=f"replay {replay}")
