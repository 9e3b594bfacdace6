"""What a batch from the loader becomes as the model's keyword arguments, the same for every backend."""

from __future__ import annotations

import torch


def model_inputs(
    batch: dict[str, torch.Tensor], num_items: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Text batches train on every next token (labels = input_ids: transformers shifts them); instruction
    batches bring their own labels (responses only) and per-example positions.

    `num_items` makes the loss a sum divided by it (transformers' `num_items_in_batch`) instead of a mean
    over this micro batch's targets: the loop passes the step's target count over all micro batches and
    ranks, scaled so that the averaged gradients are those of one mean over the whole global batch.
    """
    inputs = {"input_ids": batch["input_ids"], "labels": batch.get("labels", batch["input_ids"])}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if num_items is not None:
        inputs["num_items_in_batch"] = num_items
    return inputs
