"""Bad input of the attention entry points: a ValueError or TypeError whose message names the argument.

Covers ``paged_prefill``, ``paged_decode``, ``cascade_attention``, ``plan_cascade`` and ``CascadePlan.run``,
one wrong argument at a time against a small valid batch; index tensors with strides the kernels cannot
honour; and ``ck.set_validation(False)``, under which valid input still gives the reference and the
metadata checks still run.
"""

from __future__ import annotations

import pytest
import torch

import cascade_kernels as ck
import reference
from cascade_kernels._validation import validation
from conftest import DEVICE
from test_prefill import check_outputs

NUM_TOKENS, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, NUM_PAGES = 5, 4, 2, 32, 16, 6


def i32(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def kv_of(indptr=(0, 2, 3), indices=(4, 0, 5), lens=(20, 5), start_pos=(0, 100)):
    return ck.PagedKV(i32(*indptr), i32(*indices), i32(*lens), i32(*start_pos))


def caches(num_pages=NUM_PAGES, page_size=PAGE_SIZE, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float32):
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)


def q_of(num_tokens=NUM_TOKENS, num_q_heads=NUM_Q_HEADS, head_dim=HEAD_DIM, dtype=torch.float32):
    return randn(num_tokens, num_q_heads, head_dim, dtype=dtype)


def prefill(q=None, q_pos=None, qo_indptr=None, k_cache=None, v_cache=None, kv=None, **options):
    """``paged_prefill`` of a valid two-segment batch with one argument replaced."""
    k, v = caches()
    return ck.paged_prefill(
        q_of() if q is None else q,
        i32(17, 18, 19, 104, 110) if q_pos is None else q_pos,
        i32(0, 3, 5) if qo_indptr is None else qo_indptr,
        k if k_cache is None else k_cache,
        v if v_cache is None else v_cache,
        kv_of() if kv is None else kv,
        **options,
    )


def decode(q=None, q_pos=None, k_cache=None, v_cache=None, kv=None, **options):
    k, v = caches()
    return ck.paged_decode(
        q_of(2) if q is None else q,
        i32(19, 104) if q_pos is None else q_pos,
        k if k_cache is None else k_cache,
        v if v_cache is None else v_cache,
        kv_of() if kv is None else kv,
        **options,
    )


def levels_of(shared_kv=None, own_kv=None, own_qo=None):
    """A shared prefix (page 1, 10 tokens) for all five tokens, then two segments of their own."""
    shared = ck.CascadeLevel(i32(0, NUM_TOKENS), kv_of((0, 1), (1,), (10,), (0,)) if shared_kv is None else shared_kv)
    own = ck.CascadeLevel(i32(0, 3, 5) if own_qo is None else own_qo,
                          kv_of(start_pos=(10, 10)) if own_kv is None else own_kv)
    return [shared, own]


def cascade(q=None, q_pos=None, k_cache=None, v_cache=None, levels=None, **options):
    k, v = caches()
    return ck.cascade_attention(
        q_of() if q is None else q,
        i32(27, 28, 29, 14, 20) if q_pos is None else q_pos,
        k if k_cache is None else k_cache,
        v if v_cache is None else v_cache,
        levels_of() if levels is None else levels,
        **options,
    )


def plan(levels=None, **overrides):
    kwargs = dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE_SIZE,
                  dtype=torch.float32)
    kwargs.update(overrides)
    return ck.plan_cascade(levels_of() if levels is None else levels, **kwargs)


def run(q=None, q_pos=None, k_cache=None, v_cache=None, **kwargs):
    k, v = caches()
    return plan().run(
        q_of() if q is None else q,
        i32(27, 28, 29, 14, 20) if q_pos is None else q_pos,
        k if k_cache is None else k_cache,
        v if v_cache is None else v_cache,
        **kwargs,
    )


