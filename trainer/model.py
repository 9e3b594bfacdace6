"""GPT-2 as `transformers.GPT2LMHeadModel`; knows nothing about parallelism (see trainer/parallel/)."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from trainer.config import ModelConfig, model_shape
from trainer.errors import UserError

log = logging.getLogger(__name__)


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(requested: str, device: torch.device) -> str:
    """SPEC 5: flash-attn on CUDA >= 8.0 when importable, else SDPA, else eager. The choice is logged."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    flash_ok = capability is not None and capability >= (8, 0) and flash_attn_importable()
    if requested == "auto":
        if flash_ok:
            choice = "flash_attention_2"
        elif hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            choice = "sdpa"
        else:
            choice = "eager"
    elif requested == "flash_attention_2" and not flash_ok:
        raise UserError(
            "model.attn=flash_attention_2 needs the flash-attn package and a CUDA GPU of compute capability >= 8.0 "
            f"(device {device}, capability {capability}, flash-attn importable: {flash_attn_importable()}); "
            "use model.attn=auto or install the [flash] extra"
        )
    else:
        choice = requested
    log.info("attention implementation: %s (requested %s, device %s)", choice, requested, device)
    return choice


@dataclass(frozen=True)
class ModelFacts:
    """What the MFU and logging code need to know about the model."""

    n_params: int
    n_layer: int
    n_embd: int
    seq_len: int
    vocab_size: int

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the matmuls plus the attention term 12 * L * d * T (PaLM appendix B)."""
        return 6 * self.n_params + 12 * self.n_layer * self.n_embd * self.seq_len


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


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, attn: str, seed: int) -> GPT2LMHeadModel:
    """A full fp32 model on the CPU, initialised from `seed`, so every rank and backend starts identical."""
    torch.manual_seed(seed)
    if cfg.init_from:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.init_from, attn_implementation=attn, torch_dtype=torch.float32
            )
        except OSError as error:
            raise UserError(
                f"model.init_from='{cfg.init_from}' cannot be loaded ({error}); give an exported HF folder"
            ) from error
        if model.config.n_positions < seq_len:
            raise UserError(
                f"model.init_from has n_positions={model.config.n_positions} < data seq_len {seq_len}"
            )
    else:
        model = GPT2LMHeadModel._from_config(gpt2_config(cfg, vocab_size, seq_len), attn_implementation=attn)
    model.config.use_cache = False
    set_causal_lm_loss(model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.lm_head.weight is model.transformer.wte.weight, "input and output embeddings must stay tied"
    return model


def set_causal_lm_loss(model: torch.nn.Module) -> None:
    """transformers cannot infer the loss from the class name GPT2LMHeadModel and warns; name it."""
    model.loss_type = "ForCausalLM"


def model_facts(model: GPT2LMHeadModel, seq_len: int) -> ModelFacts:
    # Tied embeddings are counted once; position embeddings do no matmul work.
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    cfg = model.config
    return ModelFacts(n_params, cfg.n_layer, cfg.n_embd, seq_len, cfg.vocab_size)


def compile_blocks(model: GPT2LMHeadModel) -> None:
    """torch.compile each transformer block in place (torchtitan's per-block compile)."""
    for block in model.transformer.h:
        block.compile()


def expected_initial_loss(vocab_size: int) -> float:
    return math.log(vocab_size)
