"""Loading a run configuration: YAML + `key=value` overrides, every problem reported at once, the batch plan.

The sections themselves, with the docstrings docs/config.md is generated from, are in
trainer/config_schema.py; everything is importable from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from trainer.config_schema import (
    ATTENTION,
    BACKENDS,
    CONFIGS_DIR,
    LOAD_MODES,
    NONFINITE_ACTIONS,
    PRECISIONS,
    RESUME_MODES,
    WANDB_MODES,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    ParallelConfig,
    ProfileConfig,
    RunConfig,
    SlurmConfig,
    StreamConfig,
    TrainConfig,
)
from trainer.errors import UserError
from trainer.models.families import FAMILIES

__all__ = [
    "CONFIGS_DIR",
    "BACKENDS",
    "ATTENTION",
    "PRECISIONS",
    "WANDB_MODES",
    "NONFINITE_ACTIONS",
    "RESUME_MODES",
    "LOAD_MODES",
    "RunConfig",
    "StreamConfig",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "CheckpointConfig",
    "EvalConfig",
    "LogConfig",
    "SlurmConfig",
    "ProfileConfig",
    "Config",
    "FAMILIES",
    "BatchPlan",
    "batch_plan",
    "resolve_config_path",
    "load_config",
    "validate",
    "model_shape",
    "to_yaml",
    "config_hash",
    "write_config",
]


@dataclass(frozen=True)
class BatchPlan:
    """How the fixed global batch is split over devices and accumulation steps."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    grad_accum: int
    seq_len: int | None = None

    @property
    def tokens_per_step(self) -> int | None:
        return None if self.seq_len is None else self.global_batch_size * self.seq_len

    def describe(self) -> str:
        tokens = f", tokens/step {self.tokens_per_step}" if self.seq_len else ""
        return (
            f"global batch {self.global_batch_size} = micro {self.micro_batch_size} x world size "
            f"{self.world_size} x accumulation {self.grad_accum}{tokens}"
        )


def batch_plan(train: TrainConfig, world_size: int, seq_len: int | None = None) -> BatchPlan:
    """Derive gradient accumulation; a remainder is a user error naming the three numbers."""
    per_pass = train.micro_batch_size * world_size
    if world_size < 1 or per_pass < 1 or train.global_batch_size % per_pass:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x world size {world_size}; "
            f"choose a global batch that is a multiple of {max(per_pass, 1)} or change the micro batch"
        )
    return BatchPlan(
        train.global_batch_size,
        train.micro_batch_size,
        world_size,
        train.global_batch_size // per_pass,
        seq_len,
    )


