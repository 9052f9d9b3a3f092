"""The direct launch path (``cascade_kernels._launch``): its cache key never merges two argument lists that
Triton would compile differently, cached launches compute what first launches compute, and a recorded
launch replays with new tensors in exactly the recorded ones' places (the layout key telling apart every
input a replay depends on). The plan-level replay is tested in ``test_cascade.py``."""

from __future__ import annotations

import pytest
import torch

import cascade_kernels as ck
import reference
from cascade_kernels import _launch
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


def _key(x, n=64, count=3, scale=0.5, block=32, warps=4, pdl=False):
    return _launcher()._key((x, n, count, scale), warps, 2, (block,), 0, pdl)


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
    assert _key(aligned) != _key(aligned, pdl=True)  # a programmatic dependent launch is compiled apart


def test_dependent_launches_only_on_hopper_or_later():
    assert not _launch.dependent_launch(torch.device("cpu"))
    if DEVICE == "cuda":
        capable = torch.cuda.get_device_capability()[0] >= 9 and _launch.fast_launch_supported()
        assert _launch.dependent_launch(torch.device("cuda", torch.cuda.current_device())) == capable


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


class _FakeDriver:
    """Stands in for ``triton.runtime.driver`` so that recorded launches run anywhere."""

    class active:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 7


def _fake_entry(calls):
    def run(*args):
        calls.append(args)

    return (run, "function", "metadata", lambda grid, stream, *args: None)


def test_recorded_launches_replay_with_the_new_tensors(monkeypatch):
    """A launch recorded with tensors ``(x, y)`` replays with other tensors in exactly their places
    (``x`` passed twice: both places), every other argument and the grid as recorded."""
    monkeypatch.setattr(_launch, "driver", _FakeDriver)
    monkeypatch.setattr(_launch, "fast_launch_supported", lambda: True)
    calls = []
    launcher = _launcher()
    x, y, other = torch.randn(8), torch.randn(8), torch.randn(8)
    launcher.cache[launcher._key((x, 64, 3, 0.5), None, None, (32,), 0)] = _fake_entry(calls)
    with _launch.recording((x, y)) as rec:
        launcher((5,), x, 64, 3, 0.5, BLOCK=32)
    assert rec.complete and len(rec.launches) == 1 and len(calls) == 1
    assert rec.launches[0].args[0] is None, "a recorded launch keeps the recorded tensor alive"
    new_x, new_y = torch.randn(8), torch.randn(8)
    rec.launches[0]((new_x, new_y))
    first, replay = calls
    assert first[:7] == replay[:7] == (5, 1, 1, 7, "function", "metadata", None) and first[7:9] == replay[7:9]
    assert first[9] is x and replay[9] is new_x and first[10:] == replay[10:] == (64, 3, 0.5, 32)

    with _launch.recording((x, other)) as rec:  # a tensor not among the arguments: no place
        launcher((5,), x, 64, 3, 0.5, BLOCK=32)
    assert rec.launches[0].slots == ((0, 0),)


def test_a_launch_off_the_direct_path_leaves_the_recording_incomplete(monkeypatch):
    monkeypatch.setattr(_launch, "driver", _FakeDriver)
    monkeypatch.setattr(_launch, "fast_launch_supported", lambda: True)
    launched = []

    class Fn(_Fn):
        def __class_getitem__(cls, grid):
            return lambda *args, **kwargs: launched.append(args)

    launcher = _launcher()
    launcher.fn, launcher.fast = Fn, False
    x = torch.randn(8)
    with _launch.recording((x,)) as rec:
        launcher((5,), x, 64, 3, 0.5, BLOCK=32)
    assert launched and not rec.complete


def test_a_dependent_launch_is_compiled_and_cached_apart(monkeypatch):
    """``launch_pdl=True`` reaches Triton's compile options on the first launch, and the launch is cached under a
    key of its own: a plain launch of the same arguments compiles its own kernel."""
    monkeypatch.setattr(_launch, "driver", _FakeDriver)
    seen = []

    class Compiled:
        run, function, packed_metadata = None, "function", "metadata"

        @staticmethod
        def launch_metadata(grid, stream, *args):
            return None

    class Fn(_Fn):
        def __class_getitem__(cls, grid):
            return lambda *args, **kwargs: seen.append(kwargs) or Compiled

    launcher = _launcher()
    launcher.fn = Fn
    x = torch.randn(8)
    launcher((5,), x, 64, 3, 0.5, BLOCK=32, launch_pdl=True)
    launcher((5,), x, 64, 3, 0.5, BLOCK=32)
    assert seen == [{"BLOCK": 32, "launch_pdl": True}, {"BLOCK": 32}]
    assert len(launcher.cache) == 2


def test_layout_key_tells_apart_what_a_replay_depends_on():
    buf = torch.randn(80, dtype=torch.float16)
    a, k = buf[:32].view(4, 8), torch.randn(2, 4, 8, dtype=torch.float16)
    key = _launch.layout_key
    k2 = k.clone()
    assert key((a, k, k)) == key((buf[8:40].view(4, 8), k2, k2))  # new tensors, same layout
    assert key((a, k, k)) != key((buf[1:33].view(4, 8), k, k))  # misaligned
    assert key((a, k, k)) != key((a.float(), k, k))  # dtype
    assert key((a, k, k)) != key((buf[:64].view(4, 16)[:, :8], k, k))  # strides
    assert key((a, k, k)) != key((a, k, k.clone()))  # k and v one tensor, then two
    assert key((a, k, k)) != key((buf[:40].view(5, 8), k, k))  # shape
