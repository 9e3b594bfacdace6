"""Train/val split at the document level, packing into `seq_len` samples, and the MDS shards.

Split rule: a document goes to val when its hash fraction is below a threshold. The threshold is
`--val-fraction`, raised only when that leaves val without one full sample while the corpus holds
at least two samples' worth of tokens: then it takes the documents with the smallest fractions
until val fills one sample (never leaving train without one). Each split keeps input order, its
documents' tokens (each followed by EOS) are concatenated and cut into `seq_len` samples, and the
last partial sample of each split is dropped (`tokens` in prepare.json counts what was written).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHARD_HASHES = ["sha1", "xxh64"]
_BLOCK_TOKENS = 1 << 22  # tokens read from the scratch file at a time


def choose_val_threshold(
    lengths: np.ndarray, fractions: np.ndarray, val_fraction: float, seq_len: int
) -> float:
    """The hash-fraction threshold below which documents are val (see the module docstring)."""
    if val_fraction <= 0 or len(lengths) == 0:
        return float(val_fraction)
    total = int(lengths.sum())
    if int(lengths[fractions < val_fraction].sum()) >= seq_len or total < 2 * seq_len:
        return float(val_fraction)
    order = np.argsort(fractions, kind="stable")
    first_full = int(np.searchsorted(np.cumsum(lengths[order]), seq_len))
    threshold = float(np.nextafter(fractions[order[first_full]], np.inf))
    if total - int(lengths[fractions < threshold].sum()) < seq_len:
        log.warning("cannot give val one full sample without emptying train; val has no sample")
        return float(val_fraction)
    log.info(
        "val fraction %.3g gives val no full sample; raised the threshold to %.3g", val_fraction, threshold
    )
    return max(threshold, float(val_fraction))


class _Packer:
    """Cuts a token stream into `seq_len` rows and writes each row as one MDS sample."""

    def __init__(self, writer: object, seq_len: int, dtype: np.dtype) -> None:
        self.writer = writer
        self.seq_len = seq_len
        self.carry = np.zeros(0, dtype=dtype)
        self.samples = 0

    def add(self, tokens: np.ndarray) -> None:
        if self.carry.size:
            tokens = np.concatenate([self.carry, tokens])
        rows = len(tokens) // self.seq_len
        for row in tokens[: rows * self.seq_len].reshape(rows, self.seq_len):
            self.writer.write({"tokens": row})
        self.samples += rows
        self.carry = tokens[rows * self.seq_len :].copy()


@dataclass(frozen=True)
class SplitResult:
    train_samples: int
    val_samples: int
    train_documents: int
    val_documents: int
    tokens_dropped_tail: int


def write_splits(
    tokens_file: Path,
    lengths: np.ndarray,
    is_val: np.ndarray,
    *,
    seq_len: int,
    dtype: str,
    out: Path,
    compression: str | None,
) -> SplitResult:
    """Write `out/train` and `out/val` (MDS, column `tokens`) from the scratch token file."""
    from streaming import MDSWriter

    column = {"tokens": f"ndarray:{dtype}"}
    total = int(lengths.sum())
    tokens = np.memmap(tokens_file, dtype=dtype, mode="r") if total else np.zeros(0, dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    with (
        MDSWriter(
            out=str(out / "train"), columns=column, compression=compression, hashes=SHARD_HASHES
        ) as train_w,
        MDSWriter(
            out=str(out / "val"), columns=column, compression=compression, hashes=SHARD_HASHES
        ) as val_w,
    ):
        train = _Packer(train_w, seq_len, np.dtype(dtype))
        val = _Packer(val_w, seq_len, np.dtype(dtype))
        first = 0
        while first < len(lengths):
            # Whole documents, about _BLOCK_TOKENS at a time (at least one).
            last = max(
                first + 1, int(np.searchsorted(starts, starts[first] + _BLOCK_TOKENS, side="right")) - 1
            )
            block = np.asarray(tokens[starts[first] : starts[last]])
            block_val = is_val[first:last]
            if not block_val.any():
                train.add(block)
            elif block_val.all():
                val.add(block)
            else:
                mask = np.repeat(block_val, lengths[first:last])
                train.add(block[~mask])
                val.add(block[mask])
            first = last
    if isinstance(tokens, np.memmap):
        del tokens
    return SplitResult(
        train_samples=train.samples,
        val_samples=val.samples,
        train_documents=int((~is_val).sum()),
        val_documents=int(is_val.sum()),
        tokens_dropped_tail=int(train.carry.size + val.carry.size),
    )
