"""The float64 reference, checked against something more obvious still, and the strategies checked too.

Every kernel test trusts ``reference``; here it is held to a per-token, per-head Python loop (a list of
logits, a max, a sum), to its own definition of cascades (any split of a sequence into levels is the
sequence), and to the merge identity. The problem strategies are checked on the way: the pages they lay
out hold the keys they claim, and every other cache slot is NaN.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from conftest import DEVICE, assert_close
from strategies import cascade_problem, decode_problem, paged_problem, partition_problem

F64 = (1e-10, 1e-10)  # two float64 computations of one formula, in different orders


def brute_force(q, k, v, q_pos, kv_pos, *, causal=True, sm_scale=None, window_left=None, softcap=None, sinks=None):
    """Attention one query token and one head at a time: collect the visible logits, take a softmax."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    o = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float64)
    lse = torch.full((num_tokens, num_q_heads), -math.inf, dtype=torch.float64)
    for t in range(num_tokens):
        qp = int(q_pos[t])
        for h in range(num_q_heads):
            kh = h // group
            logits, values = [], []
            for j in range(k.shape[0]):
                kp = int(kv_pos[j])
                if causal and (kp > qp or (window_left is not None and kp < qp - window_left)):
                    continue
                x = float(q[t, h] @ k[j, kh]) * scale
                if softcap is not None:
                    x = softcap * math.tanh(x / softcap)
                logits.append(x)
                values.append(v[j, kh])
            if sinks is not None:
                logits.append(float(sinks[h]))
                values.append(torch.zeros(head_dim, dtype=torch.float64))
            if not logits:
                continue
            m = max(logits)
            weights = [math.exp(x - m) for x in logits]
            total = sum(weights)
            lse[t, h] = m + math.log(total)
            o[t, h] = sum(w / total * val for w, val in zip(weights, values))
    return o, lse


def check_f64(actual, expected, what="o"):
    assert_close(actual, expected, torch.float64, what, tol=F64)


@given(paged_problem(max_segments=2, max_q=5, max_kv=24))
def test_attention_matches_brute_force(p):
    """reference.attention on each segment's dense keys equals the per-token loop (GQA, window, sinks...)."""
    bounds = p.qo_indptr.tolist()
    for s, (k, v, kv_pos) in enumerate(p.segment_kv):
        a, b = bounds[s], bounds[s + 1]
        o, lse = reference.attention(p.q[a:b], k, v, p.q_pos[a:b], kv_pos, **p.options)
        assert o.dtype == lse.dtype == torch.float64
        bo, blse = brute_force(p.q[a:b], k, v, p.q_pos[a:b], kv_pos, **p.options)
        check_f64(o, bo)
        check_f64(lse, blse, "lse")


def test_attention_small_cases():
    """One visible key gives its value and its logit; none gives (0, -inf); a sink alone gives (0, sink)."""
    q = torch.tensor([[[1.0] * 16]], device=DEVICE)  # [1, 1, 16]
    k = torch.full((2, 1, 16), 0.5, device=DEVICE)
    v = torch.randn(2, 1, 16, device=DEVICE)
    q_pos = torch.tensor([7], device=DEVICE)

    o, lse = reference.attention(q, k, v, q_pos, torch.tensor([7, 8], device=DEVICE))  # key at 8 is future
    check_f64(o[0, 0], v[0, 0].double())
    check_f64(lse, torch.tensor([[8.0 * 16**-0.5]], dtype=torch.float64), "lse")

    o, lse = reference.attention(q, k, v, q_pos, torch.tensor([8, 9], device=DEVICE))
    assert bool((o == 0).all()) and lse.item() == -math.inf

    o, lse = reference.attention(q, k, v, q_pos, torch.tensor([8, 9], device=DEVICE),
                                 sinks=torch.tensor([1.5], device=DEVICE))
    assert bool((o == 0).all()) and lse.item() == 1.5

    o, lse = reference.attention(q, k, v, q_pos, torch.tensor([3, 7], device=DEVICE), window_left=3)
    check_f64(o[0, 0], v[1, 0].double())  # window of 3 back from 7 is positions 4..7


@given(paged_problem())
def test_strategy_pages_hold_segments_and_poison_the_rest(p):
    """The pages of ``p.kv`` hold ``p.segment_kv``; every slot outside a segment is NaN in both caches."""
    p.kv.check_pages(p.page_size, p.k_cache.shape[0])
    for s, (k, v, kv_pos) in enumerate(p.segment_kv):
        assert torch.equal(reference.gather_segment(p.k_cache, p.kv, s), k)
        assert torch.equal(reference.gather_segment(p.v_cache, p.kv, s), v)
        assert torch.equal(reference.segment_positions(p.kv, s), kv_pos)
    used = int(p.kv.lens.sum()) * p.num_kv_heads * p.head_dim
    for cache in (p.k_cache, p.v_cache):
        assert int((~torch.isnan(cache)).sum()) == used
    assert p.q.shape == (p.qo_indptr[-1].item(), p.num_q_heads, p.head_dim) and p.q.dtype == p.dtype
    assert p.q_pos.dtype == torch.int32 and bool((p.q_pos >= 0).all())
    if not p.options["causal"]:
        assert p.options["window_left"] is None


