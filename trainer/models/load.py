"""Loading a trained model from any folder: an exported HF folder, a run folder, or a checkpoint step folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from trainer.checkpoint import MODEL_CONFIG, newest_valid_step, verify_step
from trainer.checkpoint.dcp_read import load_model_state
from trainer.checkpoint.step_contents import MODEL_CODE
from trainer.config import Config, ModelConfig, load_config, model_shape
from trainer.errors import UserError
from trainer.models.families import FAMILIES, set_dropout
from trainer.models.pretrained import load_pretrained, set_causal_lm_loss, tied_names

TRAINING_INFO = "llm_training.json"
TRUST_FLAG = "--trust-remote-code"
"""How the commands that load a model (eval, export, generate, compare) allow a model's own code to run."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer_dir: Path | None
    step: int | None
    data_path: str | None


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "manifest.json").exists()


def resolve_step_dir(path: Path) -> Path:
    """A RUN_DIR means its newest valid checkpoint; a step folder must verify."""
    if (path / "checkpoints").is_dir():
        point = newest_valid_step(path / "checkpoints")
        if point is None:
            raise UserError(
                f"run folder '{path}' has no complete checkpoint; train it first or name a step folder"
            )
        return point.step_dir
    manifest, problem = verify_step(path)
    if manifest is None:
        raise UserError(
            f"'{path}' is not a complete checkpoint ({problem}); give a RUN_DIR, a step folder or an HF folder"
        )
    return path


def full_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 model state, gathered from the shards in this process, without a process group.

    FSDP (DCP): only the `model.*` entries are read, straight into tensors shaped from the checkpoint's
    index; the optimizer's entries are never opened, nothing is written elsewhere (no /tmp copy), and
    nothing is unpickled but DCP's index classes and plain data (trainer/checkpoint/dcp_read.py), so a
    checkpoint cannot run code here.

    DeepSpeed: `get_fp32_state_dict_from_zero_checkpoint` reads the fp32 weights from the optimizer
    partitions, and it unpickles DeepSpeed's own files (torch.load(weights_only=False) inside, with no
    weights_only argument to pass): load DeepSpeed checkpoints from trusted sources only
    (docs/checkpoints.md, "What loading trusts").
    """
    backend = json.loads((step_dir / "manifest.json").read_text())["backend"]
    if backend == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
    return load_model_state(step_dir / "model")


def refuse_untrusted_code(where: str, config: dict[str, Any], trust_remote_code: bool, flag: str) -> None:
    """A model config with an `auto_map` names Python files to import: only the invoking command's flag (never
    a setting saved in the folder, which whoever wrote it chose) lets them run."""
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"{where} holds a model with its own code (auto_map {config['auto_map']}); it runs only with {flag}, "
            "if you trust where it came from"
        )


def model_from_checkpoint(
    step_dir: Path,
    attn: str = "sdpa",
    dropout: float | None = None,
    trust_remote_code: bool = False,
    flag: str = TRUST_FLAG,
) -> LoadedModel:
    """The checkpoint's model (in eval mode), of its saved architecture; `dropout` replaces the run's setting.
    Code the architecture names runs only with `trust_remote_code` from the caller (whose `flag` says how)."""
    saved = step_dir / MODEL_CONFIG
    if saved.is_file():  # before any weight is read
        refuse_untrusted_code(
            f"checkpoint '{step_dir}'", json.loads(saved.read_text()), trust_remote_code, flag
        )
    config: Config = load_config(step_dir / "config.yaml")
    state = full_state_dict(step_dir)
    model_config = config.model if dropout is None else replace(config.model, dropout=dropout)
    hf_config = saved_architecture(step_dir, model_config, state)
    set_dropout(hf_config, model_config.dropout)
    model = AutoModelForCausalLM.from_config(
        hf_config, attn_implementation=attn, trust_remote_code=trust_remote_code
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied_names(model):
        raise RuntimeError(
            f"checkpoint {step_dir} does not fit its model_config.json: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    set_causal_lm_loss(model)
    return LoadedModel(model.eval(), *checkpoint_origin(step_dir))


def checkpoint_origin(step_dir: Path) -> tuple[Path | None, int, str]:
    """(the run's tokenizer folder if it is still there, the step, the run's data path) of a checkpoint step."""
    data_path = load_config(step_dir / "config.yaml").data.path
    tokenizer_dir = Path(data_path) / "tokenizer"
    step = json.loads((step_dir / "manifest.json").read_text())["step"]
    return tokenizer_dir if tokenizer_dir.is_dir() else None, step, data_path


def saved_architecture(
    step_dir: Path, model_config: ModelConfig, state: dict[str, torch.Tensor] | None = None
) -> Any:
    """The checkpoint's `transformers` config; a checkpoint written before model_config.json existed is a
    GPT-2 of the run's shape, its vocabulary and context read from the embeddings."""
    saved = step_dir / MODEL_CONFIG
    if saved.is_file():
        values = json.loads(saved.read_text())
        if values.get("auto_map"):  # allowed by the caller (refuse_untrusted_code): from the step's copy
            return _own_code_config(step_dir, values)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    state = state if state is not None else full_state_dict(step_dir)
    vocab_size, _ = state["transformer.wte.weight"].shape
    seq_len = state["transformer.wpe.weight"].shape[0]
    return FAMILIES["gpt2"].make_config(model_config, model_shape(model_config), vocab_size, seq_len)


def _own_code_config(step_dir: Path, values: dict[str, Any]) -> Any:
    """The config of a model with its own code, from the code saved in the step folder (model_code/)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    code = step_dir / MODEL_CODE
    if not code.is_dir():
        raise UserError(
            f"checkpoint '{step_dir}' holds a model with its own code (auto_map) but not the code "
            f"({MODEL_CODE}/ is missing: it was written before checkpoints kept it); export from the source folder"
        )
    config_class = get_class_from_dynamic_module(values["auto_map"]["AutoConfig"], str(code))
    values.pop("model_type", None)
    config = config_class(**values)
    config._name_or_path = str(code)  # where from_config finds the model's class
    return config


def load_any(path: str | Path, trust_remote_code: bool = False) -> LoadedModel:
    """A RUN_DIR, a checkpoint step folder, or an exported HF folder; a model's own code (an `auto_map`) runs
    only with `trust_remote_code` (the command's --trust-remote-code)."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"'{path}' does not exist; give a RUN_DIR, a checkpoint step folder or an exported HF folder"
        )
    if is_hf_folder(path):
        config = json.loads((path / "config.json").read_text())
        refuse_untrusted_code(f"'{path}'", config, trust_remote_code, TRUST_FLAG)
        model = load_pretrained(path, trust_remote_code=trust_remote_code).eval()
        set_causal_lm_loss(model)
        info_file = path / TRAINING_INFO
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        return LoadedModel(
            model,
            path if (path / "tokenizer_config.json").is_file() else None,
            info.get("step"),
            info.get("data_path"),
        )
    return model_from_checkpoint(resolve_step_dir(path), trust_remote_code=trust_remote_code)


def load_tokenizer(loaded: LoadedModel) -> PreTrainedTokenizerBase:
    if loaded.tokenizer_dir is None:
        raise UserError(
            "no tokenizer found next to this model (the run's data.path/tokenizer is gone); export from the run"
        )
    return AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
