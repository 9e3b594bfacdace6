"""The GGUF files of an export, read by a runtime that is not ours (`transformers`' GGUF loader), against the
export's safetensors: tests/test_checkpoint.py (GPT-2) and tests/test_model_families.py (Llama)."""

from __future__ import annotations

from pathlib import Path

import torch

HELD_OUT_PROMPTS = (
    "import argparse\n\ndef main(",
    "class Queue:\n    def __init__(self",
    "for line in open(path):",
)
"""Prompts the demo corpus does not hold as such."""


def assert_gguf_follows_the_export(out: Path, text: str) -> None:
    """f16: the GGUF's tokenizer encodes as the export's, and the greedy continuation of each held-out prompt (32
    tokens) is the same token for token. q8_0: the top-1 prediction agrees at >= 99% of the positions of `text`.

    transformers (4.57) reads a GPT-2 GGUF's context length into `n_ctx`, not `n_positions`, so a GPT-2 model is
    given the export's config (llama.cpp reads the key itself); a Llama model is built from the GGUF alone."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = {"config": AutoConfig.from_pretrained(out)} if reference.config.model_type == "gpt2" else {}
    f16 = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", **config).eval()
    q8 = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-q8_0.gguf", **config).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    with torch.no_grad():
        for prompt in HELD_OUT_PROMPTS:
            inputs = tokenizer(prompt, return_tensors="pt")
            assert gguf_tokenizer(prompt)["input_ids"] == inputs["input_ids"][0].tolist(), prompt
            expected, got = (
                model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                for model in (reference, f16)
            )
            assert torch.equal(got, expected), (prompt, got, expected)
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : reference.config.max_position_embeddings]
        agree = (q8(ids).logits.argmax(-1) == reference(ids).logits.argmax(-1)).float().mean().item()
    assert ids.shape[1] >= 32 and agree >= 0.99, (ids.shape, agree)
