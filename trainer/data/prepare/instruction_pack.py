"""Instruction examples -> `seq_len` samples that keep examples apart, written as MDS shards.

Each sample has three columns: `tokens`, `loss_mask` (uint8, 1 on response tokens) and `doc_lengths`
(uint32: the lengths of the examples in the sample, in order, then of the padding if any). With
`--packing greedy` examples are added in input order while they fit, and a sample is padded (end-of-text
tokens, mask 0) when the next one does not; with `--packing none` every example has a sample of its own.
The loader restarts positions at each boundary, and attention never crosses one (trainer/data/loader.py).
Plain `streaming.StreamingDataset` reads the shards (standard MDS column encodings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.prepare.instructions import Example
from trainer.data.prepare.pack import SHARD_HASHES


class ExamplePacker:
    def __init__(self, writer: Any, seq_len: int, dtype: str, pad_id: int, one_per_sample: bool) -> None:
        self.writer, self.seq_len, self.dtype, self.pad_id = writer, seq_len, np.dtype(dtype), pad_id
        self.one_per_sample = one_per_sample
        self.pending: list[Example] = []
        self.samples = 0
        self.padding = 0

    def add(self, example: Example) -> None:
        used = sum(len(pending.tokens) for pending in self.pending)
        if self.pending and (self.one_per_sample or used + len(example.tokens) > self.seq_len):
            self.flush()
        self.pending.append(example)

    def flush(self) -> None:
        if not self.pending:
            return
        lengths = [len(example.tokens) for example in self.pending]
        pad = self.seq_len - sum(lengths)
        tokens = np.concatenate([*(e.tokens for e in self.pending), np.full(pad, self.pad_id)])
        mask = np.concatenate([*(e.mask for e in self.pending), np.zeros(pad, np.uint8)])
        self.writer.write(
            {
                "tokens": tokens.astype(self.dtype),
                "loss_mask": mask.astype(np.uint8),
                "doc_lengths": np.asarray(lengths + ([pad] if pad else []), np.uint32),
            }
        )
        self.samples += 1
        self.padding += pad
        self.pending = []


@dataclass(frozen=True)
class PackedSplits:
    train_samples: int
    val_samples: int
    train_examples: int
    val_examples: int
    padding_tokens: int
    response_tokens: int


def val_examples(examples: list[Example], val_fraction: float) -> np.ndarray:
    """Which examples are val: those whose hash fraction is below --val-fraction, and at least one
    (the lowest fraction) when there are two or more examples and a positive fraction."""
    fractions = np.asarray([example.fraction for example in examples])
    is_val = fractions < val_fraction
    if val_fraction > 0 and not is_val.any() and len(examples) >= 2:
        is_val[int(np.argmin(fractions))] = True
    return is_val


def write_instruction_splits(
    examples: list[Example], is_val: np.ndarray, *, out: Path, seq_len: int, dtype: str, pad_id: int,
    packing: str, compression: str | None,
) -> PackedSplits:  # fmt: skip
    from streaming import MDSWriter

    columns = {"tokens": f"ndarray:{dtype}", "loss_mask": "ndarray:uint8", "doc_lengths": "ndarray:uint32"}
    packers = {}
    with (
        MDSWriter(
            out=str(out / "train"), columns=columns, compression=compression, hashes=SHARD_HASHES
        ) as train,
        MDSWriter(out=str(out / "val"), columns=columns, compression=compression, hashes=SHARD_HASHES) as val,
    ):
        for name, writer in (("train", train), ("val", val)):
            packers[name] = ExamplePacker(writer, seq_len, dtype, pad_id, one_per_sample=packing == "none")
        for example, in_val in zip(examples, is_val, strict=True):
            packers["val" if in_val else "train"].add(example)
        for packer in packers.values():
            packer.flush()
    return PackedSplits(
        train_samples=packers["train"].samples,
        val_samples=packers["val"].samples,
        train_examples=int((~is_val).sum()),
        val_examples=int(is_val.sum()),
        padding_tokens=packers["train"].padding + packers["val"].padding,
        response_tokens=int(sum(int(example.mask.sum()) for example in examples)),
    )
