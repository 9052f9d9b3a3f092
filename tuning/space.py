"""What the tuning searches: the shape buckets (tasks) and, per bucket, the candidate launch configs.

A task is one bucket of ``cascade_kernels.configs`` plus the batch it is timed on. Tasks run in the
order listed, most common serving shapes first (Llama-style head dim 128, GQA group 4, page 16, bf16),
so a time budget that runs out drops the rarest buckets; those fall back to the nearest tuned bucket
or, for a head dim / dtype with none, to the heuristic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cascade_kernels import configs
from cascade_kernels._triton import padded
from cascade_kernels.attention import TileConfig, heuristic_config

# Shared memory the estimate in keep() may use per program: the H100/H200 opt-in limit, 227 KiB (the
# 128x128 prefill tile with 3 stages takes 224 KiB). Over it the launch fails and the candidate is skipped
# anyway: the estimate only saves compile time.
SMEM_LIMIT = 227 * 1024
# fp32 registers per thread the accumulator, the score tile and the query tile may take before the
# kernel spills (255 is the hardware cap; the heuristic's 128x128 tile in 8 warps with head dim 128 needs 160).
REGISTER_LIMIT = 224

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Task:
    """One bucket to tune, and the batch it is timed on (``batch`` segments of ``q_len`` / ``kv_len`` tokens)."""

    family: str
    head_dim: int
    group: int
    page_size: int
    dtype: str
    q_len: int
    kv_len: int
    batch: int
    num_kv_heads: int = 8
    more_batches: tuple = ()  # further batch sizes the bucket is timed on (geometric mean of the times)

    @property
    def batches(self) -> tuple:
        return (self.batch, *self.more_batches)

    @property
    def key(self) -> str:
        return configs.bucket_key(self.head_dim, self.group, self.page_size, self.torch_dtype, self.q_len,
                                  self.kv_len)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_class(self) -> tuple:
        """What a compiled kernel depends on besides the config: candidates checked once per class."""
        return (self.family, self.head_dim, self.group, self.page_size, self.dtype)

    def heuristic(self) -> TileConfig:
        return heuristic_config(self.family, self.head_dim, self.group, self.torch_dtype, self.page_size)


def _elem(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def keep(task: Task, c: TileConfig) -> bool:
    """Whether a candidate is worth compiling for ``task``."""
    d = padded(task.head_dim)
    e = _elem(task.dtype)
    if c.lookahead and c.num_stages < 3:
        return False  # 2 stages overlap nothing, with lookahead or without
    if c.num_stages in (3, 4) and not c.lookahead:
        return False  # page ids load in the tile's own iteration: below 5 stages nothing pipelines
    if c.lookahead and task.family == "decode" and c.num_stages > 4:
        return False  # 3-4 stages with lookahead keep as many tiles in flight as 5-8 without
    if c.num_stages > 6 and task.family == "decode" and c.block_n > 16:
        return False  # eight stages only for one-page tiles (small buffers, many programs per SM)
    if c.num_stages > 5 and task.family == "prefill":
        return False  # compute-bound: a sixth stage only takes shared memory from the tiles
    if c.prefetch and (task.family != "decode" or c.num_stages > 2 or c.block_n > 64):
        return False  # register prefetch is its own double buffer (registers), meant for memory-bound decode
    smem = c.num_stages * 2 * c.block_n * d * e + c.block_m * d * e
    regs = (c.block_m * d * 4 + c.block_m * c.block_n * 4 + c.block_m * d * e) // (4 * 32 * c.num_warps)
    if smem > SMEM_LIMIT or regs > REGISTER_LIMIT:
        return False
    if task.family == "decode":
        # one token's GQA group fills the M tile; more warps only pay off on wide KV tiles, and a 16-key
        # tile (one page: a block copy) wants many small programs per SM
        return c.block_m == min(64, padded(task.group)) and c.num_warps <= max(2, c.block_n // 16)
    # compute-bound prefill: wide KV tiles (narrow only where the head dim leaves no room), 8 warps only
    # for 128 query rows
    return (c.block_n >= 64 or d > 128) and (c.num_warps == 4 or c.block_m == 128)


def candidates(task: Task) -> list[TileConfig]:
    """The heuristic's config first (the baseline every gain is measured against), then the space: its
    tiles at the default split policy, the heuristic's tile left out whatever its ``waves`` (the second
    stage searches waves)."""
    if task.family == "decode":
        space = [TileConfig(min(64, padded(task.group)), bn, w, s, pf, lookahead=la)
                 for bn in (16, 32, 64, 128) for w in (1, 2, 4) for s in (2, 3, 4, 5, 6, 8) for pf in (False, True)
                 for la in (False, True) if not (pf and la)]  # prefetch reads a whole tile ahead already
    else:
        # page ids one tile ahead (lookahead) at 3-5 stages, and the loads of the tile's own iteration at
        # 2 (single-buffered) and 5 stages
        space = [TileConfig(bm, bn, w, s, lookahead=la) for bm in (64, 128) for bn in (32, 64, 128)
                 for w in (4, 8) for s in (2, 3, 4, 5) for la in (True, False)]
    base = task.heuristic()
    return [base] + [c for c in space if replace(c, waves=base.waves) != base and keep(task, c)]


WAVES = (1, 2, 4, 8)  # programs per SM the automatic KV split count aims for (heuristic: 2; one-page decode: 4)


def refinements(task: Task, best: TileConfig) -> list[TileConfig]:
    """The second stage: the split policy of the first stage's winner (programs per SM the automatic
    split count aims for; 2 in the first stage). One compiled kernel serves all: splits are a runtime
    argument."""
    return [replace(best, waves=w) for w in WAVES if w != best.waves]

# Timed batches per family: (q_len, kv_len, batch or batches). Decode: serving batches at short, long and
# very long contexts, three per bucket, a candidate's time the geometric mean over them. A bucket has no
# batch dimension, so its config must suit every batch it will see: a config timed on a batch of 12 picked
# 8 stages that ran 0.79 of the read ceiling at batch 128, where 6 stages ran 0.93; one timed on 151
# requests of 1k tokens picked 8 stages (6 one-warp programs resident per SM), 22% slower than 6 stages at
# 128 requests, whose 1024 programs then take 1.3 rounds. Prefill: a cascade's shared level, which is one
# segment (the decode tokens of 64 or 256 requests over one long shared prefix: a config timed on 3
# segments over 8k keys ran that level 7% slower than the heuristic), chunked prefill, and fresh prompts of
# 4k and 16k tokens. The long-context decode batches leave room for KV splits.
LENGTHS = {
    "decode": [(1, 1024, (151, 128, 256)), (1, 8192, (61, 32, 128)), (1, 65536, (9, 1, 32))],
    "prefill": [(64, 8192, 3), (64, 32768, 1), (256, 32768, 1), (512, 4096, 6), (4096, 4096, 2),
                (16384, 16384, 1)],
}

# (family, head_dim, group, page_size, dtype) in priority order.
DEFAULT_CLASSES = [
    ("decode", 128, 4, 16, "bf16"),
    ("prefill", 128, 4, 16, "bf16"),
    ("prefill", 128, 4, 256, "bf16"),  # pages of 256 (nano-vllm's): whole KV tiles are block copies
    ("decode", 128, 8, 16, "bf16"),
    ("decode", 64, 4, 16, "bf16"),
    ("prefill", 64, 4, 16, "bf16"),
    ("decode", 256, 4, 16, "bf16"),
    ("prefill", 256, 4, 16, "bf16"),
    ("decode", 128, 4, 16, "fp16"),
    ("prefill", 128, 4, 16, "fp16"),
]


def _full_classes() -> list[tuple]:
    """Every head dim 64/128/256, group 1/4/8, page 1/16/256 and bf16/fp16, the default's first."""
    rest = [(f, d, g, p, dt) for dt in ("bf16", "fp16") for p in (16, 256, 1) for g in (4, 8, 1)
            for d in (128, 64, 256) for f in ("decode", "prefill")]
    return DEFAULT_CLASSES + [c for c in rest if c not in DEFAULT_CLASSES]


