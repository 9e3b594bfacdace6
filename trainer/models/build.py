"""Building the model a run trains, of any family; knows nothing about parallelism (see trainer/parallel/)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from trainer.config import ModelConfig, model_shape
from trainer.errors import UserError
from trainer.models.deferred_init import Recording, record
from trainer.models.families import FAMILIES, set_dropout
from trainer.models.families.hf import load_hf_config
from trainer.models.load import is_hf_folder, model_from_checkpoint, resolve_step_dir
from trainer.models.pretrained import context_length, load_pretrained, set_causal_lm_loss

INIT_FROM_SOURCES = "an exported HF folder, a run folder, a checkpoint folder, or a model name in the local Hugging Face cache"


@dataclass(frozen=True)
class ModelFacts:
    """What the MFU and logging code need to know about the model."""

    arch: str
    n_params: int
    matmul_params: int
    """Weights that take part in a matrix product per token: every 2-D weight but the embeddings' lookups,
    plus the output layer's (the input embedding's own when tied). SwiGLU's three matrices, GQA's smaller
    K/V projections and an untied head count as what they are."""
    n_layer: int
    attention_width: int
    """Heads x head size of the queries: the width of the attention scores' products."""
    seq_len: int
    vocab_size: int

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per matmul weight, plus attention's 12 * L * width * T (PaLM, app. B)."""
        return 6 * self.matmul_params + 12 * self.n_layer * self.attention_width * self.seq_len


def model_config(cfg: ModelConfig, vocab_size: int, seq_len: int) -> Any:
    """The `transformers` config of a model of the run's family and shape, trained from scratch."""
    return FAMILIES[cfg.arch].make_config(cfg, model_shape(cfg), vocab_size, seq_len)


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    seq_len: int,
    attn: str,
    seed: int,
    init_from: str | None = None,
    verified: bool = False,
) -> PreTrainedModel:
    """A full fp32 model on the CPU: initialised from `seed`, or the weights of `init_from` (default
    model.init_from): an exported HF folder, a run folder (its newest complete checkpoint), a checkpoint step
    folder, or a Hugging Face model name. A training run builds it on rank 0 alone (`ModelRecipe.full`) and
    the backends copy its weights into their shards, so every world size and backend starts identical."""
    torch.manual_seed(seed)
    source = init_from or cfg.init_from
    if source:
        model = _pretrained(source, cfg, attn, verified)
        check_fits(model.config, source, vocab_size, seq_len)
    else:
        model = _seeded(cfg, vocab_size, seq_len, attn)
    return _training_ready(model, cfg)


def check_fits(config: Any, source: str, vocab_size: int, seq_len: int) -> None:
    """init_from's model must cover the data's vocabulary and sequence length."""
    positions = context_length(config)
    if positions < seq_len or config.vocab_size < vocab_size:
        raise UserError(
            f"model.init_from='{source}' has {positions} positions and vocab_size={config.vocab_size}, the data "
            f"needs {seq_len} and {vocab_size}; prepare the data with that model's tokenizer (llm-train prepare "
            "--tokenizer FOLDER) and a seq-len it covers"
        )


def _seeded(cfg: ModelConfig, vocab_size: int, seq_len: int, attn: str) -> PreTrainedModel:
    """A new model of the run's family and shape, initialised from the generator's current state."""
    config = model_config(cfg, vocab_size, seq_len)
    return AutoModelForCausalLM.from_config(
        config, attn_implementation=attn, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
    )


def empty_model(hf_config: Any, cfg: ModelConfig, attn: str) -> PreTrainedModel:
    """The modules of a model of shape `hf_config` (the full model's `config`), with the run's settings but
    meaningless weights: built under the caller's device context (`torch.device("meta")`, DeepSpeed's
    `zero.Init`), for a backend to shard and then fill with the full model's weights from rank 0. The config
    is copied: on rank 0 it is the full model's own, which the build must not change.

    The family's weight init is skipped (`no_init_weights`): the weights come from rank 0, and under zero.Init
    the parameters are already partitioned, empty on most ranks, where an init that writes one row (the zeroed
    padding embedding of OLMo-2, Gemma, ...) fails with an index out of bounds."""
    from transformers.modeling_utils import no_init_weights

    config = copy.deepcopy(hf_config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
        )
    model.tie_weights()  # done by the weight init that no_init_weights skips
    return _training_ready(model, cfg)


