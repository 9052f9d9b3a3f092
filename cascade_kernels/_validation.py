"""Argument checks shared by every entry point.

Two kinds of check live here. Shape, dtype and device checks read only tensor metadata and always run.
Value checks (page indices in range, ``indptr`` non-decreasing, ``lens`` fitting their pages) need a
device-to-host copy, so they run only while validation is on: ``set_validation(False)`` switches them
off for serving, where a plan has already checked the batch once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

_VALIDATE = True

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def set_validation(enabled: bool) -> None:
    """Turn the checks that need a device-to-host copy on (the default) or off."""
    global _VALIDATE
    if not isinstance(enabled, bool):
        raise TypeError(f"set_validation: enabled must be a bool, got {type(enabled).__name__}")
    _VALIDATE = enabled


def validation_enabled() -> bool:
    """Whether value checks that need a device-to-host copy are on."""
    return _VALIDATE


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_validation`, restoring the previous setting on exit."""
    previous = _VALIDATE
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Raise a TypeError/ValueError naming ``name`` unless ``x`` is a tensor of the given form.

    ``shape`` entries of None match any size. ``contiguous`` is for the small index and parameter
    tensors (positions, pointers, sinks) that kernels read as dense arrays.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if shape is not None:
        if len(shape) != x.dim() or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {x.stride()}")
    return x


def check_indptr(name: str, indptr: torch.Tensor, *, end: int | None = None, end_name: str = "") -> None:
    """Value checks of a CSR pointer: starts at 0, non-decreasing, ends at ``end`` (or at most it)."""
    if not _VALIDATE:
        return
    host = indptr.detach().to("cpu", torch.int64)
    if host.numel() == 0 or host[0].item() != 0:
        raise ValueError(f"{name} must start at 0, got {host[:1].tolist()}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()[:16]}")
    if end is not None and host[-1].item() != end:
        raise ValueError(f"{name} must end at {end_name} = {end}, got {host[-1].item()}")


def check_head_counts(num_q_heads: int, num_kv_heads: int) -> int:
    """Return the GQA group size, or raise if the head counts don't divide."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    return num_q_heads // num_kv_heads


def check_options(
    *,
    causal: bool,
    sm_scale: float | None,
    window_left: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    num_q_heads: int,
    head_dim: int,
    device: torch.device,
) -> float:
    """Check the attention options shared by every entry point; return the effective ``sm_scale``."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window_left is not None:
        if not causal:
            raise ValueError("window_left needs causal=True (with causal=False every key is visible)")
        if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < 0:
            raise ValueError(f"window_left must be None or an int >= 0, got {window_left!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap must be None or a float > 0, got {softcap!r}")
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    elif not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        raise ValueError(f"sm_scale must be None or a float > 0, got {sm_scale!r}")
    if sinks is not None:
        check_tensor("sinks", sinks, dtypes=(torch.float32,), shape=(num_q_heads,), device=device, contiguous=True)
    return float(sm_scale)


INT32_MAX = 2**31 - 1


def _int32_range_check(name: str, values: torch.Tensor) -> None:
    """Raise unless every value fits an int32 (positions are int32 inside the kernels)."""
    if values.numel() and int(values.max().item()) > INT32_MAX:
        raise ValueError(f"{name} must fit in int32, got a maximum of {int(values.max().item())}")
