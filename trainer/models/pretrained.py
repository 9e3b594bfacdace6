"""Reading `transformers` models in fp32, and what every model needs whichever family it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def load_pretrained(source: str | Path, **kwargs: Any) -> PreTrainedModel:
    """`from_pretrained` in fp32, without the progress bar that transformers draws on stderr for every load."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def set_causal_lm_loss(model: torch.nn.Module) -> None:
    """transformers infers the loss from some class names only (not GPT2LMHeadModel's) and warns; name it."""
    model.loss_type = "ForCausalLM"


def context_length(config: Any) -> int:
    """The positions a model was built for (GPT-2's n_positions is the same attribute under its own name)."""
    return int(config.max_position_embeddings)


def tied_names(model: torch.nn.Module) -> set[str]:
    """The names under which a parameter appears a second time (tied weights; the first name is kept)."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - dict(model.named_parameters()).keys()
