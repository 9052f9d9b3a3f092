"""Tuned launch configs: one JSON file per kernel family and GPU, looked up by shape bucket.

A file ``<family>__<device-slug>.json`` (``prefill__nvidia_h200.json``) in ``cascade_kernels/configs/``,
or in the folder named by the environment variable ``CASCADE_KERNELS_CONFIG_DIR`` instead, holds::

    {"meta": {"family": "prefill", "gpu": "NVIDIA H200", "triton": "3.6.0", "torch": "2.11.0",
              "date": "2025-01-01T00:00:00Z", "commit": "<git sha>"},
     "configs": {"d128_g4_p16_bf16_q512_kv4k": {"block_m": 128, "block_n": 64, "num_warps": 8,
                                                "num_stages": 3, "prefetch": false, "waves": 2}, ...},
     "timings": {"d128_g4_p16_bf16_q512_kv4k": {"ms": 0.41, "heuristic_ms": 0.47}, ...}}

``prefetch`` (default false), ``waves`` (programs per SM the KV split count aims for, default 2),
``tma`` (block copies of page-aligned KV tiles allowed, default true) and ``lookahead`` (page ids read
one KV tile ahead, default false) may be left out. ``meta``
describes the file and is kept apart from the buckets; ``timings`` (optional) records what the tuning
measured. Files are written by ``python -m tuning`` (see ``tuning/README.md``), never by hand.

A bucket key names ``d``: the head-dim class (the power of two the kernel pads the head dim to),
``g``: the GQA group (query heads per KV head), ``p``: the page size, the dtype, ``q``: query tokens per
segment and ``kv``: KV tokens per segment (``8k`` = 8192). A lookup needs the same head-dim class and
dtype (they fix the tile's shared-memory and register footprint); among those buckets it takes the
nearest group, then the nearest page size, then the nearest query and KV lengths, all in log scale
(ties go to the larger bucket). When no file or no bucket matches, the heuristic
(:func:`cascade_kernels.attention.heuristic_config`) is used, with one warning. Nothing is ever
timed or compiled on the serving path: a lookup is a dictionary search, cached per shape.

``use_tuned_configs(False)`` switches to the heuristic everywhere (the benchmark compares both).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from . import attention as _attention
from ._triton import padded

__all__ = [
    "ENV_VAR",
    "FAMILIES",
    "Bucket",
    "ConfigFile",
    "bucket_key",
    "clear_cache",
    "config_dir",
    "config_for",
    "config_path",
    "device_name",
    "device_slug",
    "load_configs",
    "parse_bucket",
    "pinned_config",
    "select_config",
    "set_tuned_configs",
    "tuned_configs_enabled",
    "use_tuned_configs",
    "write_configs",
]

ENV_VAR = "CASCADE_KERNELS_CONFIG_DIR"
FAMILIES = ("prefill", "decode")
PACKAGE_DIR = Path(__file__).resolve().parent / "configs"
_PACKAGE_DIR_STR = str(PACKAGE_DIR)
META_KEYS = ("family", "gpu", "triton", "torch", "date", "commit")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_CONFIG_INTS = ("block_m", "block_n", "num_warps", "num_stages")
_KEY_RE = re.compile(r"d(\d+)_g(\d+)_p(\d+)_(bf16|fp16|fp32)_q(\d+k?)_kv(\d+k?)")
_FILE_RE = re.compile(r"([a-z]+)__([a-z0-9_]+)\.json")

_TUNED = True
_PINNED: dict[str, _attention.TileConfig] = {}
_WARNED: set = set()


# ------------------------------------------------------------------------------------------------------------
# The switch


def set_tuned_configs(enabled: bool) -> None:
    """Use tuned configs where a file matches (the default) or always the heuristic (``False``)."""
    global _TUNED
    if not isinstance(enabled, bool):
        raise TypeError(f"set_tuned_configs: enabled must be a bool, got {type(enabled).__name__}")
    _TUNED = enabled


def tuned_configs_enabled() -> bool:
    """Whether tuned configs are looked up (otherwise every launch uses the heuristic)."""
    return _TUNED


@contextlib.contextmanager
def use_tuned_configs(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_tuned_configs`, restoring the previous setting on exit.

    Examples
    --------
    >>> import cascade_kernels as ck
    >>> with ck.use_tuned_configs(False):   # the heuristic tile sizes, whatever files exist
    ...     pass
    """
    previous = _TUNED
    set_tuned_configs(enabled)
    try:
        yield
    finally:
        set_tuned_configs(previous)