def test_the_valid_batches_are_valid():
    """The batches every bad case starts from run and match the reference."""
    k, v = caches()
    q, kv = q_of(), kv_of()
    args = (q, i32(17, 18, 19, 104, 110), i32(0, 3, 5), k, v, kv)
    check_outputs(*ck.paged_prefill(*args), reference.paged_prefill(*args), q)
    dargs = (q[:2], i32(19, 104), k, v, kv)
    check_outputs(*ck.paged_decode(*dargs), reference.paged_decode(*dargs), q[:2])
    cargs = (q, i32(27, 28, 29, 14, 20), k, v, levels_of())
    expected = reference.cascade_attention(*cargs)
    check_outputs(*ck.cascade_attention(*cargs), expected, q)
    check_outputs(*plan().run(*cargs[:4]), expected, q)


def case_ids(cases):
    """Readable test ids: the case number and the message pattern without its regex escapes."""
    ids = []
    for i, (_, _, pattern) in enumerate(cases):
        text = pattern.replace("\\b", "").replace("\\", "").lstrip("^")
        ids.append(f"{i}:{text[:50]}")
    return ids


# Options shared by every entry point, checked on each: (options, exception, message pattern).
BAD_OPTIONS = [
    (dict(causal="yes"), TypeError, r"^causal must be a bool"),
    (dict(causal=False, window_left=4), ValueError, r"^window_left needs causal=True"),
    (dict(window_left=-1), ValueError, r"^window_left must be None or an int >= 0, got -1"),
    (dict(window_left=2.5), ValueError, r"^window_left must be None or an int >= 0"),
    (dict(softcap=0.0), ValueError, r"^softcap must be None or a float > 0, got 0\.0"),
    (dict(softcap=-1.0), ValueError, r"^softcap must be None or a float > 0"),
    (dict(sm_scale=0.0), ValueError, r"^sm_scale must be None or a float > 0"),
    (dict(sinks=torch.zeros(3, device=DEVICE)), ValueError, r"^sinks must have shape \[4\]"),
    (dict(sinks=torch.zeros(1, 4, device=DEVICE)), ValueError, r"^sinks must have shape \[4\]"),
    (dict(sinks=torch.zeros(4, device=DEVICE, dtype=torch.float16)), TypeError, r"^sinks must have dtype float32"),
    (dict(sinks=[0.0] * 4), TypeError, r"^sinks must be a torch\.Tensor"),
]

ENTRY_POINTS = dict(prefill=prefill, decode=decode, cascade=cascade, plan=plan)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", range(len(BAD_OPTIONS)), ids=case_ids(BAD_OPTIONS))
def test_bad_options_name_the_option(entry, case):
    options, exc, pattern = BAD_OPTIONS[case]
    with pytest.raises(exc, match=pattern):
        ENTRY_POINTS[entry](**options)


