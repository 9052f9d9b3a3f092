"""ck.merge_state and ck.merge_states against reference.merge_states, and their algebra.

The output ``o`` is held to its dtype's tolerance; ``lse`` is fp32 whatever the dtype of ``o`` and is
computed the same way for every dtype, so it is held to the fp32 row.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cascade_kernels as ck
import reference
from conftest import DEVICE, DTYPES, assert_close, poison
from strategies import states

ODD_HEADS = st.sampled_from([1, 3, 17])
ODD_DIMS = st.sampled_from([16, 40, 128])


def check_state(o, lse, expected_o, expected_lse, dtype):
    assert_close(o, expected_o, dtype, "o")
    assert_close(lse, expected_lse, torch.float32, "lse")


def two_states(data, dtype, **kwargs):
    """Draw ``(o_a, lse_a, o_b, lse_b)``, each ``[n, H, D]`` / ``[n, H]`` and non-contiguous."""
    o, lse = data.draw(states(k=2, dtype=dtype, **kwargs))
    return o[:, 0], lse[:, 0], o[:, 1], lse[:, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_merge_states_matches_reference(dtype, data):
    o, lse = data.draw(states(H=ODD_HEADS, D=ODD_DIMS, dtype=dtype))
    mo, mlse = ck.merge_states(o, lse)
    assert mo.shape == (o.shape[0], o.shape[2], o.shape[3]) and mo.dtype == dtype and mo.device == o.device
    assert mlse.shape == (o.shape[0], o.shape[2]) and mlse.dtype == torch.float32
    check_state(mo, mlse, *reference.merge_states(o, lse), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_merge_state_matches_reference(dtype, data):
    o_a, lse_a, o_b, lse_b = two_states(data, dtype, H=ODD_HEADS, D=ODD_DIMS)
    mo, mlse = ck.merge_state(o_a, lse_a, o_b, lse_b)
    assert mo.dtype == dtype and mlse.dtype == torch.float32
    check_state(mo, mlse, *reference.merge_state(o_a, lse_a, o_b, lse_b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_merge_writes_every_output_element(dtype, data):
    """Outputs go into NaN-poisoned ``out=`` buffers, strided ones included; nothing outside is touched."""
    o, lse = data.draw(states(dtype=dtype))
    n, _, num_heads, head_dim = o.shape
    big_o = poison(torch.empty(n, num_heads, 2 * head_dim, dtype=dtype, device=DEVICE))
    big_lse = poison(torch.empty(n, 2 * num_heads, device=DEVICE))
    strided = data.draw(st.booleans())
    out = (big_o[..., ::2], big_lse[:, ::2]) if strided else (big_o[..., :head_dim], big_lse[:, :num_heads])
    mo, mlse = ck.merge_states(o, lse, out=out)
    assert mo.data_ptr() == out[0].data_ptr() and mlse.data_ptr() == out[1].data_ptr()
    expected = reference.merge_states(o, lse)
    check_state(out[0], out[1], *expected, dtype)
    rest = (big_o[..., 1::2], big_lse[:, 1::2]) if strided else (big_o[..., head_dim:], big_lse[:, num_heads:])
    assert bool(torch.isnan(rest[0]).all()) and bool(torch.isnan(rest[1]).all()), "wrote outside out="

    o_a, lse_a, o_b, lse_b = o[:, 0], lse[:, 0], o[:, -1], lse[:, -1]
    out = (poison(torch.empty_like(o_a)), poison(torch.empty_like(lse_a)))
    ck.merge_state(o_a, lse_a, o_b, lse_b, out=out)
    check_state(*out, *reference.merge_state(o_a, lse_a, o_b, lse_b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_merge_state_in_place(dtype, data):
    o_a, lse_a, o_b, lse_b = two_states(data, dtype)
    expected = reference.merge_state(o_a.clone(), lse_a.clone(), o_b, lse_b)
    mo, mlse = ck.merge_state(o_a, lse_a, o_b, lse_b, out=(o_a, lse_a))
    assert mo.data_ptr() == o_a.data_ptr() and mlse.data_ptr() == lse_a.data_ptr()
    check_state(o_a, lse_a, *expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_merge_is_commutative_and_associative(dtype, data):
    """Within rounding: each intermediate result is rounded to ``dtype``, so compare at its tolerance."""
    o, lse = data.draw(states(k=3, dtype=dtype))
    a, b, c = [(o[:, i], lse[:, i]) for i in range(3)]
    ab = ck.merge_state(*a, *b)
    check_state(*ab, *ck.merge_state(*b, *a), dtype)
    left = ck.merge_state(*ab, *c)
    right = ck.merge_state(*a, *ck.merge_state(*b, *c))
    check_state(*left, *right, dtype)
    check_state(*left, *ck.merge_states(o, lse), dtype)
    perm = torch.tensor(data.draw(st.permutations(range(3))), device=DEVICE)
    check_state(*ck.merge_states(o[:, perm], lse[:, perm]), *ck.merge_states(o, lse), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_empty_state_is_the_identity(dtype, data):
    """Merging with ``(0, -inf)`` on either side, or merging one state alone, returns it bit for bit."""
    o, lse = data.draw(states(k=1, dtype=dtype))
    o_a, lse_a = o[:, 0], lse[:, 0]
    empty_o, empty_lse = torch.zeros_like(o_a), torch.full_like(lse_a, -math.inf)
    exact = dict(tol=(0.0, 0.0))
    for mo, mlse in (ck.merge_state(o_a, lse_a, empty_o, empty_lse),
                     ck.merge_state(empty_o, empty_lse, o_a, lse_a),
                     ck.merge_states(o, lse)):
        assert_close(mo, o_a, dtype, "o", **exact)
        assert_close(mlse, lse_a, dtype, "lse", **exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_states_merge_to_empty_without_nan(dtype):
    """All ``-inf``: the result is ``-inf`` and exactly 0, even when the ``o`` inputs hold other values."""
    n, k, num_heads, head_dim = 3, 4, 5, 40
    o = torch.randn(n, k, num_heads, head_dim, device=DEVICE).to(dtype)
    lse = torch.full((n, k, num_heads), -math.inf, device=DEVICE)
    for mo, mlse in (ck.merge_states(o, lse), ck.merge_states(torch.zeros_like(o), lse),
                     ck.merge_state(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1])):
        assert not bool(torch.isnan(mo).any()) and not bool(torch.isnan(mlse).any())
        assert bool((mo == 0).all()) and bool((mlse == -math.inf).all())


def test_merge_shapes_at_the_edges():
    """No rows, and an output dtype other than the input's through ``out=``."""
    o, lse = torch.randn(0, 2, 3, 16, device=DEVICE), torch.randn(0, 2, 3, device=DEVICE)
    mo, mlse = ck.merge_states(o, lse)
    assert mo.shape == (0, 3, 16) and mlse.shape == (0, 3)
    mo, mlse = ck.merge_state(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1])
    assert mo.shape == (0, 3, 16) and mlse.shape == (0, 3)

    o, lse = torch.randn(4, 3, 17, 40, device=DEVICE), torch.randn(4, 3, 17, device=DEVICE)
    out = (poison(torch.empty(4, 17, 40, dtype=torch.float16, device=DEVICE)), poison(torch.empty(4, 17, device=DEVICE)))
    ck.merge_states(o, lse, out=out)
    check_state(*out, *reference.merge_states(o, lse), torch.float16)


