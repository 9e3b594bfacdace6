"""Samples -> the batches a model trains on: token ids, and for instruction data labels and positions."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainer.data.dataset_info import as_tokens

IGNORE_INDEX = -100
"""The label that the loss skips (transformers' and torch's cross-entropy convention)."""

__all__ = ["IGNORE_INDEX", "HostBatch", "collate", "instruction_targets", "target_count"]


class HostBatch(dict[str, np.ndarray]):
    """A collated batch: int64 arrays by name, which the DataLoader can pin (`pin_memory=True`).

    torch's pin-memory thread calls an object's own `pin_memory()` before it looks inside a
    mapping, and leaves numpy arrays unpinned; this one makes each array a tensor in page-locked
    memory, so that the step's `.to(device, non_blocking=True)` copies without a staging buffer.
    """

    def pin_memory(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(array).pin_memory() for name, array in self.items()}


def collate(samples: list[dict[str, Any]]) -> HostBatch:
    """The batch as int64 arrays; `TokenBatches` (or the pin-memory thread) makes them tensors.

    A DataLoader worker passes a numpy array through its result pipe, about 4x cheaper per batch
    than a tensor, which torch moves to a new shared-memory file and hands over as a descriptor.
    Instruction data (a `loss_mask` column) also gets `labels` and `position_ids`: see `instruction_targets`.
    """
    rows = [as_tokens(sample["tokens"]) for sample in samples]
    tokens = np.empty((len(rows), len(rows[0])), np.int64)  # filled row by row: faster than np.stack
    for index, row in enumerate(rows):
        if len(row) != tokens.shape[1]:
            raise ValueError(f"a batch mixes samples of {tokens.shape[1]} and {len(row)} tokens")
        tokens[index] = row
    if "loss_mask" not in samples[0]:
        return HostBatch(input_ids=tokens)
    labels, positions = np.empty_like(tokens), np.empty_like(tokens)
    for index, sample in enumerate(samples):
        labels[index], positions[index] = instruction_targets(
            tokens[index], sample["loss_mask"], sample["doc_lengths"]
        )
    return HostBatch(input_ids=tokens, labels=labels, position_ids=positions)


def instruction_targets(
    tokens: np.ndarray, loss_mask: Any, doc_lengths: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, position_ids) of one packed instruction sample.

    Labels are the tokens where the mask marks a response, -100 (ignored) elsewhere and at the first token
    of every example (never predicted from the example before it). Positions restart at 0 at each
    example: transformers then keeps attention within each example (its packed-sequence masks for SDPA
    and eager, varlen flash attention), so a packed example's loss is its loss alone.
    """
    lengths = np.asarray(doc_lengths, np.int64)
    starts = np.cumsum(lengths) - lengths
    labels = np.where(np.asarray(loss_mask, bool), np.asarray(tokens, np.int64), IGNORE_INDEX)
    labels[starts] = IGNORE_INDEX
    positions = np.arange(len(tokens), dtype=np.int64) - np.repeat(starts, lengths)
    return labels, positions


def target_count(labels: Any) -> Any:
    """The tokens a batch's loss is computed on (transformers shifts the labels by one), as a float64 tensor."""
    return (labels[:, 1:] != IGNORE_INDEX).sum().double()
