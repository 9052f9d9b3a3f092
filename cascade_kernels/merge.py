"""Merging attention states: attention over a union of disjoint KV sets from the states of each set.

A state is ``(o, lse)``: the normalised output ``o`` and ``lse``, the fp32 natural log of the sum of
exponentials of the scaled logits, ``-inf`` (with ``o = 0``) for an empty set. Merging gives
``lse = log(sum_i exp(lse_i))`` and ``o = sum_i exp(lse_i - lse) * o_i``; the empty state is the
identity, and two empty states merge to ``-inf`` and zeros, never NaN.
"""

from __future__ import annotations

import torch

from ._launch import Launcher, dependent_launch
from ._merge_kernels import _merge_states_kernel, _merge_two_kernel
from ._triton import cdiv, interpreting, padded
from ._validation import FLOAT_DTYPES, check_tensor

_MERGE_TWO = Launcher(_merge_two_kernel)
_MERGE_STATES = Launcher(_merge_states_kernel)

__all__ = ["merge_state", "merge_states"]

# A program covers BLOCK_H heads x BLOCK_D dims; ~4096 elements keeps 16-byte loads in every thread of
# 4 warps and enough programs in flight to reach copy bandwidth (measured on an H200: 102% of the copy
# figure for 65536 rows x 32 heads x 128). With few rows (the split-KV merge of a small decode batch,
# a cascade's slots) the heads are spread over more programs instead, so that a few long merges do not
# run on a few SMs.
_ELEMENTS_PER_PROGRAM = 4096
_MIN_PROGRAMS = 128