@given(paged_problem())
def test_paged_prefill_equals_attention_on_dense_segments(p):
    """reference.paged_prefill equals reference.attention on the keys each segment was built from."""
    o, lse = reference.paged_prefill(*p.args, **p.options)
    bounds = p.qo_indptr.tolist()
    for s, (k, v, kv_pos) in enumerate(p.segment_kv):
        a, b = bounds[s], bounds[s + 1]
        do, dlse = reference.attention(p.q[a:b], k, v, p.q_pos[a:b], kv_pos, **p.options)
        check_f64(o[a:b], do)
        check_f64(lse[a:b], dlse, "lse")


@given(decode_problem())
def test_paged_decode_equals_prefill_with_one_token(p):
    assert p.q.shape[0] == p.kv.num_segments
    o, lse = reference.paged_decode(*p.decode_args, **p.options)
    po, plse = reference.paged_prefill(*p.args, **p.options)
    check_f64(o, po)
    check_f64(lse, plse, "lse")


@given(partition_problem())
def test_cascade_over_any_partition_equals_whole_sequence(p):
    """The seed problem: a sequence split into chunks at levels attends like the sequence in one piece."""
    o, lse = reference.cascade_attention(p.q, p.q_pos, p.k_cache, p.v_cache, p.levels, **p.options)
    wo, wlse = reference.attention(p.q, p.k, p.v, p.q_pos, p.kv_pos, **p.options)
    check_f64(o, wo)
    check_f64(lse, wlse, "lse")
    po, plse = reference.paged_prefill(p.q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, p.whole_kv, **p.options)
    check_f64(po, wo)
    check_f64(plse, wlse, "lse")


@given(cascade_problem(allow_gaps=True))
def test_cascade_equals_each_request_whole(p):
    """A batch's cascade equals each request's attention over its whole KV (and the flat paged layout)."""
    o, lse = reference.cascade_attention(p.q, p.q_pos, p.k_cache, p.v_cache, p.levels, **p.options)
    bounds = p.qo_indptr.tolist()
    for r, (k, v, kv_pos) in enumerate(p.request_kv):
        a, b = bounds[r], bounds[r + 1]
        ro, rlse = reference.attention(p.q[a:b], k, v, p.q_pos[a:b], kv_pos, **p.options)
        check_f64(o[a:b], ro)
        check_f64(lse[a:b], rlse, "lse")
    if p.flat_kv is not None:
        fo, flse = reference.paged_prefill(p.q, p.q_pos, p.qo_indptr, p.k_cache, p.v_cache, p.flat_kv, **p.options)
        check_f64(fo, o)
        check_f64(flse, lse, "lse")
    for level in p.levels:  # every query token belongs to exactly one segment of each level
        assert level.qo_indptr[0].item() == 0 and level.qo_indptr[-1].item() == p.q.shape[0]


@given(partition_problem(), st.data())
def test_merge_of_chunk_states_equals_whole(p, data):
    """Fact 2 of the contract: merging the states of disjoint key sets gives the state of their union."""
    options = dict(p.options, sinks=None)  # a sink is no key set; the cascade counts it once, separately
    parts = [reference.attention(p.q, p.k[a:b], p.v[a:b], p.q_pos, p.kv_pos[a:b], **options) for a, b in p.chunks]
    o = torch.stack([po for po, _ in parts], dim=1)
    lse = torch.stack([pl for _, pl in parts], dim=1)
    mo, mlse = reference.merge_states(o, lse)
    wo, wlse = reference.attention(p.q, p.k, p.v, p.q_pos, p.kv_pos, **options)
    check_f64(mo, wo)
    check_f64(mlse, wlse, "lse")
    if len(parts) >= 2:  # merge_state of two is merge_states of a pair
        i, j = data.draw(st.permutations(range(len(parts))))[:2]
        to, tlse = reference.merge_state(parts[i][0], parts[i][1], parts[j][0], parts[j][1])
        so, slse = reference.merge_states(o[:, [i, j]], lse[:, [i, j]])
        check_f64(to, so)
        check_f64(tlse, slse, "lse")


def test_merge_reference_empty_states():
    """The empty state is the identity; two empty states give (0, -inf), not NaN."""
    o = torch.randn(3, 2, 16, dtype=torch.float64)
    lse = torch.randn(3, 2, dtype=torch.float64)
    lse[0, 1] = -math.inf
    o[0, 1] = 0
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, -math.inf)
    mo, mlse = reference.merge_state(o, lse, empty_o, empty_lse)
    check_f64(mo, o)
    check_f64(mlse, lse, "lse")
    mo, mlse = reference.merge_state(empty_o, empty_lse, empty_o, empty_lse)
    assert bool((mo == 0).all()) and bool((mlse == -math.inf).all())
