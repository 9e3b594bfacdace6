"""GPT-2 (`transformers.GPT2LMHeadModel`): learned positions, LayerNorm, GELU MLP, tied embeddings."""

from __future__ import annotations

from typing import Any

from trainer.models.families.base import Family

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64},
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-350m": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-774m": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-1.5b": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
}


def make_config(model: Any, shape: dict[str, Any], vocab_size: int, seq_len: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=model.dropout,
        embd_pdrop=model.dropout,
        attn_pdrop=model.dropout,
        use_cache=False,
        tie_word_embeddings=shape.get("tie_embeddings", True),
    )


FAMILY = Family(
    name="gpt2",
    summary="GPT-2: learned positions, LayerNorm, GELU MLP, tied embeddings",
    presets=PRESETS,
    shape_keys=("n_layer", "n_head", "n_embd", "tie_embeddings"),
    model_types=("gpt2",),
    make_config=make_config,
    tokenizer_vocab=50257,  # GPT-2's tokenizer
)
