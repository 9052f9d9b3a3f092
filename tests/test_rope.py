"""RoPE at global positions and the paged KV append, against the float64 reference in ``reference/rope.py``.

What is held, on layouts drawn by hypothesis:

* ``apply_rope`` equals the reference for both pair layouts, partial rotary dims, any strides, in place,
  at positions up to the int32 limit (where an fp32 angle would be off by degrees);
* ``append_kv`` writes exactly the given slots (every other slot stays NaN, bit for bit), with keys
  rotated at their positions, into NHD, HND and fused caches of another dtype than its inputs;
* ``paged_slots`` matches a token-by-token reference;
* ``rotate_keys`` by ``d`` equals caching the keys at ``p + d``; by ``d`` then ``-d`` is the identity;
  slots outside the segments are untouched;
* bad arguments raise ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from conftest import DEVICE, assert_close

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 40, 64, 128)
THETAS = (1e4, 1e5, 5e5)
INT32_MAX = 2**31 - 1
LAYOUTS = ("nhd", "hnd", "fused_nhd", "fused_hnd")

# (atol, rtol) of one rotation against float64. The kernel computes in fp32 and rounds once to the output
# dtype, so the bound is the output's unit roundoff (fp16 2^-11, bf16 2^-8, with a factor 2 of room) on top
# of the fp32 rotation error: angles are reduced in fp64, so the angle is within 1e-6 rad at any int32
# position, at most 4e-6 on an element of magnitude 4.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 8e-3),
}


def _tol(dtype, roundings=1, scale=None):
    """``(atol, rtol)`` for results rounded ``roundings`` times. A rounding before a rotation moves each
    element by up to the unit roundoff of its pair's norm, not of the element itself (a small element may
    take the error of a large partner), so past one rounding ``atol`` grows to ``rtol * scale``, with
    ``scale`` the largest magnitude present."""
    atol, rtol = TOL[dtype]
    if roundings > 1:
        atol = max(atol, rtol * float(scale))
    return atol * roundings, rtol * roundings


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _randn(gen, shape, dtype):
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def _strided(gen, shape, dtype, mode):
    """A ``[N, H, D]`` tensor: contiguous, a head-major transpose, or every other dim of a wider tensor."""
    n, h, d = shape
    if mode == "contiguous":
        return _randn(gen, shape, dtype)
    if mode == "transposed":
        return _randn(gen, (h, n, d), dtype).transpose(0, 1)
    return _randn(gen, (n, h, 2 * d), dtype)[..., ::2]


def _cache_pair(num_pages, page_size, heads, head_dim, dtype, layout):
    """NaN-filled ``k_cache, v_cache`` views ``[P, page_size, H, D]`` stored in ``layout``."""
    nan = dict(fill_value=math.nan, dtype=dtype, device=DEVICE)
    if layout == "nhd":
        return (torch.full((num_pages, page_size, heads, head_dim), **nan),
                torch.full((num_pages, page_size, heads, head_dim), **nan))
    if layout == "hnd":
        return (torch.full((num_pages, heads, page_size, head_dim), **nan).transpose(1, 2),
                torch.full((num_pages, heads, page_size, head_dim), **nan).transpose(1, 2))
    if layout == "fused_nhd":
        fused = torch.full((num_pages, 2, page_size, heads, head_dim), **nan)
        return fused[:, 0], fused[:, 1]
    fused = torch.full((num_pages, 2, heads, page_size, head_dim), **nan)
    return fused[:, 0].transpose(1, 2), fused[:, 1].transpose(1, 2)


def _positions(draw, n):
    """Positions mixing small ones, ones near 1M and ones up to the int32 limit."""
    pos = st.one_of(st.integers(0, 300), st.integers(1_000_000 - 50, 1_000_000 + 50), st.integers(0, INT32_MAX))
    return draw(st.lists(pos, min_size=n, max_size=n))


def _rotary_dim(draw, head_dim):
    return draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda h: 2 * h)))


def _same_bits(a, b):
    """Bitwise equality that counts NaN as equal to NaN."""
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


# ---------------------------------------------------------------------------------------------------------
# apply_rope


@given(data=st.data())
def test_apply_rope_matches_reference(data):
    draw = data.draw
    n, heads = draw(st.integers(1, 9)), draw(st.sampled_from((1, 3, 5, 8)))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    dtype, out_dtype = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))
    rotary_dim, interleave = _rotary_dim(draw, head_dim), draw(st.booleans())
    theta = draw(st.sampled_from(THETAS))
    mode = draw(st.sampled_from(("contiguous", "transposed", "every_other")))
    out_mode = draw(st.sampled_from(("new", "given", "in_place")))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = _strided(gen, (n, heads, head_dim), dtype, mode)
    pos = _i32(*_positions(draw, n))

    expected = reference.apply_rope(x, pos, theta=theta, interleave=interleave, rotary_dim=rotary_dim)
    kwargs = dict(theta=theta, interleave=interleave, rotary_dim=rotary_dim)
    if out_mode == "new":
        out, out_dtype = ck.apply_rope(x, pos, **kwargs), dtype
        assert out.dtype == dtype
    elif out_mode == "given":
        buf = torch.full((n, heads, head_dim), math.nan, dtype=out_dtype, device=DEVICE)
        out = ck.apply_rope(x, pos, out=buf, **kwargs)
        assert out is buf
    else:
        out, out_dtype = ck.apply_rope(x, pos, out=x, **kwargs), dtype
        assert out is x
    assert_close(out, expected, out_dtype, tol=_tol(out_dtype),
                 msg=f"pos={pos.tolist()} D={head_dim} R={rotary_dim} interleave={interleave} theta={theta}")


def test_apply_rope_is_accurate_at_large_positions():
    """At positions near 1M and 2**31 the rotation keeps fp32 accuracy (measured: 1e-6 max abs error).

    The naive fp32 angle ``pos * inv_freq`` is shown alongside: it is off by up to 0.06 rad at 1M, an
    error of 1e-1 on the rotated values, 1e5 times ours.
    """
    gen = torch.Generator().manual_seed(0)
    pos = _i32(999_983, 1_000_000, 1_048_575, 123_456_789, INT32_MAX - 1, INT32_MAX)
    x = _randn(gen, (pos.numel(), 2, 128), torch.float32)
    expected = reference.apply_rope(x, pos, theta=1e4)
    assert_close(ck.apply_rope(x, pos, theta=1e4), expected, torch.float32, tol=(4e-6, 0))

    inv_freq = 1e4 ** -(torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    angle = pos.cpu().float()[:2, None] * inv_freq  # fp32 angle at ~1M
    true = pos.cpu().double()[:2, None] * (1e4 ** -(torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    assert (angle.double() - true).abs().max() > 1e-2


def test_apply_rope_rotation_is_a_rotation():
    """Position 0 is the identity, and rotating by p and then q equals rotating by p + q."""
    gen = torch.Generator().manual_seed(1)
    x = _randn(gen, (4, 3, 64), torch.float32)
    zero = _i32(0, 0, 0, 0)
    assert torch.equal(ck.apply_rope(x, zero, interleave=True), x)
    p, q = _i32(5, 70_000, 3, 1_000_000), _i32(-5, 12, 400_000, -999_999)
    twice = ck.apply_rope(ck.apply_rope(x, p), q)
    assert_close(twice, reference.apply_rope(x, p + q), torch.float32, tol=_tol(torch.float32, 2, scale=x.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# append_kv


@given(data=st.data())
def test_append_kv_matches_reference(data):
    draw = data.draw
    kv_heads, head_dim = draw(st.sampled_from((1, 2, 3, 5))), draw(st.sampled_from(HEAD_DIMS))
    page_size, num_pages = draw(st.sampled_from((1, 3, 16, 17))), draw(st.integers(1, 5))
    dtype, cache_dtype = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    rope = draw(st.booleans())
    rotary_dim, interleave = (_rotary_dim(draw, head_dim), draw(st.booleans())) if rope else (None, False)
    theta = draw(st.sampled_from(THETAS)) if rope else None
    num_slots = num_pages * page_size
    used = draw(st.lists(st.integers(0, num_slots - 1), min_size=1, max_size=min(num_slots, 12), unique=True))
    slots = draw(st.permutations(used + [-1] * draw(st.integers(0, 2))))  # -1: padding, skipped
    n = len(slots)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    k = _strided(gen, (n, kv_heads, head_dim), dtype, draw(st.sampled_from(("contiguous", "transposed"))))
    v = _strided(gen, (n, kv_heads, head_dim), dtype, "every_other")
    pos = _i32(*_positions(draw, n))
    slots = torch.tensor(slots, dtype=torch.int64, device=DEVICE)

    k_cache, v_cache = _cache_pair(num_pages, page_size, kv_heads, head_dim, cache_dtype, layout)
    k_ref, v_ref = k_cache.double(), v_cache.double()
    rope_args = dict(pos=pos, rope_theta=theta, rope_interleave=interleave, rotary_dim=rotary_dim) if rope else {}
    ck.append_kv(k, v, k_cache, v_cache, slots, **rope_args)
    reference.append_kv(k, v, k_ref, v_ref, slots, **rope_args)

    written = torch.zeros(num_slots, dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    written = written.view(num_pages, page_size).to(DEVICE)
    msg = f"slots={slots.tolist()} layout={layout} rope={rope} R={rotary_dim} interleave={interleave}"
    assert_close(k_cache[written], k_ref[written], cache_dtype, tol=_tol(cache_dtype), msg=msg)
    assert_close(v_cache[written], v_ref[written], cache_dtype, tol=_tol(cache_dtype), msg=msg)
    assert bool(k_cache[~written].isnan().all()) and bool(v_cache[~written].isnan().all()), "wrote an unlisted slot"


def test_append_kv_then_apply_rope_agree():
    """The fused append rotates exactly as apply_rope does (same kernel code, bit for bit in fp32)."""
    gen = torch.Generator().manual_seed(2)
    k, v = _randn(gen, (6, 3, 40), torch.float32), _randn(gen, (6, 3, 40), torch.float32)
    pos = _i32(0, 1, 2, 50_000, 1_000_000, INT32_MAX)
    k_cache, v_cache = _cache_pair(2, 4, 3, 40, torch.float32, "nhd")
    slots = torch.tensor([7, 0, 1, 2, 3, 4], device=DEVICE)
    ck.append_kv(k, v, k_cache, v_cache, slots, pos=pos, rope_theta=1e5, rope_interleave=True, rotary_dim=32)
    rotated = ck.apply_rope(k, pos, theta=1e5, interleave=True, rotary_dim=32)
    assert torch.equal(k_cache.reshape(-1, 3, 40)[slots], rotated)
    assert torch.equal(v_cache.reshape(-1, 3, 40)[slots], v)


# ---------------------------------------------------------------------------------------------------------
# paged_slots and rotate_keys on random PagedKV layouts


@st.composite
def paged_layouts(draw, max_segments=4, max_len=40):
    """``(kv, page_size, num_pages)``: segments of random lengths in a random permutation of pages, with
    spare pages no segment uses and sometimes one page more than a segment's length needs."""
    page_size = draw(st.sampled_from((1, 2, 5, 16)))
    lens = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_segments))
    counts = [-(-n // page_size) + draw(st.integers(0, 1)) for n in lens]
    num_pages = sum(counts) + draw(st.integers(0, 2))
    perm = draw(st.permutations(range(num_pages)))
    indptr = [0]
    for c in counts:
        indptr.append(indptr[-1] + c)
    start = [draw(st.one_of(st.integers(0, 100), st.integers(0, 2**30))) for _ in lens]
    kv = ck.PagedKV(_i32(*indptr), _i32(*perm[: indptr[-1]]), _i32(*lens), _i32(*start))
    return kv, page_size, num_pages


@given(layout=paged_layouts(), data=st.data())
def test_paged_slots_matches_reference(layout, data):
    kv, page_size, _ = layout
    room = [(int(kv.indptr[s + 1]) - int(kv.indptr[s])) * page_size - int(kv.lens[s]) for s in range(kv.num_segments)]
    new = [data.draw(st.integers(0, r)) for r in room]
    qo_indptr = _i32(*[sum(new[:s]) for s in range(len(new) + 1)])
    slots, pos, kv_after = ck.paged_slots(kv, qo_indptr, page_size)
    ref_slots, ref_pos, ref_lens = reference.paged_slots(kv, qo_indptr, page_size)
    assert slots.dtype == torch.int64 and pos.dtype == torch.int32
    assert slots.tolist() == ref_slots.tolist() and pos.tolist() == ref_pos.tolist()
    assert kv_after.lens.tolist() == ref_lens.tolist()
    assert kv_after.start_pos is kv.start_pos and kv_after.indices is kv.indices


def _filled(kv, page_size, num_pages):
    """Bool ``[num_pages, page_size]``: the slots holding one of ``kv``'s tokens."""
    mask = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for s in range(kv.num_segments):
        pages = kv.indices[int(kv.indptr[s]) : int(kv.indptr[s + 1])].tolist()
        for j in range(int(kv.lens[s])):
            mask[pages[j // page_size], j % page_size] = True
    return mask.to(DEVICE)


@given(layout=paged_layouts(), data=st.data())
def test_rotate_keys_equals_caching_at_shifted_positions(layout, data):
    """Keys cached at ``p`` and rotated by ``delta`` equal keys cached at ``p + delta``; other slots stay NaN."""
    kv, page_size, num_pages = layout
    draw = data.draw
    kv_heads, head_dim = draw(st.sampled_from((1, 3))), draw(st.sampled_from(HEAD_DIMS))
    dtype, layout_name = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(LAYOUTS))
    rotary_dim, interleave, theta = _rotary_dim(draw, head_dim), draw(st.booleans()), draw(st.sampled_from(THETAS))
    delta = _i32(*[draw(st.integers(-int(kv.start_pos[s]), 2**30)) for s in range(kv.num_segments)])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    everything = ck.PagedKV(kv.indptr, kv.indices, _i32(*[0] * kv.num_segments), kv.start_pos)
    total = int(kv.lens.sum())
    qo_indptr = torch.cat([_i32(0), kv.lens.cumsum(0).to(torch.int32)])
    slots, pos, _ = ck.paged_slots(everything, qo_indptr, page_size, num_tokens=total)
    k, v = _randn(gen, (total, kv_heads, head_dim), dtype), _randn(gen, (total, kv_heads, head_dim), dtype)
    rope = dict(rope_interleave=interleave, rotary_dim=rotary_dim)

    k_cache, v_cache = _cache_pair(num_pages, page_size, kv_heads, head_dim, dtype, layout_name)
    ck.append_kv(k, v, k_cache, v_cache, slots, pos=pos, rope_theta=theta, **rope)
    before = k_cache.clone()
    out = ck.rotate_keys(k_cache, kv, delta, theta=theta, interleave=interleave, rotary_dim=rotary_dim)
    assert out is k_cache

    seg_of_token = torch.repeat_interleave(torch.arange(kv.num_segments, device=DEVICE), kv.lens.long())
    k_moved, v_moved = _cache_pair(num_pages, page_size, kv_heads, head_dim, dtype, layout_name)
    ck.append_kv(k, v, k_moved, v_moved, slots, pos=pos + delta[seg_of_token], rope_theta=theta, **rope)
    filled = _filled(kv, page_size, num_pages)
    scale = float(k.abs().max()) if total else 1.0
    assert_close(k_cache[filled], k_moved[filled].double(), dtype, tol=_tol(dtype, 2, scale=scale), msg=f"delta={delta.tolist()}")
    assert _same_bits(k_cache[~filled], before[~filled]), "rotate_keys touched a slot outside the segments"

    k_ref = before.double()
    reference.rotate_keys(k_ref, kv, delta, theta=theta, interleave=interleave, rotary_dim=rotary_dim)
    assert_close(k_cache[filled], k_ref[filled], dtype, tol=_tol(dtype))

    ck.rotate_keys(k_cache, kv, -delta, theta=theta, interleave=interleave, rotary_dim=rotary_dim)
    assert_close(k_cache[filled], before[filled].double(), dtype, tol=_tol(dtype, 2, scale=scale), msg="rotate by d then -d")


# ---------------------------------------------------------------------------------------------------------
# Bad input


def _bad_calls():
    x, pos = torch.zeros(3, 2, 16, device=DEVICE), _i32(0, 1, 2)
    kc, vc = torch.zeros(2, 4, 2, 16, device=DEVICE), torch.zeros(2, 4, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    kv = ck.PagedKV(_i32(0, 1), _i32(1), _i32(3), _i32(0))
    return [
        ("x", TypeError, lambda: ck.apply_rope(x.int(), pos)),
        ("x", ValueError, lambda: ck.apply_rope(x[0], pos)),
        ("pos", TypeError, lambda: ck.apply_rope(x, pos.long())),
        ("pos", ValueError, lambda: ck.apply_rope(x, pos[:2])),
        ("theta", ValueError, lambda: ck.apply_rope(x, pos, theta=-1.0)),
        ("rotary_dim", ValueError, lambda: ck.apply_rope(x, pos, rotary_dim=15)),
        ("rotary_dim", ValueError, lambda: ck.apply_rope(x, pos, rotary_dim=18)),
        ("interleave", TypeError, lambda: ck.apply_rope(x, pos, interleave=1)),
        ("out", ValueError, lambda: ck.apply_rope(x, pos, out=torch.zeros(3, 2, 8, device=DEVICE))),
        ("v", ValueError, lambda: ck.append_kv(x, x[:2], kc, vc, slots)),
        ("k_cache", ValueError, lambda: ck.append_kv(x, x, kc[..., :8], vc, slots)),
        ("k_cache", ValueError, lambda: ck.append_kv(x, x, kc[0], vc, slots)),
        ("v_cache", ValueError, lambda: ck.append_kv(x, x, kc, vc[:1], slots)),
        ("v_cache", TypeError, lambda: ck.append_kv(x, x, kc, vc.int(), slots)),
        ("slots", TypeError, lambda: ck.append_kv(x, x, kc, vc, slots.int())),
        ("slots", ValueError, lambda: ck.append_kv(x, x, kc, vc, torch.tensor([0, 1, 8], device=DEVICE))),
        ("slots", ValueError, lambda: ck.append_kv(x, x, kc, vc, torch.tensor([0, -2, 1], device=DEVICE))),
        ("slots", ValueError, lambda: ck.append_kv(x, x, kc, vc, torch.tensor([0, 1, 1], device=DEVICE))),
        ("pos", TypeError, lambda: ck.append_kv(x, x, kc, vc, slots, rope_theta=1e4)),
        ("pos", ValueError, lambda: ck.append_kv(x, x, kc, vc, slots, pos=pos)),
        ("rope_theta", ValueError, lambda: ck.append_kv(x, x, kc, vc, slots, pos=pos, rope_theta=0.0)),
        ("kv", TypeError, lambda: ck.rotate_keys(kc, "kv", _i32(1), theta=1e4)),
        ("delta", ValueError, lambda: ck.rotate_keys(kc, kv, _i32(1, 2), theta=1e4)),
        ("delta", TypeError, lambda: ck.rotate_keys(kc, kv, torch.tensor([1], device=DEVICE), theta=1e4)),
        ("kv.indices", ValueError, lambda: ck.rotate_keys(kc[:1], kv, _i32(1), theta=1e4)),
        ("kv.lens", ValueError, lambda: ck.rotate_keys(kc[:, :2], kv, _i32(1), theta=1e4)),
        ("kv.indices", ValueError,
         lambda: ck.rotate_keys(kc, ck.PagedKV(_i32(0, 1, 2), _i32(1, 1), _i32(3, 3), _i32(0, 9)), _i32(1, 1),
                                theta=1e4)),
        ("page_size", ValueError, lambda: ck.paged_slots(kv, _i32(0, 1), 0)),
        ("qo_indptr", ValueError, lambda: ck.paged_slots(kv, _i32(0, 1, 2), 4)),
        ("qo_indptr", ValueError, lambda: ck.paged_slots(kv, _i32(0, 2), 4)),
        ("num_tokens", ValueError, lambda: ck.paged_slots(kv, _i32(0, 1), 4, num_tokens=2)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    name, error, call = _bad_calls()[case]
    with pytest.raises(error, match=name.replace(".", r"\.")):
        call()
