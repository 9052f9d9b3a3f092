"""The Gluon prefill kernel (``cascade_kernels/_attention_gluon.py``): block copies of paged KV on Hopper.

It runs compiled only (Gluon has no interpreter), so these tests run on a Hopper GPU and are skipped
elsewhere; the CPU suite compiles it for sm_90 instead (``test_sm90_compile.py``). Held, on layouts drawn
by hypothesis (fp16/bf16, head dims 64 and 128, pages of 8 to 64 slots (a copy a page) and of 128 and 256
(a copy a tile) in shuffled order with every unused slot NaN, ragged segments with empty ones, positions with gaps, queries before / inside / after their keys,
causal or not, forced split counts, outputs poisoned before the launch):

* ``paged_prefill`` equals the float64 reference with every launch taking the Gluon kernel;
* the same problems through the ``tl`` kernel (``CASCADE_KERNELS_GLUON=0``) agree within rounding;
* a cascade whose shared level runs on it equals the reference, its pages shuffled (a copy a page) or in
  order (page runs: a copy a tile);

and, on any device, which launches qualify (a Hopper GPU stood in), and that a plan's page runs reach the
kernel only where they are runs of its 128-key tiles.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from cascade_kernels import _gluon
from cascade_kernels._triton import interpreting
from cascade_kernels.attention import TileConfig
from cascade_kernels.configs import pinned_config
from conftest import DEVICE
from strategies import paged_problem
from test_prefill import check_outputs, check_same, dirty_device_memory, fewer

HOPPER = DEVICE == "cuda" and not interpreting() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not (HOPPER and _gluon.launcher() is not None),
                                  reason="the Gluon kernel runs compiled on a Hopper GPU only")
PAGES = (8, 16, 32, 64, 128, 256)
PREFILL_TILE = TileConfig(128, 128, 8, 2)  # the prefill tile the Gluon kernel takes


def gluon_problems():
    return paged_problem(dtypes=(torch.float16, torch.bfloat16), head_dims=(64, 128), layouts=("nhd",),
                         page_size_choices=PAGES, max_q=300, max_kv=700)


class _Counting:
    """Wraps the Gluon launcher, counting launches."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@contextlib.contextmanager
def counting_launches(name: str = "launcher"):
    """``_gluon.<name>()`` (the prefill kernel's launcher, or ``decode_launcher``) replaced by a counting wrapper
    for the block (not a pytest fixture: hypothesis runs every example of a test inside one call)."""
    counting = _Counting(getattr(_gluon, name)())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_gluon, name, lambda: counting)
        yield counting


def _options(p) -> dict:
    """The drawn options the Gluon kernel takes in a one-split launch: causal and sm_scale."""
    return {k: v for k, v in p.options.items() if k in ("causal", "sm_scale")}


@needs_hopper
@fewer(2)
@given(gluon_problems(), st.sampled_from([None, 1, 3]))
def test_gluon_prefill_matches_reference(p, num_splits):
    options = _options(p)
    expected = reference.paged_prefill(*p.args, **options)
    dirty_device_memory()
    with pinned_config("prefill", PREFILL_TILE), counting_launches() as counted:
        before = counted.calls
        out = ck.paged_prefill(*p.args, **options, num_splits=num_splits)
        # an empty batch launches nothing
        assert counted.calls == before + (p.q.shape[0] > 0), "the launch did not take the Gluon kernel"
    check_outputs(*out, expected, p.q, msg=f"num_splits={num_splits} {p!r}")


@needs_hopper
@fewer(4)
@given(gluon_problems())
def test_gluon_and_tl_kernels_agree(p):
    options = _options(p)
    with pinned_config("prefill", PREFILL_TILE), counting_launches() as counted:
        gluon_out = ck.paged_prefill(*p.args, **options, num_splits=2)
        calls = counted.calls
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CASCADE_KERNELS_GLUON", "0")
            tl_out = ck.paged_prefill(*p.args, **options, num_splits=2)
        assert counted.calls == calls, "CASCADE_KERNELS_GLUON=0 must keep launches off the Gluon kernel"
    check_same(gluon_out, tl_out, p.dtype, msg=repr(p))


