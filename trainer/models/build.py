"""Building the model a run trains; knows nothing about parallelism (see trainer/parallel/)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.config import ModelConfig
from trainer.errors import UserError
from trainer.models.gpt2 import gpt2_config, load_pretrained, set_causal_lm_loss
from trainer.models.load import is_hf_folder, model_from_checkpoint, resolve_step_dir


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


def build_model(
    cfg: ModelConfig, vocab_size: int, seq_len: int, attn: str, seed: int, init_from: str | None = None
) -> GPT2LMHeadModel:
    """A full fp32 model on the CPU: initialised from `seed`, or the weights of `init_from` (default
    model.init_from): an exported HF folder, a run folder (its newest complete checkpoint), a checkpoint step
    folder, or a Hugging Face model name. A training run builds it on rank 0 alone (`ModelRecipe.full`) and
    the backends copy its weights into their shards, so every world size and backend starts identical."""
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
    return _training_ready(model, cfg)


def empty_model(hf_config: GPT2Config, cfg: ModelConfig, attn: str) -> GPT2LMHeadModel:
    """The modules of a model of shape `hf_config` (the full model's `config`), with the run's settings but
    meaningless weights: built under the caller's device context (`torch.device("meta")`, DeepSpeed's
    `zero.Init`), for a backend to shard and then fill with the full model's weights from rank 0. The config
    is copied: on rank 0 it is the full model's own, which the build must not change."""
    config = copy.deepcopy(hf_config)
    model = GPT2LMHeadModel._from_config(config, attn_implementation=attn, dtype=torch.float32)
    return _training_ready(model, cfg)


def _training_ready(model: GPT2LMHeadModel, cfg: ModelConfig) -> GPT2LMHeadModel:
    """The settings a training run needs whichever way the model was made; the same for the full model and
    the empty one that the backends shard, so that the two agree. Train mode too: `from_pretrained` and
    `model_from_checkpoint` hand back eval mode (the training loop sets the mode itself all the same)."""
    model.train()
    model.config.use_cache = False
    set_causal_lm_loss(model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.lm_head.weight is model.transformer.wte.weight, "input and output embeddings must stay tied"
    return model


@dataclass(frozen=True)
class ModelRecipe:
    """What decides a run's initial model, without building it.

    A backend builds from it where the weights are to live: `full()` (the seeded model, or the weights of
    `init_from`) on one rank per job, and `empty_model` of the same shape on every rank to shard; see
    trainer/parallel/__init__.py `model_source`. A job then holds one full copy at start-up, not one per rank.
    """

    cfg: ModelConfig
    vocab_size: int
    seq_len: int
    attn: str
    seed: int
    init_from: str | None = None

    def full(self) -> GPT2LMHeadModel:
        return build_model(self.cfg, self.vocab_size, self.seq_len, self.attn, self.seed, self.init_from)

    def empty(self, hf_config: GPT2Config) -> GPT2LMHeadModel:
        return empty_model(hf_config, self.cfg, self.attn)


def _pretrained(source: str, cfg: ModelConfig, attn: str) -> GPT2LMHeadModel:
    path = Path(source).expanduser()
    if path.exists() and not is_hf_folder(path):
        return model_from_checkpoint(resolve_step_dir(path), attn, cfg.dropout).model
    dropout = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    try:
        return load_pretrained(source, attn_implementation=attn, **dropout)
    except (OSError, HFValidationError) as error:  # not found; a missing path is no valid model name either
        raise UserError(
            f"model.init_from='{source}' cannot be loaded ({str(error).splitlines()[0]}); give an exported HF "
            "folder, a run folder, a checkpoint folder, or a model name in the local Hugging Face cache"
        ) from error


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