def _bad_inputs():
    """``(call, exception, message pattern)``: each bad argument must be named in the error."""
    f32 = dict(device=DEVICE)
    o, lse = torch.randn(2, 3, 4, 16, **f32), torch.randn(2, 3, 4, **f32)
    oa, la = o[:, 0], lse[:, 0]
    return [
        (lambda: ck.merge_states(o.tolist(), lse), TypeError, r"^o must be a torch\.Tensor"),
        (lambda: ck.merge_states(o[0], lse), ValueError, r"^o must be 4-D"),
        (lambda: ck.merge_states(o.to(torch.int32), lse), TypeError, r"^o must have dtype"),
        (lambda: ck.merge_states(o, lse.half()), TypeError, r"^lse must have dtype float32"),
        (lambda: ck.merge_states(o, lse.double()), TypeError, r"^lse must have dtype float32"),
        (lambda: ck.merge_states(o, lse[:, :2]), ValueError, r"^lse must have shape \[2, 3, 4\]"),
        (lambda: ck.merge_states(o, lse[..., None]), ValueError, r"^lse must have shape"),
        (lambda: ck.merge_states(o, lse, out=oa), TypeError, r"^out must be a tuple"),
        (lambda: ck.merge_states(o, lse, out=(oa[:1], la)), ValueError, r"^out\[0\] must have shape"),
        (lambda: ck.merge_states(o, lse, out=(oa, la.half())), TypeError, r"^out\[1\] must have dtype float32"),
        (lambda: ck.merge_state(oa[0], la, oa, la), ValueError, r"^o_a must be 3-D"),
        (lambda: ck.merge_state(oa, la.half(), oa, la), TypeError, r"^lse_a must have dtype float32"),
        (lambda: ck.merge_state(oa, la[:1], oa, la), ValueError, r"^lse_a must have shape"),
        (lambda: ck.merge_state(oa, la, oa[:, :3], la), ValueError, r"^o_b must have shape \[2, 4, 16\]"),
        (lambda: ck.merge_state(oa, la, oa, None), TypeError, r"^lse_b must be a torch\.Tensor"),
        (lambda: ck.merge_state(oa, la, oa, la.T), ValueError, r"^lse_b must have shape \[2, 4\]"),
        (lambda: ck.merge_state(oa, la, oa, la, out=(oa, la, la)), TypeError, r"^out must be a tuple"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_name_the_argument(case):
    call, exc, pattern = _bad_inputs()[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device (CUDA)")
def test_wrong_device_names_the_argument():
    o, lse = torch.randn(2, 3, 4, 16, device="cuda"), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"^lse must be on cuda"):
        ck.merge_states(o, lse)
    with pytest.raises(ValueError, match=r"^lse_b must be on cuda"):
        ck.merge_state(o[:, 0], lse[:, 0].cuda(), o[:, 1], lse[:, 1])


@pytest.mark.parametrize("n, k", [(2, 37), (130, 3)])
def test_merge_states_few_long_rows_and_many_short_ones(n, k):
    """Both loading shapes of ``merge_states``: a few rows of many states (a split-KV merge, several
    states per load, in chunks) and many rows of few states (one state per load). Some states empty."""
    gen = torch.Generator().manual_seed(n * 1000 + k)
    o = torch.randn(n, k, 32, 128, generator=gen).to(DEVICE)
    lse = (4 * torch.randn(n, k, 32, generator=gen)).to(DEVICE)
    lse[:, ::5] = -math.inf
    o[:, ::5] = 0.0
    out = (poison(torch.empty(n, 32, 128, device=DEVICE)), poison(torch.empty(n, 32, device=DEVICE)))
    ck.merge_states(o, lse, out=out)
    check_state(*out, *reference.merge_states(o, lse), torch.float32)