def _bad_prefill_and_decode():
    """``(call, exception, message pattern)`` for paged_prefill and paged_decode."""
    k, v = caches()
    return [
        # q
        (lambda: prefill(q=q_of()[0]), ValueError, r"^q must be 3-D"),
        (lambda: prefill(q=q_of()[None]), ValueError, r"^q must be 3-D"),
        (lambda: prefill(q=q_of().double()), TypeError, r"^q must have dtype float16 or bfloat16 or float32"),
        (lambda: prefill(q=q_of().to(torch.int32)), TypeError, r"^q must have dtype"),
        (lambda: prefill(q=q_of().tolist()), TypeError, r"^q must be a torch\.Tensor"),
        (lambda: decode(q=q_of(2)[0]), ValueError, r"^q must be 3-D"),
        (lambda: decode(q=q_of(2).double()), TypeError, r"^q must have dtype"),
        # q_pos
        (lambda: prefill(q_pos=i32(17, 18, 19, 104, 110).long()), TypeError, r"^q_pos must have dtype int32"),
        (lambda: prefill(q_pos=i32(17, 18, 19, 104)), ValueError, r"^q_pos must have shape \[5\]"),
        (lambda: prefill(q_pos=i32(17, 18, 19, 104, 110)[None]), ValueError, r"^q_pos must have shape \[5\]"),
        (lambda: decode(q_pos=i32(19, 104).long()), TypeError, r"^q_pos must have dtype int32"),
        (lambda: decode(q_pos=i32(19)), ValueError, r"^q_pos must have shape \[2\]"),
        # qo_indptr
        (lambda: prefill(qo_indptr=i32(0, 3, 4)), ValueError, r"^qo_indptr must end at num_tokens = 5, got 4"),
        (lambda: prefill(qo_indptr=i32(0, 3, 6)), ValueError, r"^qo_indptr must end at num_tokens = 5"),
        (lambda: prefill(qo_indptr=i32(0, 6, 5)), ValueError, r"^qo_indptr must be non-decreasing"),
        (lambda: prefill(qo_indptr=i32(1, 3, 5)), ValueError, r"^qo_indptr must start at 0"),
        (lambda: prefill(qo_indptr=i32(0, 5)), ValueError, r"^qo_indptr must have shape \[3\]"),
        (lambda: prefill(qo_indptr=i32(0, 1, 3, 5)), ValueError, r"^qo_indptr must have shape \[3\]"),
        (lambda: prefill(qo_indptr=i32(0, 3, 5).long()), TypeError, r"^qo_indptr must have dtype int32"),
        # caches
        (lambda: prefill(k_cache=k.half()), TypeError, r"^k_cache must have dtype float32"),
        (lambda: prefill(v_cache=v.half()), TypeError, r"^v_cache must have dtype float32"),
        (lambda: prefill(q=q_of(dtype=torch.bfloat16)), TypeError, r"^k_cache must have dtype bfloat16"),
        (lambda: prefill(k_cache=k[0]), ValueError, r"^k_cache must be 4-D"),
        (lambda: prefill(v_cache=v[:4]), ValueError, r"^v_cache must have shape \[6, 16, 2, 32\]"),
        (lambda: prefill(v_cache=v[:, :8]), ValueError, r"^v_cache must have shape \[6, 16, 2, 32\]"),
        (lambda: prefill(v_cache=v[:, :, :1]), ValueError, r"^v_cache must have shape"),
        (lambda: prefill(k_cache=k[..., :16], v_cache=v[..., :16]), ValueError,
         r"^k_cache head_dim must equal q's \(32\)"),
        (lambda: decode(v_cache=v.half()), TypeError, r"^v_cache must have dtype float32"),
        (lambda: decode(k_cache=k[..., :16]), ValueError, r"^k_cache head_dim must equal q's"),
        # head counts and head dims
        (lambda: prefill(q=q_of(num_q_heads=3)), ValueError,
         r"^num_q_heads \(3\) must be a positive multiple of num_kv_heads \(2\)"),
        (lambda: decode(q=q_of(2, num_q_heads=5)), ValueError, r"^num_q_heads \(5\) must be a positive multiple"),
        (lambda: prefill(q=q_of(head_dim=8), k_cache=caches(head_dim=8)[0], v_cache=caches(head_dim=8)[1]),
         ValueError, r"^head_dim must be in \[16, 256\], got 8"),
        (lambda: prefill(q=q_of(head_dim=512), k_cache=caches(head_dim=512)[0], v_cache=caches(head_dim=512)[1]),
         ValueError, r"^head_dim must be in \[16, 256\], got 512"),
        (lambda: decode(q=q_of(2, head_dim=8), k_cache=caches(head_dim=8)[0], v_cache=caches(head_dim=8)[1]),
         ValueError, r"^head_dim must be in \[16, 256\], got 8"),
        # kv
        (lambda: prefill(kv=kv_of(indices=(4, 0, 6))), ValueError,
         r"^kv\.indices holds page 6, out of range for a cache of 6 pages"),
        (lambda: decode(kv=kv_of(indices=(4, 9, 5))), ValueError, r"^kv\.indices holds page 9"),
        (lambda: prefill(kv=kv_of(lens=(33, 5))), ValueError, r"^kv\.lens\[0\] = 33 is longer than its 2 pages of 16"),
        (lambda: prefill(kv=kv_of(lens=(20, 17))), ValueError, r"^kv\.lens\[1\] = 17 is longer than its 1 pages"),
        (lambda: decode(kv=kv_of(lens=(20, 17))), ValueError, r"^kv\.lens\[1\] = 17"),
        (lambda: prefill(kv=(i32(0, 2, 3), i32(4, 0, 5), i32(20, 5), i32(0, 100))), TypeError,
         r"^kv must be a PagedKV, got tuple"),
        (lambda: decode(kv=levels_of()[1]), TypeError, r"^kv must be a PagedKV, got CascadeLevel"),
        (lambda: prefill(kv=kv_of((0, 1), (1,), (10,), (0,))), ValueError, r"^qo_indptr must have shape \[2\]"),
        # decode: one token per segment
        (lambda: decode(q=q_of(3), q_pos=i32(19, 104, 105)), ValueError,
         r"^q must hold one token per kv segment \(2\), got 3"),
        (lambda: decode(q=q_of(1), q_pos=i32(19)), ValueError, r"^q must hold one token per kv segment \(2\), got 1"),
        # num_splits
        (lambda: prefill(num_splits=0), ValueError, r"^num_splits must be None or an int >= 1, got 0"),
        (lambda: prefill(num_splits=-2), ValueError, r"^num_splits must be None or an int >= 1"),
        (lambda: prefill(num_splits=2.0), ValueError, r"^num_splits must be None or an int >= 1, got 2\.0"),
        (lambda: decode(num_splits=0), ValueError, r"^num_splits must be None or an int >= 1, got 0"),
        (lambda: decode(num_splits=True), ValueError, r"^num_splits must be None or an int >= 1, got True"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_prefill_and_decode())), ids=case_ids(_bad_prefill_and_decode()))