@contextlib.contextmanager
def pinned_config(family: str, config: _attention.TileConfig) -> Iterator[None]:
    """Every launch of ``family`` uses ``config`` inside the block (the tuning script times candidates so)."""
    _check_family(family)
    if not isinstance(config, _attention.TileConfig):
        raise TypeError(f"pinned_config: config must be a TileConfig, got {type(config).__name__}")
    previous = _PINNED.get(family)
    _PINNED[family] = config
    try:
        yield
    finally:
        if previous is None:
            _PINNED.pop(family, None)
        else:
            _PINNED[family] = previous


def is_pinned(family: str) -> bool:
    """Whether ``pinned_config`` holds a config for ``family`` now: its launches then take the ``tl`` kernel with
    that tile, not a Gluon kernel of fixed shape (so that the tuning script times the candidate it names)."""
    return family in _PINNED


# ------------------------------------------------------------------------------------------------------------
# Names: devices, files, buckets


def device_slug(name: str) -> str:
    """File-name form of a GPU name: ``"NVIDIA H200"`` -> ``"nvidia_h200"``."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        raise ValueError(f"device name {name!r} has no letters or digits")
    return slug


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | str) -> str:
    """The name tuned files are keyed by: the CUDA device's name, or ``"cpu"`` (the interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def config_dir() -> Path:
    """The folder searched: ``$CASCADE_KERNELS_CONFIG_DIR`` when set, else the package's ``configs/``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else PACKAGE_DIR


def config_path(family: str, device: str, directory: str | os.PathLike | None = None) -> Path:
    """``<directory>/<family>__<device-slug>.json``; ``device`` is a GPU name as :func:`device_name` gives."""
    _check_family(family)
    return Path(directory if directory is not None else config_dir()) / f"{family}__{device_slug(device)}.json"


class Bucket(NamedTuple):
    """One shape class: head-dim class, GQA group, page size, dtype name, query and KV tokens per segment."""

    head_dim: int
    group: int
    page_size: int
    dtype: str
    q_len: int
    kv_len: int

    @property
    def key(self) -> str:
        return (f"d{self.head_dim}_g{self.group}_p{self.page_size}_{self.dtype}"
                f"_q{_fmt_len(self.q_len)}_kv{_fmt_len(self.kv_len)}")


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _parse_len(s: str) -> int:
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"no config bucket for dtype {dtype}") from None


def bucket_key(head_dim: int, group: int, page_size: int, dtype: torch.dtype, q_len: int, kv_len: int) -> str:
    """Key of the bucket for these sizes, e.g. ``bucket_key(128, 4, 16, torch.bfloat16, 1, 8192)`` is
    ``"d128_g4_p16_bf16_q1_kv8k"``; ``head_dim`` is rounded up to its class (96 -> ``d128``)."""
    return Bucket(padded(head_dim), group, page_size, _dtype_name(dtype), max(1, int(q_len)),
                  max(1, int(kv_len))).key


def parse_bucket(key: str) -> Bucket:
    """Inverse of :func:`bucket_key`; ``ValueError`` for a malformed key."""
    m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise ValueError(f"bad bucket key {key!r} (expected like 'd128_g4_p16_bf16_q1_kv8k')")
    d, g, p, dt, q, kv = m.groups()
    bucket = Bucket(int(d), int(g), int(p), dt, _parse_len(q), _parse_len(kv))
    if bucket.head_dim != padded(bucket.head_dim) or min(bucket.group, bucket.page_size, bucket.q_len,
                                                         bucket.kv_len) < 1:
        raise ValueError(f"bad bucket key {key!r}: head dim must be a power of two >= 16, sizes >= 1")
    return bucket


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}, expected one of {FAMILIES}")


# ------------------------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class ConfigFile:
    """A loaded, checked config file."""

    path: Path
    family: str
    meta: dict
    configs: dict  # Bucket -> TileConfig
    timings: dict = field(default_factory=dict)  # bucket key -> {"ms": ..., ...}


def _config_from_json(path, key, value) -> _attention.TileConfig:
    where = f"{path}: configs[{key!r}]"
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, got {type(value).__name__}")
    unknown = set(value) - set(_CONFIG_INTS) - {"prefetch", "waves", "tma", "lookahead"}
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}")
    for name in _CONFIG_INTS:
        v = value.get(name)
        if v is None:
            raise ValueError(f"{where} is missing {name!r}")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}.{name} must be an int, got {v!r}")
    for name in ("block_m", "block_n"):
        if value[name] < 16 or value[name] != padded(value[name]):
            raise ValueError(f"{where}.{name} must be a power of two >= 16, got {value[name]}")
    if value["num_warps"] not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{where}.num_warps must be a power of two <= 32, got {value['num_warps']}")
    if not 1 <= value["num_stages"] <= 8:
        raise ValueError(f"{where}.num_stages must be in [1, 8], got {value['num_stages']}")
    prefetch = value.get("prefetch", False)
    if not isinstance(prefetch, bool):
        raise ValueError(f"{where}.prefetch must be a bool, got {prefetch!r}")
    waves = value.get("waves", 2)
    if isinstance(waves, bool) or not isinstance(waves, int) or not 1 <= waves <= 16:
        raise ValueError(f"{where}.waves must be an int in [1, 16], got {waves!r}")
    tma = value.get("tma", True)
    if not isinstance(tma, bool):
        raise ValueError(f"{where}.tma must be a bool, got {tma!r}")
    lookahead = value.get("lookahead", False)
    if not isinstance(lookahead, bool):
        raise ValueError(f"{where}.lookahead must be a bool, got {lookahead!r}")
    try:
        return _attention.TileConfig(value["block_m"], value["block_n"], value["num_warps"], value["num_stages"],
                                     prefetch, waves, tma, lookahead)
    except ValueError as e:  # fields that exclude each other
        raise ValueError(f"{where}: {e}") from None


def _check_document(doc, path, family: str | None, device: str | None) -> ConfigFile:
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object with 'meta' and 'configs', got {type(doc).__name__}")
    for name in ("meta", "configs"):
        if name not in doc:
            raise ValueError(f"{path}: missing top-level key {name!r}")
    unknown = set(doc) - {"meta", "configs", "timings"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (buckets go under 'configs')")
    meta = doc["meta"]
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'meta' must be an object, got {type(meta).__name__}")
    for name in META_KEYS:
        if not isinstance(meta.get(name), str) or not meta[name]:
            raise ValueError(f"{path}: meta.{name} must be a non-empty string, got {meta.get(name)!r}")
    if meta["family"] not in FAMILIES:
        raise ValueError(f"{path}: meta.family {meta['family']!r} is not one of {FAMILIES}")
    if family is not None and meta["family"] != family:
        raise ValueError(f"{path}: meta.family is {meta['family']!r} but the file is for {family!r}")
    if device is not None and device_slug(meta["gpu"]) != device_slug(device):
        raise ValueError(f"{path}: meta.gpu is {meta['gpu']!r} but the file is for {device!r}")
    raw = doc["configs"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: 'configs' must be an object, got {type(raw).__name__}")
    configs = {}
    for key, value in raw.items():
        try:
            bucket = parse_bucket(key)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if meta["family"] == "decode" and bucket.q_len != 1:
            raise ValueError(f"{path}: decode bucket {key!r} must have q1")
        configs[bucket] = _config_from_json(path, key, value)
    timings = doc.get("timings", {})
    if not isinstance(timings, dict) or not all(isinstance(v, dict) for v in timings.values()):
        raise ValueError(f"{path}: 'timings' must be an object of objects")
    return ConfigFile(Path(path), meta["family"], dict(meta), configs, dict(timings))


def load_configs(path: str | os.PathLike, *, family: str | None = None, device: str | None = None) -> ConfigFile:
    """Read and check one config file; ``ValueError`` naming the file if it is unreadable or malformed.

    ``family`` and ``device`` (a GPU name) default to what the file name says (``prefill__nvidia_h200.json``);
    ``meta`` must agree with them.
    """
    path = Path(path)
    m = _FILE_RE.fullmatch(path.name)
    if m is not None:
        if family is None and m.group(1) in FAMILIES:
            family = m.group(1)
        if device is None:
            device = m.group(2)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return _check_document(doc, path, family, device)


def write_configs(path: str | os.PathLike, meta: Mapping[str, str], configs: Mapping[str, _attention.TileConfig],
                  timings: Mapping[str, Mapping] | None = None) -> Path:
    """Write a config file atomically (temporary file, then ``os.replace``) after checking it as
    :func:`load_configs` would; ``meta`` needs ``family, gpu, triton, torch, date, commit``."""
    path = Path(path)
    doc = {
        "meta": dict(meta),
        "configs": {key: asdict(configs[key]) for key in sorted(configs)},
        "timings": {key: dict(timings[key]) for key in sorted(timings or {})},
    }
    m = _FILE_RE.fullmatch(path.name)
    _check_document(json.loads(json.dumps(doc)), path, m.group(1) if m else None, m.group(2) if m else None)
    atomic_write_json(path, doc)
    return path


def atomic_write_json(path: Path, doc) -> None:
    """Write ``doc`` as JSON to ``path`` through a temporary file and ``os.replace``: a reader sees the
    old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------------------