def tasks(space: str, families) -> list[Task]:
    """The tasks of ``space`` ("default", "full" or "tiny") for the given families, in run order."""
    if space == "tiny":
        # The --dry-run space: odd sizes the interpreter runs in a second or two; decode on two batches.
        out = [Task("decode", 32, 2, 5, "bf16", 1, 37, 3, 2, (2,)), Task("prefill", 32, 2, 5, "bf16", 9, 20, 2, 2),
               Task("prefill", 32, 2, 5, "bf16", 3, 40, 2, 2)]
        return [t for t in out if t.family in families]
    classes = {"default": DEFAULT_CLASSES, "full": _full_classes()}[space]
    return [Task(f, d, g, p, dt, q, kv, *_batches(b)) for f, d, g, p, dt in classes if f in families
            for q, kv, b in LENGTHS[f]]


def _batches(b) -> tuple:
    """``(batch, num_kv_heads, more_batches)`` of a LENGTHS entry's batch (an int or a tuple of them)."""
    first, *more = b if isinstance(b, tuple) else (b,)
    return first, 8, tuple(more)


def tiny_candidates(task: Task) -> list[TileConfig]:
    """Three configs per task for --dry-run (the interpreter ignores warps and stages)."""
    if task.family == "decode":
        space = [TileConfig(16, 16, 4, 2), TileConfig(16, 32, 4, 2, prefetch=True)]
    else:
        space = [TileConfig(16, 16, 4, 1), TileConfig(32, 16, 4, 1)]
    base = task.heuristic()
    return [base] + [c for c in space if c != base]