def test_bad_prefill_and_decode_arguments(case):
    call, exc, pattern = _bad_prefill_and_decode()[case]
    with pytest.raises(exc, match=pattern):
        call()


def _bad_cascade():
    """``(call, exception, message pattern)`` for cascade_attention, plan_cascade and CascadePlan.run."""
    k, v = caches()
    lv = levels_of()
    short = ck.CascadeLevel(i32(0, 4), kv_of((0, 1), (1,), (10,), (0,)))
    return [
        # cascade_attention: tensors
        (lambda: cascade(q=q_of()[0]), ValueError, r"^q must be 3-D"),
        (lambda: cascade(q=q_of().double()), TypeError, r"^q must have dtype"),
        (lambda: cascade(q=q_of(4)), ValueError, r"^q must have shape \[5, 4, 32\]"),
        (lambda: cascade(q_pos=i32(27, 28, 29, 14, 20).long()), TypeError, r"^q_pos must have dtype int32"),
        (lambda: cascade(q_pos=i32(27, 28, 29, 14)), ValueError, r"^q_pos must have shape \[5\]"),
        (lambda: cascade(k_cache=k.half()), TypeError, r"^k_cache must have dtype float32"),
        (lambda: cascade(v_cache=v.half()), TypeError, r"^v_cache must have dtype float32"),
        (lambda: cascade(k_cache=k[0]), ValueError, r"^k_cache must be 4-D"),
        (lambda: cascade(v_cache=v[:, :8]), ValueError, r"^v_cache must have shape \[6, 16, 2, 32\]"),
        (lambda: cascade(k_cache=k[..., :16], v_cache=v[..., :16]), ValueError, r"^k_cache head_dim must equal q's"),
        (lambda: cascade(q=q_of(num_q_heads=3)), ValueError, r"^num_q_heads \(3\) must be a positive multiple"),
        (lambda: cascade(q=q_of(head_dim=8), k_cache=caches(head_dim=8)[0], v_cache=caches(head_dim=8)[1]),
         ValueError, r"^head_dim must be in \[16, 256\], got 8"),
        (lambda: cascade(q=q_of(head_dim=512), k_cache=caches(head_dim=512)[0], v_cache=caches(head_dim=512)[1]),
         ValueError, r"^head_dim must be in \[16, 256\], got 512"),
        # cascade_attention: levels
        (lambda: cascade(levels=lv[0]), TypeError, r"^levels must be a non-empty list of CascadeLevel"),
        (lambda: cascade(levels=[]), TypeError, r"^levels must be a non-empty list"),
        (lambda: cascade(levels={0: lv[0]}), TypeError, r"^levels must be a non-empty list"),
        (lambda: cascade(levels=[lv[0], lv[1].kv]), TypeError, r"^levels\[1\] must be a CascadeLevel, got PagedKV"),
        (lambda: cascade(levels=[lv[0], None]), TypeError, r"^levels\[1\] must be a CascadeLevel, got NoneType"),
        (lambda: cascade(levels=[short, lv[1]]), ValueError,
         r"^every level's qo_indptr must end at the same number of query tokens, got \[4, 5\]"),
        (lambda: cascade(levels=levels_of(own_kv=kv_of(indices=(4, 0, 6), start_pos=(10, 10)))), ValueError,
         r"^levels\[1\]\.kv\.indices holds page 6, out of range for a cache of 6 pages"),
        (lambda: cascade(levels=levels_of(shared_kv=kv_of((0, 1), (1,), (17,), (0,)))), ValueError,
         r"^levels\[0\]\.kv\.lens\[0\] = 17 is longer than its 1 pages of 16 slots"),
        # plan_cascade
        (lambda: plan(levels=lv[0]), TypeError, r"^levels must be a non-empty list"),
        (lambda: plan(levels=[lv[0], "level"]), TypeError, r"^levels\[1\] must be a CascadeLevel, got str"),
        (lambda: plan(levels=[lv[1], short]), ValueError, r"^every level's qo_indptr must end at the same"),
        (lambda: plan(num_q_heads=0), ValueError, r"^num_q_heads must be a positive int, got 0"),
        (lambda: plan(num_q_heads="4"), ValueError, r"^num_q_heads must be a positive int, got '4'"),
        (lambda: plan(num_kv_heads=3), ValueError,
         r"^num_q_heads \(4\) must be a positive multiple of num_kv_heads \(3\)"),
        (lambda: plan(num_kv_heads=0), ValueError, r"^num_kv_heads must be a positive int"),
        (lambda: plan(head_dim=8), ValueError, r"^head_dim must be in \[16, 256\], got 8"),
        (lambda: plan(head_dim=512), ValueError, r"^head_dim must be in \[16, 256\], got 512"),
        (lambda: plan(head_dim=32.0), ValueError, r"^head_dim must be a positive int"),
        (lambda: plan(page_size=0), ValueError, r"^page_size must be a positive int"),
        (lambda: plan(dtype=torch.int32), TypeError, r"^dtype must be float16, bfloat16 or float32"),
        (lambda: plan(dtype=torch.float64), TypeError, r"^dtype must be float16, bfloat16 or float32"),
        (lambda: plan(num_pages=5), ValueError,
         r"^levels\[1\]\.kv\.indices holds page 5, out of range for a cache of 5"),
        (lambda: plan(page_size=8), ValueError, r"^levels\[0\]\.kv\.lens\[0\] = 10 is longer than its 1 pages of 8"),
        (lambda: plan(fold="yes"), TypeError, r"^fold must be None or a bool"),
        # CascadePlan.run
        (lambda: run(q=q_of(4)), ValueError, r"^q must have shape \[5, 4, 32\]"),
        (lambda: run(q=q_of()[0]), ValueError, r"^q must have shape \[5, 4, 32\]"),
        (lambda: run(q=q_of(dtype=torch.float16)), TypeError, r"^q must have dtype float32"),
        (lambda: run(q=q_of(num_q_heads=2)), ValueError, r"^q must have shape \[5, 4, 32\]"),
        (lambda: run(q_pos=i32(27, 28, 29, 14, 20).long()), TypeError, r"^q_pos must have dtype int32"),
        (lambda: run(q_pos=i32(27, 28, 29)), ValueError, r"^q_pos must have shape \[5\]"),
        (lambda: run(k_cache=k.half()), TypeError, r"^k_cache must have dtype float32"),
        (lambda: run(k_cache=caches(page_size=8)[0], v_cache=caches(page_size=8)[1]), ValueError,
         r"^k_cache must have shape \[\*, 16, 2, 32\]"),
        (lambda: run(k_cache=caches(num_kv_heads=1)[0], v_cache=caches(num_kv_heads=1)[1]), ValueError,
         r"^k_cache must have shape \[\*, 16, 2, 32\]"),
        (lambda: run(k_cache=k[..., :16]), ValueError, r"^k_cache must have shape"),
        (lambda: run(v_cache=v[:4]), ValueError, r"^v_cache must have shape \[6, 16, 2, 32\]"),
        (lambda: run(v_cache=v.half()), TypeError, r"^v_cache must have dtype float32"),
        (lambda: run(k_cache=k[:5], v_cache=v[:5]), ValueError, r"^k_cache has 5 pages; the plan was made for 6"),
        (lambda: run(out=(q_of(4), torch.empty(5, 4, device=DEVICE))), ValueError,
         r"^out\[0\] must have shape \[5, 4, 32\]"),
        (lambda: run(out=(q_of(), torch.empty(5, 4, device=DEVICE, dtype=torch.float16))), TypeError,
         r"^out\[1\] must have dtype float32"),
        (lambda: run(out=(q_of(), torch.empty(5, 2, device=DEVICE))), ValueError,
         r"^out\[1\] must have shape \[5, 4\]"),
        (lambda: run(out=(q_of().double(), torch.empty(5, 4, device=DEVICE))), TypeError, r"^out\[0\] must have dtype"),
        (lambda: run(out=(q_of(), None)), TypeError, r"^out\[1\] must be a torch\.Tensor"),
        # out that is not a pair of tensors
        (lambda: run(out=q_of()), (TypeError, ValueError), r"^out\b"),
        (lambda: run(out=(q_of(),)), (TypeError, ValueError), r"^out\b"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cascade())), ids=case_ids(_bad_cascade()))
