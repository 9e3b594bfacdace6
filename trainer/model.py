"""GPT-2 as `transformers.GPT2LMHeadModel`; knows nothing about parallelism (see trainer/parallel/)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from trainer.config import ModelConfig, model_shape
from trainer.errors import UserError

log = logging.getLogger(__name__)


@functools.cache
def flash_attn_importable() -> bool:
    """flash-attn installed and loadable: a build for another torch or CUDA fails to import."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception as error:  # ImportError or OSError (undefined symbol, missing library)
        log.warning("flash-attn is installed but does not import (%s); it is not used", error)
        return False
    return True


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


def build_model(
    cfg: ModelConfig, vocab_size: int, seq_len: int, attn: str, seed: int, init_from: str | None = None
) -> GPT2LMHeadModel:
    """A full fp32 model on the CPU, so every rank and backend starts identical: initialised from `seed`,
    or the weights of `init_from` (default model.init_from): an exported HF folder, a run folder (its newest
    complete checkpoint), a checkpoint step folder, or a Hugging Face model name."""
    torch.manual_seed(seed)
    source = init_from or cfg.init_from
    if source:
        model = _pretrained(source, cfg, attn)
        if model.config.n_positions < seq_len or model.config.vocab_size < vocab_size:
            raise UserError(
                f"model.init_from='{source}' has n_positions={model.config.n_positions} and vocab_size="
                f"{model.config.vocab_size}, the data needs {seq_len} and {vocab_size}; prepare the data with "
                "that model's tokenizer (llm-train prepare --tokenizer FOLDER) and a seq-len it covers"
            )
    else:
        model = GPT2LMHeadModel._from_config(gpt2_config(cfg, vocab_size, seq_len), attn_implementation=attn)
    model.config.use_cache = False
    set_causal_lm_loss(model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.lm_head.weight is model.transformer.wte.weight, "input and output embeddings must stay tied"
    return model


def _pretrained(source: str, cfg: ModelConfig, attn: str) -> GPT2LMHeadModel:
    from trainer.hf_export import is_hf_folder, model_from_checkpoint, resolve_step_dir

    path = Path(source).expanduser()
    if path.exists() and not is_hf_folder(path):
        return model_from_checkpoint(resolve_step_dir(path), attn, cfg.dropout).model.train()
    dropout = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    try:
        return load_pretrained(source, attn_implementation=attn, **dropout)
    except OSError as error:
        raise UserError(
            f"model.init_from='{source}' cannot be loaded ({str(error).splitlines()[0]}); give an exported HF "
            "folder, a run folder, a checkpoint folder, or a model name in the local Hugging Face cache"
        ) from error


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
