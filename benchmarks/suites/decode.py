"""Decode suite: one query token per request over its paged KV (page 16).

Memory-bound: the rate is KV bytes over time, held against the read ceiling (decode reads ``B * ctx``
tokens of keys and values and writes ``B`` tokens).
"""

from __future__ import annotations

from ..layout import decode_data
from ..peers import flashinfer_peers, torch_peers
from ..runner import Case, Impl, Unavailable, Work

NAME = "decode"
REQUIRES = ("paged_decode",)
METRIC = "bytes"

FULL = [(32, 4096), (128, 4096), (128, 8192), (32, 32768), (1, 131072), (256, 1024)]
QUICK = [(2, 40), (3, 100)]
# torch.compile of flex_attention costs seconds per shape: time it on these cases only.
FLEX_CASES = {"b32_ctx4096"}
PAGE = 16


def cases(quick: bool) -> list[Case]:
    return [Case(f"b{b}_ctx{c}", {"batch": b, "ctx": c}) for b, c in (QUICK if quick else FULL)]


def check_cases(quick: bool) -> list[Case]:
    return [Case("check", {"batch": 3, "ctx": 100})]  # 100 = 6 full pages and a partial one


def build(case: Case, ctx):
    data = decode_data(case.params["batch"], case.params["ctx"], PAGE, ctx.shape, ctx.device, seed=2)
    data.tag = case.name
    return data


def reference(data):
    """float64 reference of query segments over KV segments (decode is prefill with one query)."""
    import reference as ref

    from ..layout import cpu_paged_kv

    return ref.paged_prefill(data.q.cpu(), data.q_pos.cpu(), data.qo_indptr.cpu(), data.k_cache.cpu(),
                             data.v_cache.cpu(), cpu_paged_kv(data.seg), causal=True)


def work(case: Case, shape) -> Work:
    """KV bytes (the rate's numerator); FLOPs ``4 * D`` per query head and key."""
    tokens = case.params["batch"] * case.params["ctx"]
    return Work(bytes=tokens * shape.kv_token_bytes, flops=4 * shape.head_dim * shape.num_q_heads * tokens)


def _plan_kwargs(data) -> dict:
    s = data.shape
    return dict(num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                page_size=data.seg.page_size, dtype=s.dtype, causal=True)


def ours(data) -> Impl:
    import cascade_kernels as ck

    if not hasattr(ck, "paged_decode"):
        raise Unavailable("no ck.paged_decode")
    return Impl(run=lambda: ck.paged_decode(data.q, data.q_pos, data.k_cache, data.v_cache, data.kv, causal=True))


def ours_plan(data) -> Impl:
    """The serving path: ``ck.plan_cascade`` over one level (this batch's segments) once, timed as
    planning, then ``plan.run(q, q_pos, k_cache, v_cache)``, which only launches kernels."""
    import cascade_kernels as ck

    if not hasattr(ck, "plan_cascade"):
        raise Unavailable("no ck.plan_cascade")
    held = {}

    def plan():
        level = ck.CascadeLevel(qo_indptr=data.qo_indptr, kv=data.kv)
        held["plan"] = ck.plan_cascade([level], **_plan_kwargs(data))

    plan()
    return Impl(run=lambda: held["plan"].run(data.q, data.q_pos, data.k_cache, data.v_cache), plan=plan)


def capped_flex(ctx, capped_cases):
    """The flex factory, only on ``capped_cases`` and check cases, and only with time left to compile."""

    def factory(data):
        if data.tag not in capped_cases and not data.tag.startswith("check"):
            raise Unavailable("not in FLEX_CASES (compile time)")
        if ctx.seconds_left() < 60:
            raise Unavailable("too little time left to compile")
        return torch_peers.flex(data)

    return factory


def impls(ctx) -> list:
    return [
        ("ours", ours),
        ("ours-plan", ours_plan),
        ("sdpa-flash", torch_peers.sdpa("flash")),
        ("sdpa-cudnn", torch_peers.sdpa("cudnn")),
        ("flex", capped_flex(ctx, FLEX_CASES)),
        ("naive-paged", torch_peers.naive_paged),
        ("fi-decode-tc", flashinfer_peers.decode_tc),
    ]

