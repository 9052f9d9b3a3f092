"""Merge suite: ``k`` attention states of ``n`` tokens x ``H`` heads x ``D`` merged into one.

Memory-bound: every state is read once and the result written once, so the rate (read + written
bytes over time) is held against the copy bandwidth, which counts bytes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..peers import flashinfer_peers, torch_peers
from ..runner import Case, Impl, Unavailable, Work

NAME = "merge"
REQUIRES = ("merge_state", "merge_states")
METRIC = "bytes"


def cases(quick: bool) -> list[Case]:
    n = 24 if quick else 65536
    return [Case(f"n{n}_k2", {"n": n, "k": 2}), Case(f"n{n}_k4", {"n": n, "k": 4})]


def check_cases(quick: bool) -> list[Case]:
    return [Case("check_k2", {"n": 37, "k": 2}), Case("check_k4", {"n": 37, "k": 4})]


@dataclass
class MergeData:
    """``states``: ``k`` contiguous ``(o [n, H, D], lse [n, H] fp32)``; ``stacked``: ``(o [n, k, H, D],
    lse [n, k, H])`` when ``k > 2`` (then ``states`` are views of it)."""

    states: list
    stacked: tuple | None


def build(case: Case, ctx) -> MergeData:
    """Random outputs and log-sum-exps (spread over +-6, so that the weights differ widely)."""
    torch.manual_seed(1)
    s, n, k = ctx.shape, case.params["n"], case.params["k"]
    dims = (n, s.num_q_heads, s.head_dim)
    if k == 2:
        states = [(torch.randn(dims, dtype=s.dtype, device=ctx.device),
                   3 * torch.randn(dims[:2], dtype=torch.float32, device=ctx.device)) for _ in range(k)]
        return MergeData(states, None)
    o = torch.randn((n, k, *dims[1:]), dtype=s.dtype, device=ctx.device)
    lse = 3 * torch.randn((n, k, dims[1]), dtype=torch.float32, device=ctx.device)
    return MergeData([(o[:, i], lse[:, i]) for i in range(k)], (o, lse))


def reference(data: MergeData):
    import reference as ref

    o = torch.stack([x.cpu() for x, _ in data.states], dim=1)
    lse = torch.stack([x.cpu() for _, x in data.states], dim=1)
    return ref.merge_states(o, lse)


def work(case: Case, shape) -> Work:
    """Each state read once (o and lse), the merged state written once."""
    n, k = case.params["n"], case.params["k"]
    state = n * shape.num_q_heads * (shape.head_dim * shape.elem_bytes + 4)
    return Work(bytes=(k + 1) * state, flops=3 * k * n * shape.num_q_heads * shape.head_dim, bandwidth="copy")


def ours(data: MergeData) -> Impl:
    import cascade_kernels as ck

    if data.stacked is None:
        (o_a, l_a), (o_b, l_b) = data.states
        return Impl(run=lambda: ck.merge_state(o_a, l_a, o_b, l_b), note="merge_state")
    if not hasattr(ck, "merge_states"):
        raise Unavailable("no ck.merge_states")
    o, lse = data.stacked
    return Impl(run=lambda: ck.merge_states(o, lse), note="merge_states")


def impls(ctx) -> list:
    return [("ours", ours), ("torch-merge", torch_peers.torch_merge), ("fi-merge", flashinfer_peers.merge)]
