"""What a model family is: its preset shapes and how a `transformers` config is made from a run's settings.

A family module imports nothing from the trainer but this file and `trainer.errors`, and `transformers`
only inside its functions: `trainer.config` reads the presets to validate a config on the login node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "n_kv_head", "intermediate_size", "rope_theta", "tie_embeddings")
"""The `model.*` keys that override a preset's shape (each family says which of them it takes)."""

DROPOUT_ATTRIBUTES = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout")
"""The dropout probabilities that `model.dropout` sets, on whichever of them a model's config has."""


@dataclass(frozen=True)
class Family:
    """One architecture family: `model.arch` names it.

    `make_config(model, shape, vocab_size, seq_len)` returns the `transformers` config of a model trained
    from scratch, `model` being the run's `ModelConfig` and `shape` its preset with the overrides applied.
    """

    name: str
    summary: str
    presets: dict[str, dict[str, Any]]
    shape_keys: tuple[str, ...]
    model_types: tuple[str, ...]
    """The `model_type`s of `transformers` configs it accepts from `model.init_from`; empty: any."""
    make_config: Callable[[Any, dict[str, Any], int, int], Any]
    tokenizer_vocab: int | None = None
    """The vocabulary of the family's published tokenizer: what `plan` assumes when no dataset is readable."""

    @property
    def default_size(self) -> str | None:
        return next(iter(self.presets), None)

    def shape(self, model: Any) -> dict[str, Any]:
        """The preset's shape (none for a family without presets) with the run's explicit keys applied."""
        size = model.size or self.default_size
        shape = dict(self.presets.get(size, {})) if size else {}
        for key in self.shape_keys:
            value = getattr(model, key)
            if value is not None:
                shape[key] = value
        return shape

    def problems(self, model: Any) -> list[str]:
        """What is wrong with the run's model.* keys for this family, one item per problem."""
        problems = []
        if model.size is not None and model.size not in self.presets:
            sizes = ", ".join(self.presets)
            problems.append(
                f"model.size='{model.size}' is not a {self.name} size ({sizes})"
                if sizes
                else f"model.size='{model.size}' does not apply to model.arch={self.name} (its shape comes from "
                "model.hf_config or model.init_from); set model.size=null"
            )
        foreign = [
            key for key in SHAPE_KEYS if getattr(model, key) is not None and key not in self.shape_keys
        ]
        problems += [f"model.{key} does not apply to model.arch={self.name}; remove it" for key in foreign]
        shape = self.shape(model) if not problems else {}
        heads, kv_heads, width = shape.get("n_head"), shape.get("n_kv_head"), shape.get("n_embd")
        if width and heads and width % heads:
            problems.append(f"model.n_embd={width} is not divisible by model.n_head={heads}")
        if heads and kv_heads and heads % kv_heads:
            problems.append(f"model.n_head={heads} is not divisible by model.n_kv_head={kv_heads}")
        return problems


def set_dropout(config: Any, dropout: float) -> None:
    """`model.dropout` on every dropout probability the config has (embeddings, attention, residuals)."""
    for name in DROPOUT_ATTRIBUTES:
        if hasattr(config, name):
            setattr(config, name, dropout)
