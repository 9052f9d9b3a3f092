"""The direct launch path (``cascade_kernels._launch``): its cache key never merges two argument lists that
Triton would compile differently, and cached launches compute what first launches compute."""

from __future__ import annotations

import pytest
import torch

import cascade_kernels as ck
import reference
from cascade_kernels._launch import Launcher
from conftest import DEVICE, assert_close, poison


class _Param:
    def __init__(self, name, constexpr=False, unspecialized=False):
        self.name, self.is_constexpr, self.do_not_specialize = name, constexpr, unspecialized


class _Fn:
    __name__ = "fake_kernel"
    params = [_Param("x"), _Param("n"), _Param("count", unspecialized=True), _Param("scale"),
              _Param("BLOCK", constexpr=True)]


def _launcher():
    launcher = Launcher.__new__(Launcher)
    launcher.fn, launcher.cache, launcher.fast = _Fn, {}, True
    launcher.unspecialized = tuple(p.do_not_specialize for p in _Fn.params[:4])
    launcher.num_runtime, launcher.constexpr_names = 4, ("BLOCK",)
    return launcher


def _key(x, n=64, count=3, scale=0.5, block=32, warps=4):
    return _launcher()._key((x, n, count, scale), warps, 2, (block,), 0)


def test_key_follows_what_triton_specializes():
    buf = torch.randn(64, dtype=torch.float16)
    aligned, misaligned = buf[:32], buf[1:33]  # 2-byte offset: not 16-byte aligned
    assert _key(aligned) == _key(buf[8:40])  # 16 bytes further: aligned too
    assert _key(aligned) != _key(misaligned)
    assert _key(aligned) != _key(aligned.float())  # dtype
    assert _key(aligned, n=1) != _key(aligned, n=2) != _key(aligned, n=16)  # specialized ints: by value
    assert _key(aligned, count=3) == _key(aligned, count=1000)  # do_not_specialize: range only
    assert _key(aligned, count=3) != _key(aligned, count=2**31)
    assert _key(aligned, scale=0.5) == _key(aligned, scale=3.0)  # floats are never specialized
    assert _key(aligned, block=32) != _key(aligned, block=64)  # constexprs
    assert _key(aligned, warps=4) != _key(aligned, warps=8)
    assert _key(aligned, n=True) != _key(aligned, n=1)  # a bool is not the int 1


def test_constexprs_must_follow_runtime_arguments():
    class Bad:
        __name__ = "bad"
        params = [_Param("A", constexpr=True), _Param("x")]

    launcher = Launcher.__new__(Launcher)
    if not Launcher(_Fn).fast:
        pytest.skip("the direct launch is off here (interpreter or an unchecked triton)")
    with pytest.raises(ValueError, match="constexpr"):
        launcher.__init__(Bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cached_launches_follow_alignment_and_strides(dtype):
    """The same kernel launched on aligned, misaligned and strided inputs in turn (each a cache hit or
    a new key) always matches the float64 merge."""
    torch.manual_seed(0)
    n, k, h, d = 5, 3, 4, 40
    storage = torch.randn(n * k * h * d + 8, dtype=dtype, device=DEVICE)
    lse = torch.randn(n, k, h, device=DEVICE)
    variants = [
        storage[: n * k * h * d].view(n, k, h, d),
        storage[1: 1 + n * k * h * d].view(n, k, h, d),  # misaligned
        storage[: n * k * h * d].view(n, k, h, d),       # back to aligned: a cache hit
        torch.randn(n, k, h, 2 * d, dtype=dtype, device=DEVICE)[..., :d],  # strided
    ]
    for o in variants * 2:
        want_o, want_lse = reference.merge_states(o.cpu(), lse.cpu())
        out = (poison(torch.empty(n, h, d, dtype=dtype, device=DEVICE)), poison(torch.empty(n, h, device=DEVICE)))
        got_o, got_lse = ck.merge_states(o, lse, out=out)
        assert_close(got_o, want_o, dtype, "o")
        assert_close(got_lse, want_lse, dtype, "lse")
