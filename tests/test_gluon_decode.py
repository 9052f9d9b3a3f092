"""The Gluon decode kernel (``cascade_kernels/_decode_gluon.py``): four one-warp partitions a program on Hopper.

It runs compiled only, so the kernel tests run on a Hopper GPU and are skipped elsewhere; the CPU suite compiles
it for sm_90 (``test_sm90_compile.py``). Held, on layouts drawn by hypothesis (fp16/bf16, head dims 64 and 128,
GQA groups up to 8, pages of 16 to 128 slots in shuffled order with every unused slot NaN, empty segments,
segments shorter than a tile, positions with gaps, queries before / inside / after their keys, causal or not,
sinks, outputs poisoned before the launch):

* ``paged_decode`` equals the float64 reference, every launch taking the Gluon decode kernel, at the split count
  it picks and at forced ones (each split's four partitions merge in the program; splits through the merge);
* the same problems through the ``tl`` kernel (``CASCADE_KERNELS_GLUON=0``) agree within rounding;
* a cascade plan's decode level takes it, and the plan replays in a CUDA graph with new inputs;

and, on any device, which launches qualify (none while a decode config is pinned, as the tuning script does) and
how many splits it takes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from cascade_kernels import _gluon, attention
from cascade_kernels._triton import interpreting
from cascade_kernels.attention import TileConfig
from cascade_kernels.configs import pinned_config
from conftest import DEVICE
from strategies import decode_problem
from test_gluon import counting_launches as counting_gluon_launches
from test_prefill import check_outputs, check_same, dirty_device_memory, fewer

HOPPER = DEVICE == "cuda" and not interpreting() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not (HOPPER and _gluon.decode_launcher() is not None),
                                  reason="the Gluon decode kernel runs compiled on a Hopper GPU only")


def problems():
    return decode_problem(max_segments=6, dtypes=(torch.float16, torch.bfloat16), head_dims=(64, 128),
                          layouts=("nhd",), page_size_choices=(16, 32, 64, 128), max_kv=900)


def _options(p) -> dict:
    """The drawn options the Gluon decode kernel takes: causal, sm_scale and sinks (no window or soft cap)."""
    return {k: v for k, v in p.options.items() if k in ("causal", "sm_scale", "sinks")}


def counting_launches():
    """``_gluon.decode_launcher()`` replaced by a counting wrapper for the block."""
    return counting_gluon_launches("decode_launcher")


@needs_hopper
@fewer(2)
@given(problems(), st.sampled_from([None, 1, 3, 40]))
def test_gluon_decode_matches_reference(p, num_splits):
    assume(p.num_q_heads // p.num_kv_heads <= 8)
    options = _options(p)
    expected = reference.paged_decode(*p.decode_args, **options)
    dirty_device_memory()
    with counting_launches() as counted:
        out = ck.paged_decode(*p.decode_args, **options, num_splits=num_splits)
        assert counted.calls == 1, "the launch did not take the Gluon decode kernel"
    check_outputs(*out, expected, p.q, msg=f"num_splits={num_splits} {p!r}")


@needs_hopper
@fewer(4)
@given(problems())
def test_gluon_and_tl_decode_agree(p):
    assume(p.num_q_heads // p.num_kv_heads <= 8)
    options = _options(p)
    with counting_launches() as counted:
        gluon_out = ck.paged_decode(*p.decode_args, **options)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CASCADE_KERNELS_GLUON", "0")
            tl_out = ck.paged_decode(*p.decode_args, **options)
        assert counted.calls == 1, "CASCADE_KERNELS_GLUON=0 must keep launches off the Gluon kernel"
    check_same(gluon_out, tl_out, p.dtype, msg=repr(p))


def _requests(batch=24, kv_heads=2, group=4, dim=128, page=16):
    """``batch`` requests of 1 to 2000 own tokens each, pages shuffled; one decode token each."""
    torch.manual_seed(1)
    lens = torch.randint(1, 2000, (batch,)).tolist()
    counts = [-(-n // page) for n in lens]
    num_pages = sum(counts) + 5
    k_cache = torch.randn(num_pages, page, kv_heads, dim, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    perm = torch.randperm(num_pages, device=DEVICE).to(torch.int32)
    indptr = torch.tensor([0] + counts, **i32).cumsum(0).to(torch.int32)
    kv = ck.PagedKV(indptr=indptr, indices=perm[:sum(counts)].contiguous(), lens=torch.tensor(lens, **i32),
                    start_pos=torch.zeros(batch, **i32))
    q = torch.randn(batch, kv_heads * group, dim, dtype=torch.bfloat16, device=DEVICE)
    q_pos = torch.tensor([n - 1 for n in lens], **i32)
    return kv, q, q_pos, k_cache, v_cache


@needs_hopper
def test_a_decode_plan_takes_it_and_replays_in_a_cuda_graph():
    kv, q, q_pos, k_cache, v_cache = _requests()
    sinks = torch.randn(q.shape[1], dtype=torch.float32, device=DEVICE)
    levels = [ck.CascadeLevel(torch.arange(q.shape[0] + 1, dtype=torch.int32, device=DEVICE), kv)]
    plan = ck.plan_cascade(levels, num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2], head_dim=q.shape[2],
                           page_size=k_cache.shape[1], dtype=q.dtype, sinks=sinks)
    with counting_launches() as counted:
        plan.run(q, q_pos, k_cache, v_cache)
        assert counted.calls == 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        plan.run(q, q_pos, k_cache, v_cache)  # the layout's launches recorded, then replayed in the capture
        with torch.cuda.graph(graph, stream=stream):
            o, lse = plan.run(q, q_pos, k_cache, v_cache)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):  # new contents in the same tensors, then a replay
        q.copy_(torch.randn_like(q))
        k_cache.copy_(torch.randn_like(k_cache))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.paged_decode(q.cpu(), q_pos.cpu(), k_cache.cpu(), v_cache.cpu(), _cpu(kv),
                                          sinks=sinks.cpu())
        check_outputs(o, lse, expected, q)


def _cpu(kv: ck.PagedKV) -> ck.PagedKV:
    return ck.PagedKV(indptr=kv.indptr.cpu(), indices=kv.indices.cpu(), lens=kv.lens.cpu(),
                      start_pos=kv.start_pos.cpu())


def test_which_decode_launches_take_the_gluon_kernel(monkeypatch):
    """The routing rules of ``_gluon.decode_takes`` and ``decode_caches_ok``, on any device: a Hopper GPU with a
    Gluon launcher stood in."""
    monkeypatch.setattr(_gluon, "interpreting", lambda: False)
    monkeypatch.setattr(_gluon, "_is_hopper", lambda device: True)
    monkeypatch.setattr(_gluon, "decode_launcher", lambda: object())
    monkeypatch.delenv("CASCADE_KERNELS_GLUON", raising=False)
    device = torch.device(DEVICE)

    def takes(dtype=torch.bfloat16, dim=128, group=4, page=16, window=None, softcap=None, programs=256):
        return _gluon.decode_takes(dtype, dim, group, page, window, softcap, device, programs, 132)

    assert takes() and takes(dim=64, dtype=torch.float16) and takes(group=8) and takes(group=1)
    assert takes(page=32) and takes(page=256) and takes(programs=264) and takes(programs=1)
    for kwargs in (dict(programs=265), dict(programs=1024), dict(dtype=torch.float32), dict(dim=96), dict(dim=256), dict(group=16), dict(page=8),
                   dict(page=24), dict(window=0), dict(softcap=30.0)):
        assert not takes(**kwargs), kwargs
    nhd = torch.empty(8, 16, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    hnd = torch.empty(8, 2, 16, 128, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    assert _gluon.decode_caches_ok(nhd, nhd)
    assert not _gluon.decode_caches_ok(nhd, hnd) and not _gluon.decode_caches_ok(hnd, nhd)
    monkeypatch.setenv("CASCADE_KERNELS_GLUON", "0")
    assert not takes()
    monkeypatch.delenv("CASCADE_KERNELS_GLUON")
    monkeypatch.setattr(_gluon, "_is_hopper", lambda device: False)
    assert not takes()


def test_a_pinned_decode_config_keeps_the_tl_kernel(monkeypatch):
    """The tuning script times decode tiles under ``pinned_config``: those launches, and plans made then, must take
    the ``tl`` kernel with that tile (a Hopper GPU with a Gluon launcher stood in, as above)."""
    monkeypatch.setattr(_gluon, "interpreting", lambda: False)
    monkeypatch.setattr(_gluon, "_is_hopper", lambda device: True)
    monkeypatch.setattr(_gluon, "decode_launcher", lambda: object())
    monkeypatch.delenv("CASCADE_KERNELS_GLUON", raising=False)
    geometry = attention.Geometry(8, 2, 128, 16, 8)
    options = attention.Options(True, 128 ** -0.5, None, None, None)
    cache = torch.empty(8, 16, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    q = torch.empty(2, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    assert attention.gluon_decode(q, cache, cache, geometry, options, 2)
    with pinned_config("decode", TileConfig(16, 16, 1, 6)):
        assert not attention.gluon_decode(q, cache, cache, geometry, options, 2)
    assert attention.gluon_decode(q, cache, cache, geometry, options, 2)


def test_gluon_decode_splits():
    """One round of two programs an SM: a split each where the batch's (request, KV head) pairs fill it, else the
    most splits that fit, each of 256 keys at least."""
    sms = 132
    assert _gluon.decode_splits(32 * 8, 4096, sms) == 1  # 256 programs of 264
    assert _gluon.decode_splits(128 * 8, 8192, sms) == 1
    assert _gluon.decode_splits(16 * 8, 4096, sms) == 2
    assert _gluon.decode_splits(1 * 8, 131072, sms) == 33
    assert _gluon.decode_splits(1 * 8, 300, sms) == 2  # 256 keys a split at least
    assert _gluon.decode_splits(1, 10**7, sms) == 256
    assert _gluon.decode_splits(0, 4096, sms) == _gluon.decode_splits(8, 0, sms) == 1
