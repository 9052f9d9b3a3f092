"""ck.paged_decode: one query token per KV segment, split-KV, against the reference and against prefill.

What is held, on layouts drawn by hypothesis (``strategies.decode_problem``):

* decode equals ``reference.paged_decode`` for every option, for any strides of ``q``;
* decode equals ``ck.paged_prefill`` with one query token per segment (``qo_indptr = arange``);
* the KV split count (1, 2, 5, 64) changes nothing beyond rounding, even where most splits are empty;

and, as explicit cases, empty segments (``-inf`` and zeros, or the sink) and a long segment under a
sliding window, whose keys outside the window must be skipped without changing the result.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from cascade_kernels._validation import validation
from conftest import DEVICE, LARGE, assert_close
from strategies import decode_problem
from test_prefill import build, check_outputs, check_same, dirty_device_memory, fewer, restride


@given(decode_problem(), st.sampled_from(["contiguous", "permuted", "strided"]))
def test_decode_matches_reference(p, q_layout):
    q = restride(p.q, q_layout)
    dirty_device_memory()
    o, lse = ck.paged_decode(q, p.q_pos, p.k_cache, p.v_cache, p.kv, **p.options)
    check_outputs(o, lse, reference.paged_decode(*p.decode_args, **p.options), p.q, msg=repr(p))


@fewer(2)
@given(decode_problem())
def test_decode_equals_prefill_with_one_token(p):
    qo_indptr = torch.arange(p.q.shape[0] + 1, dtype=torch.int32, device=DEVICE)
    decode = ck.paged_decode(*p.decode_args, **p.options)
    prefill = ck.paged_prefill(p.q, p.q_pos, qo_indptr, p.k_cache, p.v_cache, p.kv, **p.options)
    check_outputs(*prefill, reference.paged_decode(*p.decode_args, **p.options), p.q, msg=f"prefill {p!r}")
    check_same(decode, prefill, p.dtype, msg=repr(p))


# Under the interpreter every program costs milliseconds, so 64 splits of 6 segments would take seconds per
# call: the CPU draws fewer segments and one forced split count per example.
@fewer(2)
@given(decode_problem(max_segments=6 if LARGE else 3), st.sampled_from([2, 5, 64]))
def test_decode_does_not_depend_on_num_splits(p, num_splits):
    expected = reference.paged_decode(*p.decode_args, **p.options)
    one = ck.paged_decode(*p.decode_args, **p.options, num_splits=1)
    check_outputs(*one, expected, p.q, msg=f"num_splits=1 {p!r}")
    for n in (2, 5, 64) if LARGE else (num_splits,):
        many = ck.paged_decode(*p.decode_args, **p.options, num_splits=n)
        check_outputs(*many, expected, p.q, msg=f"num_splits={n} {p!r}")
        check_same(many, one, p.dtype, msg=f"num_splits={n} vs 1 {p!r}")


def decode_batch(segments, **kwargs):
    """``build`` for one query position per segment: ``(kv_len, start_pos, q_pos)``; decode's arguments."""
    q, q_pos, _, k_cache, v_cache, kv = build([(n, s, [p]) for n, s, p in segments], **kwargs)
    return q, q_pos, k_cache, v_cache, kv


def check_decode(args, num_splits=None, **options):
    o, lse = ck.paged_decode(*args, **options, num_splits=num_splits)
    check_outputs(o, lse, reference.paged_decode(*args, **options), args[0], msg=f"num_splits={num_splits} {options}")
    return o, lse


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_empty_segments(num_splits):
    """Segments 0 and 2 hold no key; segment 3's keys all lie after its query: ``-inf`` and zeros."""
    args = decode_batch([(0, 0, 0), (17, 3, 30), (0, 2**31 - 1, 2**31 - 1), (5, 100, 99)], page_size=4,
                        num_q_heads=6, num_kv_heads=2)
    o, lse = check_decode(args, num_splits=num_splits)
    for s in (0, 2, 3):
        assert bool(torch.isneginf(lse[s]).all()) and bool((o[s] == 0).all()), f"segment {s}"
    assert bool(torch.isfinite(lse[1]).all())
    sinks = torch.linspace(-1, 4, 6, device=DEVICE)
    o, lse = check_decode(args, num_splits=num_splits, sinks=sinks)
    for s in (0, 2, 3):
        assert bool((o[s] == 0).all()) and bool((lse[s] == sinks).all()), f"segment {s} with sinks"

    o, lse = ck.paged_decode(*decode_batch([], page_size=4), num_splits=num_splits)
    assert o.shape == (0, 4, 40) and lse.shape == (0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_split_decode_in_a_cuda_graph():
    """``paged_decode`` with splits (attention launch, then the merge) captured in a CUDA graph: replays with
    new q are right, the split scratch being the graph's own."""
    q, q_pos, k_cache, v_cache, kv = decode_batch([(300, 0, 299), (77, 9, 90)], page_size=16, num_q_heads=8,
                                                  num_kv_heads=2)
    ck.paged_decode(q, q_pos, k_cache, v_cache, kv, num_splits=4)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with validation(False), torch.cuda.graph(graph):  # value checks read the device: not while capturing
        o, lse = ck.paged_decode(q, q_pos, k_cache, v_cache, kv, num_splits=4)
    for replay in range(3):
        q.copy_(torch.randn_like(q))
        o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_outputs(o, lse, reference.paged_decode(q, q_pos, k_cache, v_cache, kv), q, msg=f"replay {replay}")


LONG = 3000 if LARGE else 300


@pytest.mark.parametrize("page_size, window", [(7, 0), (16, 5), (7, 37), (16, 4 * LONG)])
def test_long_segment_with_a_window(page_size, window):
    """One long segment read through a window, the query at its tail, in its middle and after a gap.

    Most KV tiles (and with many splits most splits) lie outside the window; the kernel must skip them
    and still return exactly the window's attention, for any split count.
    """
    start = 10**6
    segments = [(LONG, start, start + LONG - 1), (LONG, start, start + LONG // 2 + 3),
                (LONG, 0, LONG + 20), (37, 5, 41)]
    args = decode_batch(segments, page_size=page_size, num_q_heads=8, num_kv_heads=1, head_dim=64,
                        dtype=torch.bfloat16 if LARGE else torch.float32)
    one = check_decode(args, num_splits=1, window_left=window)
    for num_splits in (None, 5, 64) if LARGE or window == 5 else (None, 5):
        check_same(check_decode(args, num_splits=num_splits, window_left=window), one, args[0].dtype,
                   msg=f"num_splits={num_splits}")
    if window == 0:  # the query after the gap sees nothing; the others only the key at their position
        assert bool(torch.isneginf(one[1][2]).all()) and bool((one[0][2] == 0).all())
        v = reference.gather_segment(args[3], args[4], 0).double()
        assert_close(one[0][0], v[LONG - 1].expand(8, -1), args[0].dtype, "o")
