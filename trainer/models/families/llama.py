"""Llama (`transformers.LlamaForCausalLM`): RoPE, RMSNorm, SwiGLU MLP, grouped-query attention.

The 1b and 3b presets are Llama 3.2 1B and 3B as published (meta-llama/Llama-3.2-1B and -3B config.json):
their shapes, tied embeddings, rope_theta 500000, RMSNorm epsilon 1e-5 and the "llama3" RoPE frequency scaling
(factor 32 over an original 8192-token context); 8b is Llama 3.1 8B (meta-llama/Llama-3.1-8B: untied, the
same scaling with factor 8); 150m is a 16-layer, 768-wide model of the same design; tiny is
for CPU tests and the demo.
"""

from __future__ import annotations

from typing import Any

from trainer.models.families.base import Family

PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "intermediate_size": 176,
                   "rope_theta": 10000.0, "tie_embeddings": False},
    "llama-150m": {"n_layer": 16, "n_head": 12, "n_kv_head": 4, "n_embd": 768, "intermediate_size": 2048,
                   "rope_theta": 10000.0, "tie_embeddings": False},
    "llama-1b": {"n_layer": 16, "n_head": 32, "n_kv_head": 8, "n_embd": 2048, "intermediate_size": 8192,
                 "rope_theta": 500000.0, "tie_embeddings": True},
    "llama-3b": {"n_layer": 28, "n_head": 24, "n_kv_head": 8, "n_embd": 3072, "intermediate_size": 8192,
                 "rope_theta": 500000.0, "tie_embeddings": True},
    "llama-8b": {"n_layer": 32, "n_head": 32, "n_kv_head": 8, "n_embd": 4096, "intermediate_size": 14336,
                 "rope_theta": 500000.0, "tie_embeddings": False},
}  # fmt: skip

LLAMA_3_2 = {
    "rms_norm_eps": 1e-5,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}  # fmt: skip
LLAMA_3_1 = {**LLAMA_3_2, "rope_scaling": {**LLAMA_3_2["rope_scaling"], "factor": 8.0}}
LLAMA_3_2_CONTEXT = 131072
PUBLISHED: dict[str, dict[str, Any]] = {"llama-1b": LLAMA_3_2, "llama-3b": LLAMA_3_2, "llama-8b": LLAMA_3_1}
"""What the published configs of the presets' models set beyond the shape keys; their context
(max_position_embeddings) is the published 131072 tokens whatever model.seq_len trains on, as in the released
models (RoPE has no position table: the context only bounds generation and evaluation)."""


def make_config(model: Any, shape: dict[str, Any], vocab_size: int, seq_len: int) -> Any:
    from transformers import LlamaConfig

    published = PUBLISHED.get(model.size or "", {})
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(seq_len, LLAMA_3_2_CONTEXT) if published else seq_len,
        hidden_size=shape["n_embd"],
        num_hidden_layers=shape["n_layer"],
        num_attention_heads=shape["n_head"],
        num_key_value_heads=shape["n_kv_head"],
        intermediate_size=shape["intermediate_size"],
        rope_theta=float(shape["rope_theta"]),
        tie_word_embeddings=shape["tie_embeddings"],
        attention_dropout=model.dropout,
        use_cache=False,
        **published,
    )


FAMILY = Family(
    name="llama",
    summary="Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention",
    presets=PRESETS,
    shape_keys=(
        "n_layer",
        "n_head",
        "n_embd",
        "n_kv_head",
        "intermediate_size",
        "rope_theta",
        "tie_embeddings",
    ),
    model_types=("llama",),
    make_config=make_config,
    tokenizer_vocab=128256,  # Llama 3's tokenizer
)
