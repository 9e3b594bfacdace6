"""Any decoder-only `transformers` causal LM (Qwen2/3, Mistral, Llama, GPT-NeoX, ...) by its config.

Its architecture comes from `model.hf_config` (a folder holding a config.json, or a model name in the
local Hugging Face cache) for a model trained from scratch, or from `model.init_from` with its weights.
The shape keys set the config's standard attributes; the vocabulary is the data's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.models.families.base import Family, set_dropout

ATTRIBUTES = {
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_embd": "hidden_size",
    "n_kv_head": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
}
"""Our shape keys and the `transformers` config attributes they set."""


HF_SOURCES = "a folder with a config.json or a model name in the local Hugging Face cache"


def load_hf_config(source: str, trust_remote_code: bool, key: str, expected: str = HF_SOURCES) -> Any:
    """The `transformers` config of `source`, named by config key `key` in every error.

    Code shipped with a model folder runs only with model.trust_remote_code=true; a decoder-only causal LM
    is required (an encoder-decoder or a classifier cannot train on next-token prediction here).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise UserError(
                f"{key}='{source}' ships its own model code, which runs only when asked: set "
                "model.trust_remote_code=true if you trust it"
            ) from error
        raise UserError(
            f"{key}='{source}' has no usable config.json: {str(error).splitlines()[0]}"
        ) from error
    except OSError as error:
        raise UserError(
            f"{key}='{source}' cannot be loaded ({str(error).splitlines()[0]}); give {expected}"
        ) from error
    remote = bool(getattr(config, "auto_map", None)) and trust_remote_code
    if getattr(config, "is_encoder_decoder", False) or not (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or remote
    ):
        raise UserError(
            f"{key}='{source}' is a '{config.model_type}' model, not a decoder-only causal LM; "
            "give a model that transformers' AutoModelForCausalLM builds"
        )
    return config


def make_config(model: Any, shape: dict[str, Any], vocab_size: int, seq_len: int) -> Any:
    if model.hf_config is None:
        raise UserError("model.arch=hf needs model.hf_config (a config folder) or model.init_from (weights)")
    config = load_hf_config(
        str(Path(model.hf_config).expanduser()), model.trust_remote_code, "model.hf_config"
    )
    for key, value in shape.items():
        setattr(config, ATTRIBUTES[key], value)
    config.vocab_size = vocab_size
    if getattr(config, "max_position_embeddings", seq_len) < seq_len:
        config.max_position_embeddings = seq_len
    config.use_cache = False
    set_dropout(config, model.dropout)
    return config


FAMILY = Family(
    name="hf",
    summary="any decoder-only transformers causal LM, by model.hf_config or model.init_from",
    presets={},
    shape_keys=tuple(ATTRIBUTES),
    model_types=(),
    make_config=make_config,
)