def test_bad_cascade_arguments(case):
    call, exc, pattern = _bad_cascade()[case]
    with pytest.raises(exc, match=pattern):
        call()


# ---------------------------------------------------------------------------------------------------------
# Index tensors with strides: the kernels read q_pos, qo_indptr and sinks as dense arrays, so a strided view
# must either be honoured or rejected with an error that names it, never read as if it were dense.


def every_other(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t``'s values with stride 2."""
    big = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
    big[::2] = t
    return big[::2]


STRIDED = ["q_pos", "qo_indptr", "sinks"]


def _strided_case(name, entry):
    """The call with argument ``name`` strided, the reference of the same call, and the query tensor."""
    k, v = caches()
    q = q_of()
    sinks = torch.linspace(-1.0, 2.0, NUM_Q_HEADS, device=DEVICE)
    if entry == "prefill":
        args = dict(q_pos=i32(17, 18, 19, 104, 110), qo_indptr=i32(0, 3, 5), sinks=sinks)
        strided = dict(args, **{name: every_other(args[name])})

        def call():
            return ck.paged_prefill(q, strided["q_pos"], strided["qo_indptr"], k, v, kv_of(), sinks=strided["sinks"])

        return call, reference.paged_prefill(q, args["q_pos"], args["qo_indptr"], k, v, kv_of(), sinks=sinks), q
    if entry == "decode":
        args = dict(q_pos=i32(19, 104), sinks=sinks)
        strided = dict(args, **{name: every_other(args[name])})

        def call():
            return ck.paged_decode(q[:2], strided["q_pos"], k, v, kv_of(), sinks=strided["sinks"])

        return call, reference.paged_decode(q[:2], args["q_pos"], k, v, kv_of(), sinks=sinks), q[:2]
    args = dict(q_pos=i32(27, 28, 29, 14, 20), sinks=sinks)
    strided = dict(args, **{name: every_other(args[name])})

    def call():
        return ck.cascade_attention(q, strided["q_pos"], k, v, levels_of(), sinks=strided["sinks"])

    return call, reference.cascade_attention(q, args["q_pos"], k, v, levels_of(), sinks=sinks), q


@pytest.mark.parametrize("name, entry", [("q_pos", "prefill"), ("qo_indptr", "prefill"), ("sinks", "prefill"),
                                         ("q_pos", "decode"), ("sinks", "decode"),
                                         ("q_pos", "cascade"), ("sinks", "cascade")])
def test_strided_index_tensors_are_honoured_or_rejected(name, entry):
    call, expected, q = _strided_case(name, entry)
    try:
        o, lse = call()
    except (ValueError, TypeError) as e:
        assert name in str(e), f"the error does not name {name}: {e}"
        return
    check_outputs(o, lse, expected, q, msg=f"strided {name} was read as if dense")


# ---------------------------------------------------------------------------------------------------------
# Validation switched off


@pytest.fixture
def validation_off():
    """Validation off for the test, restored to what it was afterwards even when the test fails."""
    previous = ck.validation_enabled()
    ck.set_validation(False)
    try:
        yield
    finally:
        ck.set_validation(previous)


def test_valid_input_works_without_validation(validation_off):
    assert not ck.validation_enabled()
    k, v = caches()
    q, kv = q_of(), kv_of()
    sinks = torch.linspace(-1.0, 2.0, NUM_Q_HEADS, device=DEVICE)
    args = (q, i32(17, 18, 19, 104, 110), i32(0, 3, 5), k, v, kv)
    check_outputs(*ck.paged_prefill(*args, window_left=7), reference.paged_prefill(*args, window_left=7), q)
    dargs = (q[:2], i32(19, 104), k, v, kv)
    check_outputs(*ck.paged_decode(*dargs, sinks=sinks), reference.paged_decode(*dargs, sinks=sinks), q[:2])
    cargs = (q, i32(27, 28, 29, 14, 20), k, v, levels_of())
    expected = reference.cascade_attention(*cargs, softcap=4.0)
    check_outputs(*ck.cascade_attention(*cargs, softcap=4.0), expected, q)
    check_outputs(*plan(softcap=4.0).run(*cargs[:4]), expected, q)
    assert not ck.validation_enabled(), "an entry point switched validation back on"


def test_metadata_checks_run_without_validation(validation_off):
    """Shapes, dtypes and options need no device-to-host copy: they are checked whatever the switch."""
    for call, exc, pattern in (
        (lambda: prefill(q_pos=i32(17, 18, 19, 104, 110).long()), TypeError, r"^q_pos must have dtype int32"),
        (lambda: prefill(qo_indptr=i32(0, 5)), ValueError, r"^qo_indptr must have shape \[3\]"),
        (lambda: decode(q=q_of(3), q_pos=i32(19, 104, 105)), ValueError, r"^q must hold one token per kv segment"),
        (lambda: cascade(levels=[]), TypeError, r"^levels must be a non-empty list"),
        (lambda: run(q=q_of(4)), ValueError, r"^q must have shape"),
        (lambda: prefill(num_splits=0), ValueError, r"^num_splits must be None or an int >= 1"),
        (lambda: decode(causal=False, window_left=3), ValueError, r"^window_left needs causal=True"),
    ):
        with pytest.raises(exc, match=pattern):
            call()


def test_validation_switch_is_restored():
    """The fixture above leaves validation on for the tests that follow."""
    assert ck.validation_enabled()
    with validation(False):
        assert not ck.validation_enabled()
    assert ck.validation_enabled()