def _training_ready(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """The settings a training run needs whichever way the model was made; the same for the full model and
    the empty one that the backends shard, so that the two agree. Train mode too: `from_pretrained` and
    `model_from_checkpoint` hand back eval mode (the training loop sets the mode itself all the same)."""
    model.train()
    model.config.use_cache = False
    set_causal_lm_loss(model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_tied(model)
    return model


def check_tied(model: nn.Module) -> None:
    """Tied input and output embeddings are one tensor (sharding and loading must not split them)."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings), (
        f"tie_word_embeddings={model.config.tie_word_embeddings} but the output layer is "
        f"{'' if tied else 'not '}the input embedding"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks, found by what they are, not by the family's attribute names.

    The blocks are the classes transformers keeps whole when it splits a model (`_no_split_modules`); a model
    that names none has its blocks in its largest `ModuleList`.
    """
    unsplit = set(getattr(model, "_no_split_modules", None) or ())
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module)]
    blocks = [layers for layers in lists if all(type(layer).__name__ in unsplit for layer in layers)]
    candidates = blocks or lists
    if not candidates:
        raise RuntimeError(f"{type(model).__name__} has no list of decoder layers to shard")
    return max(candidates, key=lambda layers: sum(p.numel() for p in layers.parameters()))


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
    verified: bool = False
    """init_from is a checkpoint step whose files the ranks have checksummed already."""

    @property
    def loads_weights(self) -> bool:
        """Whether the weights come from `init_from` rather than the seed."""
        return bool(self.init_from or self.cfg.init_from)

    def full(self) -> PreTrainedModel:
        return build_model(
            self.cfg, self.vocab_size, self.seq_len, self.attn, self.seed, self.init_from, self.verified
        )

    def record(self) -> tuple[PreTrainedModel, Recording]:
        """The seeded model's construction on the meta device, recorded to be replayed tensor by tensor
        (trainer/models/deferred_init.py): the same weights as `full()`, never all at once."""
        torch.manual_seed(self.seed)
        model, recording = record(lambda: _seeded(self.cfg, self.vocab_size, self.seq_len, self.attn))
        return _training_ready(model, self.cfg), recording

    def import_model_code(self) -> None:
        """Import the model's own code (an `auto_map` of model.hf_config's or init_from's folder, with
        model.trust_remote_code=true) in this process, as building the model does on rank 0: the other ranks
        then know its classes when rank 0's config reaches them."""
        if not self.cfg.trust_remote_code:
            return
        for key, source in (
            ("model.hf_config", self.cfg.hf_config),
            ("model.init_from", self.init_from or self.cfg.init_from),
        ):
            folder = Path(source).expanduser() if source else None
            if folder is not None and is_hf_folder(folder):
                load_hf_config(str(folder), True, key)

    def empty(self, hf_config: Any) -> PreTrainedModel:
        return empty_model(hf_config, self.cfg, self.attn)


def _pretrained(source: str, cfg: ModelConfig, attn: str, verified: bool = False) -> PreTrainedModel:
    path = Path(source).expanduser()
    if path.exists() and not is_hf_folder(path):
        model = model_from_checkpoint(
            path if verified else resolve_step_dir(path),
            attn,
            cfg.dropout,
            cfg.trust_remote_code,
            "model.trust_remote_code=true",
        ).model
    else:
        config = load_hf_config(
            str(path) if path.exists() else source, cfg.trust_remote_code, "model.init_from"
        )
        set_dropout(config, cfg.dropout)
        try:
            model = load_pretrained(
                source, config=config, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
            )
        except (OSError, HFValidationError) as error:  # no weights; a missing path is no model name either
            raise UserError(
                f"model.init_from='{source}' cannot be loaded ({str(error).splitlines()[0]}); give {INIT_FROM_SOURCES}"
            ) from error
    check_family(model.config, cfg.arch, source)
    return model


def check_family(config: Any, arch: str, source: str) -> None:
    """init_from's architecture must be model.arch's: a run's settings say what it trains."""
    accepted = FAMILIES[arch].model_types
    if accepted and config.model_type not in accepted:
        raise UserError(
            f"model.init_from='{source}' is a '{config.model_type}' model but model.arch={arch}; set "
            f"model.arch={config.model_type if config.model_type in FAMILIES else 'hf'}"
        )


def model_facts(model: nn.Module, seq_len: int, arch: str) -> ModelFacts:
    """Counted on the model itself (the meta model costs no memory), so any family's numbers are its own."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = {id(p): p for p in model.parameters()}
    active = _expert_share(model)  # a token goes through top-k of a MoE layer's experts, not all of them
    matmul = round(
        sum(
            p.numel() * active.get(key, 1.0)
            for key, p in params.items()
            if (p.dim() == 2 or key in active) and key not in embeddings
        )
    )
    output = model.get_output_embeddings().weight
    if id(output) in embeddings:  # tied: the input embedding's weights also do the output product
        matmul += output.numel()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelFacts(
        arch=arch,
        n_params=sum(p.numel() for p in params.values()),
        matmul_params=matmul,
        n_layer=len(decoder_layers(model)),
        attention_width=cfg.num_attention_heads * head_dim,
        seq_len=seq_len,
        vocab_size=cfg.vocab_size,
    )


EXPERTS_PER_TOKEN = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")
EXPERT_COUNT = ("num_experts", "num_local_experts", "n_routed_experts")


def _expert_share(model: nn.Module) -> dict[int, float]:
    """{id(parameter): top-k / experts} for the parameters of a MoE model's routed experts (modules named
    `experts`: a list of expert MLPs, or fused 3-D weights), which each token uses k of; {} for a dense model."""
    cfg = model.config
    top_k = next((getattr(cfg, name) for name in EXPERTS_PER_TOKEN if getattr(cfg, name, None)), None)
    experts = next((getattr(cfg, name) for name in EXPERT_COUNT if getattr(cfg, name, None)), None)
    if not top_k or not experts:
        return {}
    return {
        id(param): top_k / experts
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "experts"
        for param in module.parameters()
    }


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place (torchtitan's per-block compile)."""
    for block in decoder_layers(model):
        block.compile()


def expected_initial_loss(vocab_size: int) -> float:
    return math.log(vocab_size)