def resolve_config_path(
    name_or_path: str, folder: Path = CONFIGS_DIR, what: str = "config file", name_kind: str = "preset name"
) -> Path:
    """A path to a YAML file, or the name of a shipped one in `folder` (presets: `tiny`, `gpt2-124m`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = folder / f"{name_or_path}.yaml"
    if "/" not in name_or_path and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
    raise UserError(f"{what} '{name_or_path}' does not exist; pass a YAML path or a {name_kind} ({names})")


def _rename_keywords(node: Any) -> Any:
    """Map YAML keys that are Python keywords onto their dataclass field names."""
    if OmegaConf.is_dict(node) and "checkpoint" in node and OmegaConf.is_dict(node.checkpoint):
        ckpt = node.checkpoint
        if "async" in ckpt:
            ckpt["async_save"] = ckpt.pop("async")
    return node


def _explain(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or ""
    key = key.replace("async_save", "async")
    if isinstance(error, ConfigKeyError):
        return f"unknown config key '{key}'; remove it or check the spelling against docs/config.md"
    if isinstance(error, MissingMandatoryValue):
        return f"config key '{key}' is required; set it in the YAML or pass {key}=VALUE"
    if isinstance(error, ValidationError):
        message = str(error).splitlines()[0]
        return f"config key '{key}': {message}"
    return f"config error at '{key}': {str(error).splitlines()[0]}"


def _parse_overrides(overrides: list[str]) -> Any:
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise UserError(f"override '{bad[0]}' is not key=value; write it like train.lr=3e-4")
    renamed = [item.replace("checkpoint.async=", "checkpoint.async_save=", 1) for item in overrides]
    return OmegaConf.from_dotlist(renamed)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or preset name) plus `key=value` overrides into a validated Config."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        file = resolve_config_path(str(path))
        try:
            loaded = OmegaConf.load(file)
        except Exception as error:  # yaml.YAMLError and friends
            raise UserError(
                f"config file '{file}' is not valid YAML: {str(error).splitlines()[0]}"
            ) from error
        if not OmegaConf.is_dict(loaded):
            raise UserError(f"config file '{file}' must hold a mapping of sections (run:, data:, ...)")
        layers.append(_rename_keywords(loaded))
    layers.append(_parse_overrides(list(overrides)))
    try:
        merged = OmegaConf.merge(schema, *layers)
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise UserError(_explain(error)) from error
    validate(config)
    return config


def _range_problems(config: Config) -> list[str]:
    checks = [
        ("train.global_batch_size", config.train.global_batch_size, 1),
        ("train.micro_batch_size", config.train.micro_batch_size, 1),
        ("train.max_steps", config.train.max_steps, 1),
        ("train.warmup_steps", config.train.warmup_steps, 0),
        ("checkpoint.every_steps", config.checkpoint.every_steps, 1),
        ("checkpoint.keep_last", config.checkpoint.keep_last, 1),
        ("eval.every_steps", config.eval.every_steps, 0),
        ("eval.batches", config.eval.batches, 1),
        ("log.every_steps", config.log.every_steps, 1),
        ("data.num_workers", config.data.num_workers, 0),
        ("data.num_canonical_nodes", config.data.num_canonical_nodes, 1),
        ("parallel.timeout_s", config.parallel.timeout_s, 1),
        ("slurm.max_requeues", config.slurm.max_requeues, 0),
        ("train.max_nonfinite", config.train.max_nonfinite, 0),
        ("train.loss_spike_factor", config.train.loss_spike_factor, 0),
        ("train.grad_clip", config.train.grad_clip, 0),
        ("train.lr", config.train.lr, 0),
        ("train.min_lr", config.train.min_lr, 0),
    ]
    return [f"{key}={value} must be >= {low}" for key, value, low in checks if value < low]


def validate(config: Config) -> None:
    """Report every problem at once, in one line, each naming its key."""
    problems = _range_problems(config) + config.data.problems() + config.profile.problems()
    choices = [
        ("model.arch", config.model.arch, tuple(FAMILIES)),
        ("model.attn", config.model.attn, ATTENTION),
        ("parallel.backend", config.parallel.backend, BACKENDS),
        ("train.precision", config.train.precision, PRECISIONS),
        ("log.wandb", config.log.wandb, WANDB_MODES),
        ("train.on_nonfinite", config.train.on_nonfinite, NONFINITE_ACTIONS),
        ("checkpoint.load", config.checkpoint.load, LOAD_MODES),
    ]
    problems += [
        f"{key}='{value}' is not one of {', '.join(allowed)}"
        for key, value, allowed in choices
        if value not in allowed
    ]
    shard = config.parallel.shard
    if shard not in ("full", "node", "auto") and not (shard.isdigit() and int(shard) >= 1):
        problems.append(f"parallel.shard='{shard}' is not full, node, auto or a whole number of ranks >= 1")
    if config.train.precision == "fp16" and config.parallel.backend != "deepspeed":
        problems.append("train.precision=fp16 needs parallel.backend=deepspeed; use bf16 with fsdp")
    if config.train.micro_batch_size > config.train.global_batch_size:
        problems.append(
            f"train.micro_batch_size={config.train.micro_batch_size} exceeds train.global_batch_size={config.train.global_batch_size}"
        )
    if any(index < 0 for index in config.train.skip_batches):
        problems.append(f"train.skip_batches={config.train.skip_batches} holds a negative batch index")
    if config.train.min_lr > config.train.lr:
        problems.append(f"train.min_lr={config.train.min_lr} exceeds train.lr={config.train.lr}")
    if config.model.arch in FAMILIES:
        problems += FAMILIES[config.model.arch].problems(config.model)
    if config.model.arch == "hf" and not (config.model.hf_config or config.model.init_from):
        problems.append("model.arch=hf needs model.hf_config (a config folder) or model.init_from (weights)")
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def model_shape(model: ModelConfig) -> dict[str, Any]:
    """The family preset's shape with any explicit shape keys (n_layer, n_head, ...) applied."""
    return FAMILIES[model.arch].shape(model)


def to_yaml(config: Config) -> str:
    text = OmegaConf.to_yaml(OmegaConf.structured(config))
    return text.replace("async_save:", "async:")


def config_hash(config: Config) -> str:
    """Hash of the settings that define the computation (not where it is written or when it pauses)."""
    data = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(data, dict)
    for section, key in (
        ("run", "dir"),
        ("run", "name"),
        ("train", "stop_at_step"),
        ("checkpoint", "resume"),
    ):
        data[section].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_config(config: Config, run_dir: Path) -> Path:
    """Write the resolved config to RUN_DIR/config.yaml atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(to_yaml(config))
    tmp.replace(target)
    return target
