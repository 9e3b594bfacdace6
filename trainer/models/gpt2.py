"""GPT-2 as `transformers.GPT2LMHeadModel`: its config from ours, and loading saved weights in fp32."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from trainer.config import ModelConfig, model_shape


def gpt2_config(cfg: ModelConfig, vocab_size: int, seq_len: int) -> GPT2Config:
    shape = model_shape(cfg)
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        use_cache=False,
        tie_word_embeddings=True,
    )


def load_pretrained(source: str | Path, **kwargs: object) -> GPT2LMHeadModel:
    """`from_pretrained` in fp32, without the bar that transformers 5 draws on stderr for every load."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def set_causal_lm_loss(model: torch.nn.Module) -> None:
    """transformers cannot infer the loss from the class name GPT2LMHeadModel and warns; name it."""
    model.loss_type = "ForCausalLM"


# The buffers that GPT2Attention.__init__ computes and no state dict carries (persistent=False).
_NON_PERSISTENT = {"bias", "masked_bias"}


@torch.no_grad()
def init_non_persistent_buffers(model: torch.nn.Module) -> None:
    """Recompute, in place, the buffers that a state dict does not carry, as GPT2Attention.__init__ does.

    A model built on the meta device and then `to_empty`-ed holds uninitialised memory in every tensor;
    loading a state dict fills the parameters but not these: `bias` is the causal mask that eager
    attention reads. Any other non-persistent buffer (a transformers upgrade) fails here rather than
    training with garbage.
    """
    for name, module in model.named_modules():
        buffers = set(module._non_persistent_buffers_set)
        if not buffers:
            continue
        if not isinstance(module, GPT2Attention) or not buffers <= _NON_PERSISTENT:
            raise RuntimeError(
                f"{name} ({type(module).__name__}) has buffers {sorted(buffers)} to initialise"
            )
        if "bias" in buffers:  # the causal mask, (1, 1, n_positions, n_positions)
            size = module.bias.shape[-1]
            mask = torch.tril(torch.ones((size, size), dtype=torch.bool, device=module.bias.device))
            module.bias.copy_(mask.view(1, 1, size, size))
        if "masked_bias" in buffers:
            module.masked_bias.fill_(-1e4)
