"""Launching compiled kernels with less host time than ``kernel[grid](...)``.

``kernel[grid](*args)`` binds and specializes every argument (39 runtime ones for the attention kernel),
hashes the result and looks the compiled kernel up, on each call: about 70 us of host time a launch,
measured on an H200 machine, more than a decode step takes on the GPU. ``Launcher`` keys the compiled
kernel by a cheaper tuple that is never coarser than Triton's specialization (see ``_key``), takes the
slow path once per new key, and afterwards calls the compiled kernel's launcher directly, with the
arguments ``JITFunction.run`` passes it in triton 3.6 to 3.9 (the versions this was checked against).
With any other version, under the interpreter, or if the compiled kernel does not look as expected,
every launch goes through ``kernel[grid](...)``.

A caller that repeats the same launches with other tensors of the same layout (a cascade plan, run once
per layer) can record them (``recording``) and replay each as a ``Bound``: the launch's arguments kept, the
recorded tensors swapped for the new ones, no key and no argument building.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import triton
from triton.runtime import driver

from ._triton import interpreting, version_tuple

_INT32 = (-(2**31), 2**31)
_CHECKED_VERSIONS = ((3, 6), (3, 9))
_MAX_ENTRIES = 4096  # a guard against unbounded growth (say, strides of ever-new shapes); cleared when full
_RECORDING: contextvars.ContextVar = contextvars.ContextVar("cascade_kernels_recording", default=None)


def fast_launch_supported() -> bool:
    """Whether the direct launch applies: compiled kernels on a triton version it was checked against."""
    low, high = _CHECKED_VERSIONS
    return not interpreting() and low <= version_tuple(triton.__version__) <= high and hasattr(triton, "knobs")


@functools.lru_cache(maxsize=None)
def dependent_launch(device: torch.device) -> bool:
    """Whether a kernel on ``device`` may be launched as a programmatic dependent of the one before it
    (``launch_pdl``: it starts while that one runs and waits inside for its results, which hides the gap between
    the two launches): compiled kernels on a GPU of compute capability 9 or later. Asked at every launch of the
    attention and merge kernels, so decided once a device."""
    return (device.type == "cuda" and fast_launch_supported()
            and torch.cuda.get_device_capability(device)[0] >= 9)


class Launcher:
    """``Launcher(jit_fn)(grid, *runtime_args, num_warps=None, num_stages=None, launch_pdl=False, **constexprs)``
    launches ``jit_fn`` (``None``: Triton's default; ``launch_pdl``: as a programmatic dependent of the
    stream's previous kernel, see ``dependent_launch``). Runtime arguments are positional, in signature order,
    and precede every constexpr, which are all passed by name."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        self.fast = fast_launch_supported()
        if not self.fast:
            return
        params = fn.params
        runtime = [p for p in params if not p.is_constexpr]
        if any(p.is_constexpr for p in params[: len(runtime)]):
            raise ValueError(f"{fn.__name__}: constexpr parameters must follow the runtime ones")
        self.constexpr_names = tuple(p.name for p in params[len(runtime):])
        # Triton specializes an int on its value (== 1, divisible by 16) and its range (i32 / i64), a
        # do_not_specialize int on its range only, a tensor on its dtype and 16-byte alignment.
        self.unspecialized = tuple(p.do_not_specialize for p in runtime)
        self.num_runtime = len(runtime)

    def _key(self, args, num_warps, num_stages, constexprs, device, launch_pdl=False):
        """One entry per runtime argument: finer than Triton's specialization, never coarser. The common
        classes are tested first by identity (ints are most of the arguments)."""
        key = [device, num_warps, num_stages, launch_pdl, constexprs]
        append = key.append
        low, high = _INT32
        for a, unspecialized in zip(args, self.unspecialized):
            cls = a.__class__
            if cls is int:
                append(low <= a < high if unspecialized else a)  # range only, or the value itself
            elif cls is float:
                append(float)  # never specialized
            elif isinstance(a, torch.Tensor):
                append((a.dtype, a.data_ptr() & 15 == 0))
            else:  # bool, None, numpy scalars: the class and the value
                append((cls, a))
        return tuple(key)

    def __call__(self, grid, *args, num_warps=None, num_stages=None, launch_pdl=False, **kwargs):
        if num_warps is not None:
            kwargs["num_warps"] = num_warps
        if num_stages is not None:
            kwargs["num_stages"] = num_stages
        if launch_pdl:
            kwargs["launch_pdl"] = True
        recording = _RECORDING.get()
        if not self.fast:
            self.fn[grid](*args, **kwargs)
            if recording is not None:
                recording.complete = False
            return
        if len(args) != self.num_runtime:
            raise TypeError(f"{self.fn.__name__}: expected {self.num_runtime} runtime arguments, got {len(args)}")
        constexprs = tuple(kwargs[name] for name in self.constexpr_names)
        device = driver.active.get_current_device()
        key = self._key(args, num_warps, num_stages, constexprs, device, launch_pdl)
        full = args + constexprs
        entry = self.cache.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **kwargs)
            try:
                entry = (kernel.run, kernel.function, kernel.packed_metadata, kernel.launch_metadata)
            except AttributeError:  # not the CompiledKernel this was written against
                self.fast = False
                if recording is not None:
                    recording.complete = False
                return
            if len(self.cache) >= _MAX_ENTRIES:
                self.cache.clear()
            self.cache[key] = entry
        else:
            _launch_compiled(entry, grid, full, device)
        if recording is not None:
            recording.add(entry, grid, full, device)


