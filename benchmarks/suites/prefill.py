"""Prefill suite: causal attention of new tokens over paged KV that ends with them.

Compute-bound: FLOPs count only visible (query, key) pairs, ``4 * D`` per pair and query head (two
matrix products of ``2 * D`` each), held against the bf16 matmul ceiling.
"""

from __future__ import annotations

from ..layout import attn_data
from ..peers import flashinfer_peers, torch_peers
from ..runner import Case, Impl, Unavailable, Work
from .decode import capped_flex, ours_plan  # ours_plan: a one-level plan, for any batch

NAME = "prefill"
REQUIRES = ("paged_prefill",)
METRIC = "flops"

# torch.compile of flex_attention costs seconds per shape: time it on these cases only (one per shape: it
# reads contiguous KV, so the page size changes nothing for it); 1 x 16384 is the prefill goal's shape.
FLEX_CASES = {"4x4096_p16", "1x16384_p256"}


def _case(name: str, new: list[int], cached: list[int], page: int) -> Case:
    return Case(name, {"new": new, "cached": cached, "page": page})


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case("2x40_p16", [40, 40], [0, 0], 16), _case("chunked_2x16_p5", [16, 9], [30, 47], 5)]
    out = []
    for b, n in ((4, 4096), (1, 16384)):
        for page in (16, 256):
            out.append(_case(f"{b}x{n}_p{page}", [n] * b, [0] * b, page))
    # chunked prefill: 8 chunks of 512 new tokens on 4K .. 32K cached tokens
    out.append(_case("chunked_8x512_p16", [512] * 8, [4096 * i for i in range(1, 9)], 16))
    return out


def check_cases(quick: bool) -> list[Case]:
    """An equal-length batch (batched peers) and a ragged one with cached tokens (lower-right causal)."""
    return [_case("check_equal", [70, 70], [0, 0], 16), _case("check_ragged", [33, 17, 1], [0, 45, 100], 16)]


def build(case: Case, ctx):
    p = case.params
    data = attn_data(p["new"], p["cached"], p["page"], ctx.shape, ctx.device, seed=3)
    data.tag = case.name
    return data


def reference(data):
    from .decode import reference as attn_reference

    return attn_reference(data)


def visible_pairs(new: list[int], cached: list[int]) -> int:
    """Causal (query, key) pairs: query ``i`` of a segment sees ``cached + i + 1`` keys."""
    return sum(n * c + n * (n + 1) // 2 for n, c in zip(new, cached))


def work(case: Case, shape) -> Work:
    """FLOPs ``4 * D * Hq`` per visible pair; bytes: q and o once, every KV token once."""
    new, cached = case.params["new"], case.params["cached"]
    tokens, kv_tokens = sum(new), sum(new) + sum(cached)
    return Work(bytes=2 * tokens * shape.q_token_bytes + kv_tokens * shape.kv_token_bytes,
                flops=4 * shape.head_dim * shape.num_q_heads * visible_pairs(new, cached))


def ours(data) -> Impl:
    import cascade_kernels as ck

    if not hasattr(ck, "paged_prefill"):
        raise Unavailable("no ck.paged_prefill")
    return Impl(run=lambda: ck.paged_prefill(data.q, data.q_pos, data.qo_indptr, data.k_cache, data.v_cache,
                                             data.kv, causal=True))


def impls(ctx) -> list:
    return [
        ("ours", ours),
        ("ours-plan", ours_plan),
        ("sdpa-flash", torch_peers.sdpa("flash")),
        ("sdpa-cudnn", torch_peers.sdpa("cudnn")),
        ("flex", capped_flex(ctx, FLEX_CASES)),
        ("naive-paged", torch_peers.naive_paged),
        ("fi-prefill-fa3", flashinfer_peers.prefill("fa3")),
        ("fi-prefill-fa2", flashinfer_peers.prefill("fa2")),
    ]
