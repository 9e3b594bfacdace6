"""Validation loss of a model on prepared datasets, in one process (`llm-train eval` and `compare`),
and the eval lines that such an evaluation adds to its run's metrics.jsonl and W&B."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from trainer.config import DataConfig, load_config
from trainer.data.batches import target_count
from trainer.data.loader import build_loader
from trainer.errors import UserError
from trainer.metrics import MetricsLogger
from trainer.names import unique_names
from trainer.parallel.inputs import model_inputs, prepare_attention

EVAL_SOURCE = "llm-train eval"


@torch.no_grad()
def validation_loss(
    model: PreTrainedModel, data_path: str, batches: int, micro_batch_size: int = 8
) -> dict[str, float]:
    """As training evaluates: text, the mean of the batches' mean token losses; instruction data, the
    loss of every response token over their count."""
    loader = build_loader(DataConfig(path=data_path), "val", micro_batch_size, seed=0)
    losses, targets = [], []
    attention = prepare_attention(model)
    for batch in loader.iter_batches(batches):
        if "labels" in batch:
            losses.append(model(**model_inputs(batch, torch.ones(()), attention)).loss.double())
            targets.append(target_count(batch["labels"]))
        else:
            losses.append(model(**model_inputs(batch, attention=attention)).loss.double())
    stacked = torch.stack(losses)
    val_loss = float(stacked.sum() / torch.stack(targets).sum() if targets else stacked.mean())
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def datasets_or_default(data: Sequence[str] | None, default: str | None, model: str | Path) -> list[str]:
    """The --data folders given, else the model's own data.path (a run's, or the one an export recorded)."""
    if data:
        return list(data)
    if default is None:
        raise UserError(
            f"no dataset known for '{model}'; pass --data DIR (a folder made by `llm-train prepare`)"
        )
    return [default]


def validation_losses(
    model: PreTrainedModel, data_paths: Sequence[str], batches: int
) -> dict[str, dict[str, float]]:
    """`validation_loss` per dataset, keyed by the dataset folder's name (made distinct, see unique_names).

    The val split is read unshuffled from its start, so every model sees the same batches.
    """
    names = unique_names(data_paths)
    return {
        name: validation_loss(model, str(path), batches) for name, path in zip(names, data_paths, strict=True)
    }


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder that `path` (a RUN_DIR or one of its checkpoint step folders) belongs to, else None."""
    path = Path(path)
    candidates = [path, path.parent.parent] if path.parent.name == "checkpoints" else [path]
    for folder in candidates:
        if (folder / "checkpoints").is_dir() and (folder / "config.yaml").is_file():
            return folder
    return None


def record_eval(
    run_dir: Path, step: int | None, results: dict[str, dict[str, float]], kind: str = "dataset"
) -> None:
    """Append one eval line per dataset (or per harness task, `kind="task"`) to RUN_DIR/metrics.jsonl,
    mirrored to W&B as it is configured for the run (log.wandb in RUN_DIR/config.yaml) under
    `eval/NAME/val_loss` and `eval/NAME/val_ppl` (tasks: `eval/task/NAME/METRIC`)."""
    metrics = MetricsLogger(load_config(run_dir / "config.yaml"), run_dir, enabled=True)
    prefix = "eval/task/" if kind == "task" else "eval/"
    try:
        for name, numbers in results.items():
            record = {"step": step, **numbers, kind: name, "source": EVAL_SOURCE}
            metrics.write(record, wandb_prefix=f"{prefix}{name}/")
    finally:
        metrics.close()