def _shared_prompt(in_order: bool, prompt: int = 1000, batch: int = 12, dim: int = 128, page: int = 16):
    """A system prompt of ``prompt`` tokens shared by ``batch`` requests (one decode token each, own KV of
    37, 60, ... tokens), pages of ``page`` in random order, or the prompt's in order (pages 3, 4, ...: its
    128-key tiles are page runs). Returns (levels, q, q_pos, k_cache, v_cache, num_kv_heads)."""
    torch.manual_seed(0)
    heads, kv_heads = 8, 2
    own = [37 + 23 * i for i in range(batch)]
    shared_pages = -(-prompt // page)
    counts = [-(-n // page) for n in own]
    num_pages = shared_pages + sum(counts) + 3
    k_cache = torch.randn(num_pages, page, kv_heads, dim, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    perm = torch.randperm(num_pages, device=DEVICE).to(torch.int32)
    if in_order:
        first = torch.arange(3, 3 + shared_pages, **i32)
        perm = torch.cat([first, perm[~torch.isin(perm, first)]])
    shared = ck.PagedKV(indptr=torch.tensor([0, shared_pages], **i32), indices=perm[:shared_pages].contiguous(),
                        lens=torch.tensor([prompt], **i32), start_pos=torch.tensor([0], **i32))
    bounds = torch.tensor([0] + counts, **i32).cumsum(0).to(torch.int32)
    mine = ck.PagedKV(indptr=bounds, indices=perm[shared_pages:shared_pages + sum(counts)].contiguous(),
                      lens=torch.tensor(own, **i32), start_pos=torch.full((batch,), prompt, **i32))
    levels = [ck.CascadeLevel(torch.tensor([0, batch], **i32), shared),
              ck.CascadeLevel(torch.arange(batch + 1, **i32), mine)]
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=DEVICE)
    q_pos = torch.tensor([prompt + n - 1 for n in own], **i32)
    return levels, q, q_pos, k_cache, v_cache, kv_heads


@needs_hopper
@pytest.mark.parametrize("in_order", [False, True], ids=["shuffled", "page-runs"])
def test_cascade_shared_level_on_gluon(in_order):
    """The shared level of ``_shared_prompt`` (pages of 16) is a prefill tile launch over gathered pages,
    or over 128-row runs of them where the prompt's pages lie in order."""
    levels, q, q_pos, k_cache, v_cache, kv_heads = _shared_prompt(in_order)
    with pinned_config("prefill", PREFILL_TILE), counting_launches() as counted:
        plan = ck.plan_cascade(levels, num_q_heads=q.shape[1], num_kv_heads=kv_heads, head_dim=q.shape[2],
                               page_size=k_cache.shape[1], dtype=q.dtype, fold=False)
        o, lse = plan.run(q, q_pos, k_cache, v_cache)
    assert counted.calls >= 1, "the shared level did not take the Gluon kernel"
    assert [launch.page_runs for launch in plan.launches if launch.kind == "prefill"] == [in_order]
    expected = reference.cascade_attention(q.cpu(), q_pos.cpu(), k_cache.cpu(), v_cache.cpu(),
                                           [ck.CascadeLevel(lv.qo_indptr.cpu(), _cpu(lv.kv)) for lv in levels])
    check_outputs(o, lse, expected, q)


@pytest.mark.parametrize("block_n", [64, 128])
def test_page_runs_reach_the_gluon_kernel_as_its_own_tiles(block_n, monkeypatch):
    """The Gluon kernel reads 128-key tiles; a plan finds page runs for its config's ``block_n``. Runs of
    64-key tiles need not make runs of 128 keys, so such a launch must ask for page-sized copies."""
    levels, q, q_pos, k_cache, v_cache, kv_heads = _shared_prompt(True, prompt=300, batch=3, dim=64)
    seen = []
    real = _gluon.page_rows

    def spy(*args):
        seen.append(args[-1])  # page_runs
        return real(*args)

    monkeypatch.setattr(_gluon, "page_rows", spy)
    tile = TileConfig(128, block_n, 8, 2)
    with pinned_config("prefill", tile):
        plan = ck.plan_cascade(levels, num_q_heads=q.shape[1], num_kv_heads=kv_heads, head_dim=q.shape[2],
                               page_size=k_cache.shape[1], dtype=q.dtype, fold=False)
        plan.run(q, q_pos, k_cache, v_cache)
    assert [launch.page_runs for launch in plan.launches if launch.kind == "prefill"] == [True]
    assert seen[0] is (block_n == 128), seen


def _cpu(kv: ck.PagedKV) -> ck.PagedKV:
    return ck.PagedKV(indptr=kv.indptr.cpu(), indices=kv.indices.cpu(), lens=kv.lens.cpu(),
                      start_pos=kv.start_pos.cpu())


def test_which_launches_take_the_gluon_kernel(monkeypatch):
    """The routing rules of ``_gluon.page_rows``, on any device: a Hopper GPU with a Gluon launcher stood in."""
    monkeypatch.setattr(_gluon, "interpreting", lambda: False)
    monkeypatch.setattr(_gluon, "_is_hopper", lambda device: True)
    monkeypatch.setattr(_gluon, "launcher", lambda: object())
    monkeypatch.delenv("CASCADE_KERNELS_GLUON", raising=False)

    def rows(page=16, dim=128, dtype=torch.bfloat16, block_m=128, window=None, softcap=None, sinks=False,
             runs=False, layout="nhd"):
        k = torch.empty(64, page, 2, dim, dtype=dtype, device=DEVICE)
        if layout == "hnd":
            k = torch.empty(64, 2, page, dim, dtype=dtype, device=DEVICE).transpose(1, 2)
        q = torch.empty(4, 8, dim, dtype=dtype, device=DEVICE)
        return _gluon.page_rows(q, k, k, dim, block_m, window, softcap, sinks, runs)

    assert rows() == 16
    assert rows(page=8) == 8
    assert rows(page=64) == 64
    assert rows(dim=64, dtype=torch.float16) == 16
    for kwargs in (dict(page=128), dict(page=256), dict(page=1024), dict(runs=True), dict(page=8, runs=True),
                   dict(page=24, runs=True)):
        assert rows(**kwargs) == 128, kwargs  # a copy a tile
    for kwargs in (dict(page=24), dict(page=4), dict(page=192), dict(dim=96), dict(dim=256),
                   dict(dtype=torch.float32), dict(block_m=64), dict(window=8), dict(softcap=30.0),
                   dict(sinks=True), dict(layout="hnd"), dict(layout="hnd", page=256)):
        assert rows(**kwargs) == 0, kwargs
    monkeypatch.setenv("CASCADE_KERNELS_GLUON", "0")
    assert rows() == 0 and rows(page=256) == 0
    monkeypatch.setattr(_gluon, "_is_hopper", lambda device: False)
    monkeypatch.delenv("CASCADE_KERNELS_GLUON")
    assert rows() == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_this_gpu_takes_the_gluon_kernel_where_it_can():
    k = torch.empty(64, 16, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    q = torch.empty(4, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    expected = 16 if HOPPER and _gluon.launcher() is not None else 0
    assert _gluon.page_rows(q, k, k, 128, 128, None, None, False, False) == expected