def _launch_compiled(entry, grid, full, device):
    """Launch a compiled kernel (``entry``: its launcher, function, metadata and metadata hook) on the device's
    current stream with its runtime and constexpr arguments ``full``, as ``JITFunction.run`` does."""
    run, function, packed_metadata, launch_metadata = entry
    stream = driver.active.get_current_stream(device)
    hooks = triton.knobs.runtime
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, function,
        packed_metadata, launch_metadata(grid, stream, *full), hooks.launch_enter_hook, hooks.launch_exit_hook,
        *full)


class Bound:
    """One recorded launch: the compiled kernel and its arguments, with the places (``slots``) where the
    recording's tensors stand. ``bound(tensors)`` launches again with ``tensors[j]`` in each such place,
    on the device's current stream; valid while every tensor keeps the dtype, shape, strides and 16-byte
    alignment the recorded one had (what Triton and the launch decisions looked at: the caller keys it)."""

    __slots__ = ("entry", "grid", "args", "slots", "device")

    def __init__(self, entry, grid, args, slots, device):
        self.entry, self.grid, self.args, self.slots, self.device = entry, grid, args, slots, device

    def __call__(self, tensors):
        args = list(self.args)
        for place, j in self.slots:
            args[place] = tensors[j]
        _launch_compiled(self.entry, self.grid, args, self.device)


class Recording:
    """The launches made while recording, in order (``launches``); ``complete`` is False where one of them
    did not take the direct path (and so cannot be replayed)."""

    def __init__(self, tensors):
        self.tensors = tuple(tensors)
        self.launches: list[Bound] = []
        self.complete = fast_launch_supported()

    def add(self, entry, grid, args, device):
        kept, slots = list(args), []
        for place, arg in enumerate(args):
            j = next((j for j, tensor in enumerate(self.tensors) if arg is tensor), None)
            if j is not None:
                slots.append((place, j))
                kept[place] = None  # filled at every replay: no reference kept to the recorded tensor
        self.launches.append(Bound(entry, grid, tuple(kept), tuple(slots), device))


@contextlib.contextmanager
def recording(tensors):
    """Record every direct launch inside the block (``Recording``), noting where ``tensors`` are passed."""
    rec = Recording(tensors)
    token = _RECORDING.set(rec)
    try:
        yield rec
    finally:
        _RECORDING.reset(token)


def layout_key(tensors) -> tuple:
    """What a recorded launch depends on in its tensors: dtype, shape, strides, 16-byte alignment, and which
    of them are one tensor (a replay puts ``tensors[j]`` wherever the recording had its j-th tensor)."""
    key = []
    for i, t in enumerate(tensors):
        alias = next(j for j in range(i + 1) if tensors[j] is t)
        key.append((t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0, alias))
    return tuple(key)