def _blocks(num_rows: int, num_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = padded(head_dim, minimum=1)
    block_h = min(padded(num_heads, minimum=1), max(1, _ELEMENTS_PER_PROGRAM // block_d))
    # (Not under the interpreter, which runs programs one after another: there more programs only cost.)
    min_programs = 1 if interpreting() else _MIN_PROGRAMS
    while block_h > 1 and num_rows * cdiv(num_heads, block_h) < min_programs:
        block_h //= 2
    return block_h, block_d


def _states_blocking(num_rows: int, num_states: int, num_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(BLOCK_H, BLOCK_K, BLOCK_D, num_warps)`` of a k-way merge.

    Many rows: the streaming program above, one state per load, 4 warps. Few rows (fewer than
    ``_MIN_PROGRAMS``): one warp per program, loading up to ``_ELEMENTS_PER_PROGRAM`` elements of
    ``BLOCK_K`` states x ``BLOCK_H`` heads at once (all of a row's states where they fit), so there are
    many small programs each with all its loads in flight. Measured on an H200 (graph replays, 32
    heads x 128): 64 rows x 17 states 4.7 us against 20.5 with the 4-warp program (16 heads x 8 states
    per load); 32 x 3 states 2.4 us against 4.9; 1 row x 66 states 3.5 us.
    """
    if num_rows >= _MIN_PROGRAMS:
        block_h, block_d = _blocks(num_rows, num_heads, head_dim)
        return block_h, 1, block_d, 4
    block_d = padded(head_dim, minimum=1)
    per_load = max(1, _ELEMENTS_PER_PROGRAM // block_d)
    block_k = min(padded(num_states, minimum=1), per_load, 64)
    block_h = min(padded(num_heads, minimum=1), max(1, per_load // block_k))
    return block_h, block_k, block_d, 1


def _check_out(out, n, num_heads, head_dim, device):
    if out is None:
        return None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a tuple (o_out, lse_out)")
    check_tensor("out[0]", out[0], dtypes=FLOAT_DTYPES, shape=(n, num_heads, head_dim), device=device)
    check_tensor("out[1]", out[1], dtypes=(torch.float32,), shape=(n, num_heads), device=device)
    return out


def merge_state(o_a, lse_a, o_b, lse_b, *, out=None):
    """Merge two attention states into one.

    Parameters
    ----------
    o_a, o_b : torch.Tensor
        ``[n, H, D]``, fp16/bf16/fp32, any strides.
    lse_a, lse_b : torch.Tensor
        ``[n, H]`` fp32, natural log; ``-inf`` marks an empty state.
    out : tuple of torch.Tensor, optional
        ``(o_out [n, H, D], lse_out [n, H] fp32)`` to write into; may be ``(o_a, lse_a)`` for an
        in-place merge.

    Returns
    -------
    o : ``[n, H, D]`` in ``o_a``'s dtype (or ``out[0]``), lse : ``[n, H]`` fp32.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> o_a, o_b = torch.randn(2, 7, 4, 64).unbind(0)
    >>> lse_a, lse_b = torch.randn(2, 7, 4).unbind(0)
    >>> o, lse = ck.merge_state(o_a, lse_a, o_b, lse_b)   # doctest: +SKIP
    """
    check_tensor("o_a", o_a, ndim=3, dtypes=FLOAT_DTYPES)
    n, num_heads, head_dim = o_a.shape
    device = o_a.device
    check_tensor("lse_a", lse_a, dtypes=(torch.float32,), shape=(n, num_heads), device=device)
    check_tensor("o_b", o_b, dtypes=FLOAT_DTYPES, shape=(n, num_heads, head_dim), device=device)
    check_tensor("lse_b", lse_b, dtypes=(torch.float32,), shape=(n, num_heads), device=device)
    out = _check_out(out, n, num_heads, head_dim, device)
    o_out = torch.empty_like(o_a) if out is None else out[0]
    lse_out = torch.empty_like(lse_a) if out is None else out[1]
    if n == 0 or num_heads == 0:
        return o_out, lse_out
    block_h, block_d = _blocks(n, num_heads, head_dim)
    grid = (n, cdiv(num_heads, block_h))
    _MERGE_TWO(
        grid, o_a, lse_a, o_b, lse_b, o_out, lse_out,
        num_heads, head_dim,
        *o_a.stride(), *lse_a.stride(),
        *o_b.stride(), *lse_b.stride(),
        *o_out.stride(), *lse_out.stride(),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
    return o_out, lse_out


def merge_states(o, lse, *, out=None):
    """Merge the ``k`` states of each row into one.

    Parameters
    ----------
    o : torch.Tensor
        ``[n, k, H, D]``, fp16/bf16/fp32, any strides.
    lse : torch.Tensor
        ``[n, k, H]`` fp32, natural log; ``-inf`` marks an empty state.
    out : tuple of torch.Tensor, optional
        ``(o_out [n, H, D], lse_out [n, H] fp32)`` to write into.

    Returns
    -------
    o : ``[n, H, D]`` in ``o``'s dtype (or ``out[0]``'s), lse : ``[n, H]`` fp32.

    Examples
    --------
    >>> import torch, cascade_kernels as ck
    >>> o, lse = torch.randn(5, 3, 4, 64), torch.randn(5, 3, 4)
    >>> o_m, lse_m = ck.merge_states(o, lse)   # doctest: +SKIP
    >>> o_m.shape, lse_m.shape                 # doctest: +SKIP
    (torch.Size([5, 4, 64]), torch.Size([5, 4]))
    """
    check_tensor("o", o, ndim=4, dtypes=FLOAT_DTYPES)
    n, k, num_heads, head_dim = o.shape
    check_tensor("lse", lse, dtypes=(torch.float32,), shape=(n, k, num_heads), device=o.device)
    return _launch_merge_states(o, lse, _check_out(out, n, num_heads, head_dim, o.device), sinks=None)


def _launch_merge_states(o, lse, out, sinks, out_dtype=None, dependent=False):
    """Launch the k-way merge (no argument checks). ``sinks`` ``[H]`` fp32 adds one zero-valued logit per head.

    ``dependent``: ``o``/``lse`` were written by the attention launch just before on this stream; where the GPU
    allows (``_launch.dependent_launch``) the merge is launched as its programmatic dependent, so its programs
    are resident and waiting when the last attention program ends instead of launched after it (measured on an
    H200: 1.4-2.6 us less a decode step with a merge, timed eagerly)."""
    n, k, num_heads, head_dim = o.shape
    if out is None:
        out = (torch.empty((n, num_heads, head_dim), dtype=out_dtype or o.dtype, device=o.device),
               torch.empty((n, num_heads), dtype=torch.float32, device=o.device))
    o_out, lse_out = out
    if n == 0 or num_heads == 0:
        return o_out, lse_out
    block_h, block_k, block_d, num_warps = _states_blocking(n, k, num_heads, head_dim)
    grid = (n, cdiv(num_heads, block_h))
    dependent = dependent and dependent_launch(o.device)
    _MERGE_STATES(
        grid, o, lse, sinks if sinks is not None else lse, o_out, lse_out,
        k, num_heads, head_dim,
        *o.stride(), *lse.stride(), *o_out.stride(), *lse_out.stride(),
        HAS_SINKS=sinks is not None, BLOCK_K=block_k, BLOCK_H=block_h, BLOCK_D=block_d, WAIT_FOR_PRIOR=dependent,
        num_warps=num_warps, launch_pdl=dependent,
    )
    return o_out, lse_out