# The lookup on the serving path


def _warn_once(key, message: str) -> None:
    """Warn once per ``key``, pointing at the first caller outside the package."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called _warn_once
    while frame is not None and frame.f_globals.get("__name__", "").startswith("cascade_kernels"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


@functools.lru_cache(maxsize=None)
def _cached_file(family: str, device: str, directory: str) -> ConfigFile | None:
    """The file for ``(family, device)`` in ``directory``, loaded once; None (with one warning) if absent or bad."""
    path = config_path(family, device, directory)
    if not path.is_file():
        # Tuned configs are per GPU; on the CPU (the interpreter) the heuristic is the expected choice.
        if device != "cpu":
            _warn_once(("missing", family, device, directory),
                       f"cascade_kernels: no tuned {family} configs for {device!r} ({path} does not exist); "
                       f"using the heuristic tile sizes. Generate them with `python -m tuning` (tuning/README.md).")
        return None
    try:
        return load_configs(path, family=family, device=device)
    except ValueError as e:
        _warn_once(("bad", str(path)), f"cascade_kernels: ignoring a bad config file: {e}; using the heuristic.")
        return None


def _dim_class(head_dim: int) -> int:
    """``padded(head_dim)`` (the power of two the kernel pads to, at least 16) without a call into Triton."""
    return 1 << max(4, (int(head_dim) - 1).bit_length())


def _log2_round(n: float) -> int:
    """Nearest power of two of ``n`` (at least 1), as an exponent: the lookup's cache key for a length."""
    return max(0, round(math.log2(max(n, 1.0))))


