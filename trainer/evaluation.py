"""Validation loss of a model on a prepared dataset, in one process (`llm-train eval`)."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from trainer.config import DataConfig
from trainer.data import build_loader


@torch.no_grad()
def validation_loss(
    model: PreTrainedModel, data_path: str, batches: int, micro_batch_size: int = 8
) -> dict[str, float]:
    loader = build_loader(DataConfig(path=data_path), "val", micro_batch_size, seed=0)
    losses = [
        model(input_ids=b["input_ids"], labels=b["input_ids"]).loss.double()
        for b in loader.iter_batches(batches)
    ]
    val_loss = float(torch.stack(losses).mean())
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
