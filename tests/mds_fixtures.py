"""Tiny prepared datasets for tests, written the way `llm-train prepare` writes them.

Sample `i` holds the tokens `(i + arange(seq_len)) % vocab_size`, so its first token is its id
(`sample_ids` reads the ids of a batch back) and training on it still sees varied tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from streaming import MDSWriter


def sample_tokens(index: int, seq_len: int, vocab_size: int) -> np.ndarray:
    """The tokens stored for sample `index`."""
    return (index + np.arange(seq_len)) % vocab_size


def write_split(
    out: Path,
    num_samples: int,
    seq_len: int = 16,
    vocab_size: int = 512,
    encoding: str = "ndarray:uint16",
    size_limit: int = 1024,
    first_id: int = 0,
) -> None:
    """Write one MDS split of `num_samples` samples, ids from `first_id` (several small shards, hashes on)."""
    if first_id + num_samples > vocab_size:
        raise ValueError(
            "sample ids are stored in the first token; keep first_id + num_samples <= vocab_size"
        )
    dtype = np.int64 if encoding == "bytes" else np.dtype(encoding.split(":")[1])
    with MDSWriter(
        out=str(out), columns={"tokens": encoding}, hashes=["sha1", "xxh64"], size_limit=size_limit
    ) as writer:
        for index in range(first_id, first_id + num_samples):
            tokens = sample_tokens(index, seq_len, vocab_size).astype(dtype)
            writer.write({"tokens": tokens.tobytes() if encoding == "bytes" else tokens})


def write_dataset(
    root: Path,
    train_samples: int = 64,
    val_samples: int = 16,
    seq_len: int = 16,
    vocab_size: int = 512,
    encoding: str = "ndarray:uint16",
    prepare_json: bool = True,
    first_id: int = 0,
) -> Path:
    """A prepared dataset folder: train/, val/ and (unless told not to) prepare.json.

    Sample ids (the first token) start at `first_id` in each split: datasets mixed in a test get
    ranges of their own.
    """
    root.mkdir(parents=True, exist_ok=True)
    write_split(root / "train", train_samples, seq_len, vocab_size, encoding, first_id=first_id)
    if val_samples:
        write_split(root / "val", val_samples, seq_len, vocab_size, encoding, first_id=first_id)
    if prepare_json:
        stats = {
            "files": 1,
            "documents": train_samples + val_samples,
            "dropped_short": 0,
            "dropped_undecodable": 0,
            "duplicates": 0,
            "tokens": (train_samples + val_samples) * seq_len,
            "train_samples": train_samples,
            "val_samples": val_samples,
            "seq_len": seq_len,
            "vocab_size": vocab_size,
            "eos_id": vocab_size - 1,
        }
        (root / "prepare.json").write_text(json.dumps(stats, indent=2))
    return root


def sample_ids(input_ids: torch.Tensor) -> list[int]:
    """The ids of the samples in a batch written by `write_split`."""
    return input_ids[:, 0].tolist()