def _distance(b: Bucket, group: int, page_size: int, q_exp: int, kv_exp: int):
    lg = math.log2
    return (abs(lg(b.group) - lg(group)), abs(lg(b.page_size) - lg(page_size)),
            abs(lg(b.q_len) - q_exp) + abs(lg(b.kv_len) - kv_exp),
            -b.group, -b.page_size, -b.q_len, -b.kv_len)


@functools.lru_cache(maxsize=4096)
def _lookup(family: str, device: str, directory: str, head_dim: int, group: int, page_size: int, dtype: str,
            q_exp: int, kv_exp: int) -> _attention.TileConfig | None:
    table = _cached_file(family, device, directory)
    if table is None:
        return None
    usable = [b for b in table.configs if b.head_dim == head_dim and b.dtype == dtype]
    if not usable:
        _warn_once(("bucket", str(table.path), head_dim, dtype),
                   f"cascade_kernels: {table.path} has no {family} config for head dim {head_dim} (class) and "
                   f"{dtype}; using the heuristic tile sizes.")
        return None
    best = min(usable, key=lambda b: _distance(b, group, page_size, q_exp, kv_exp))
    return table.configs[best]


def config_for(family: str, device: str, *, head_dim: int, group: int, page_size: int, dtype: torch.dtype,
               q_len: float, kv_len: float) -> _attention.TileConfig:
    """The config for a launch on the GPU named ``device``: pinned, else tuned (nearest bucket), else heuristic."""
    pinned = _PINNED.get(family)
    if pinned is not None:
        return pinned
    if _TUNED and dtype in DTYPE_NAMES:
        directory = os.environ.get(ENV_VAR) or _PACKAGE_DIR_STR
        found = _lookup(family, device, directory, _dim_class(head_dim), group, page_size, DTYPE_NAMES[dtype],
                        _log2_round(q_len), _log2_round(kv_len))
        if found is not None:
            return found
    return _attention.heuristic_config(family, head_dim, group, dtype, page_size)


def select_config(family: str, *, head_dim: int, group: int, page_size: int, dtype: torch.dtype, q_len: float,
                  kv_len: float, device: torch.device) -> _attention.TileConfig:
    """The launch config of a ``family`` kernel on ``device`` for segments of ``q_len`` query and ``kv_len``
    KV tokens (means over segments); see :func:`config_for`. A cached lookup, never a timing run."""
    return config_for(family, device_name(device), head_dim=head_dim, group=group, page_size=page_size,
                      dtype=dtype, q_len=q_len, kv_len=kv_len)


def clear_cache() -> None:
    """Forget loaded files, lookups and warnings given (after files or ``CASCADE_KERNELS_CONFIG_DIR`` change)."""
    _cached_file.cache_clear()
    _lookup.cache_clear()
    _WARNED.clear()
