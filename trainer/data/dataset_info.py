"""What a prepared dataset holds, read before any model is built: its shape, sample counts and shards.

`read_dataset_info` reads `prepare.json` and the splits' `index.json` (from a folder, or downloaded
from a remote into a scratch folder) and, for a local dataset, `check_shards` names a missing or
truncated shard now rather than in a loader thread later. The loader is `trainer.data.loader`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import UserError

PREPARE_HINT = "run `llm-train prepare` to make a dataset"
_REQUIRED_STATS = ("seq_len", "vocab_size", "eos_id")


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know about a prepared dataset before reading it."""

    source: str
    """The folder (or remote) the dataset is read from."""
    seq_len: int
    vocab_size: int | None
    """None when the dataset has no prepare.json: take it from model.vocab_size."""
    eos_id: int | None
    train_samples: int
    val_samples: int
    tokenizer_dir: Path | None
    """`tokenizer/` of a dataset in a folder, None when absent or at a URL."""


def node_cache_dir(path: str | Path) -> Path:
    """The node-local cache folder `{path}/node-{RANK // LOCAL_WORLD_SIZE}` for a remote dataset."""
    rank = int(os.environ.get("RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return Path(path) / f"node-{rank // local_world_size}"


def _is_url(location: str) -> bool:
    return "://" in location


def _fetch(source: str, relative: str, scratch: Path | None) -> Path | None:
    """A local path of `source/relative` (downloaded into `scratch` for a URL), or None if absent."""
    if scratch is None:
        path = Path(source) / relative
        return path if path.exists() else None
    from streaming.base.storage import CloudDownloader  # streaming (and transformers): only for a URL

    url = f"{source.rstrip('/')}/{relative}"
    try:
        CloudDownloader.direct_download(url, str(scratch / relative))
    except FileNotFoundError:
        return None
    except Exception as error:  # credentials, network, unsupported scheme: one line for the user
        raise UserError(f"cannot download {url}: {str(error).splitlines()[0]}") from error
    return scratch / relative


def _read_index(path: Path) -> dict[str, Any]:
    """Load an MDS index.json and check that its shards hold a usable `tokens` column."""
    try:
        index = json.loads(path.read_text())
        shards = index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"'{path}' is not a valid MDS index ({error}); re-run `llm-train prepare`") from error
    if not shards:
        raise UserError(f"'{path}' lists no shards; re-run `llm-train prepare`")
    columns = dict(
        zip(shards[0].get("column_names", []), shards[0].get("column_encodings", []), strict=False)
    )
    encoding = columns.get("tokens", "")
    if not (encoding.startswith("ndarray") or encoding == "bytes"):
        found = ", ".join(f"{name}: {enc}" for name, enc in columns.items()) or "none"
        raise UserError(
            f"'{path}' has no integer 'tokens' column (columns: {found}); "
            "training reads token ids from a column named tokens (ndarray of ints, or int64 bytes)"
        )
    return index


def as_tokens(value: Any) -> np.ndarray:
    """A sample's `tokens` as a 1-d integer array: any integer ndarray, or llm-foundry's int64 bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(value, np.int64)
    array = np.asarray(value)
    if array.ndim != 1 or array.dtype.kind not in "iu":  # signed or unsigned integers
        raise TypeError(f"'tokens' must be a 1-d integer array, got {array.dtype} of shape {array.shape}")
    return array


def _first_tokens(source: str, index_path: Path, index: dict[str, Any], scratch: Path | None) -> np.ndarray:
    """The tokens of a split's first sample, read straight from its first shard."""
    from streaming.base.compression import decompress  # streaming: only for a dataset without prepare.json
    from streaming.base.format import reader_from_json

    info = index["shards"][0]
    split_dir = index_path.parent
    reader = reader_from_json(str(split_dir.parent), split_dir.name, info)
    raw = _fetch(source, f"{split_dir.name}/{info['raw_data']['basename']}", scratch)
    if raw is not None:
        return as_tokens(reader.get_item(0)["tokens"])
    zipped = info.get("zip_data") and _fetch(
        source, f"{split_dir.name}/{info['zip_data']['basename']}", scratch
    )
    if not zipped:
        raise UserError(
            f"shard '{info['raw_data']['basename']}' of '{split_dir}' is missing; re-run `llm-train prepare`"
        )
    data = decompress(info["compression"], zipped.read_bytes())
    begin, end = np.frombuffer(data, np.uint32, 2, offset=4)
    return as_tokens(reader.decode_sample(data[begin:end])["tokens"])


def read_dataset_info(path: str | Path, remote: str | None = None) -> DatasetInfo:
    """Describe the prepared dataset at `path`, or at `remote` when set (the cache folder is `path`).

    A folder written by anyone else is accepted without prepare.json as long as `train/index.json`
    exists: seq_len then comes from the first sample and vocab_size/eos_id are None.
    """
    source = remote or str(path)
    if not _is_url(source):
        return _read_info(source, "data.remote" if remote else "data.path", None)
    # Downloads go to a private scratch folder: every rank of a node reads the info at once.
    with tempfile.TemporaryDirectory() as scratch:
        return _read_info(source, "data.remote", Path(scratch))


def _read_info(source: str, key: str, scratch: Path | None) -> DatasetInfo:
    if scratch is None and not Path(source).is_dir():
        raise UserError(f"{key}='{source}' does not exist; {PREPARE_HINT}")
    train_index = _fetch(source, "train/index.json", scratch)
    if train_index is None:
        raise UserError(f"{key}='{source}' is not a prepared dataset (no train/index.json); {PREPARE_HINT}")
    train = _read_index(train_index)
    val_index = _fetch(source, "val/index.json", scratch)
    val = _read_index(val_index) if val_index else {"shards": []}
    stats_path = _fetch(source, "prepare.json", scratch)
    if stats_path is not None:
        try:
            stats = json.loads(stats_path.read_text())
            seq_len, vocab_size, eos_id = (int(stats[name]) for name in _REQUIRED_STATS)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"'{source}/prepare.json' is unreadable or lacks integer {', '.join(_REQUIRED_STATS)} "
                f"({error}); re-run `llm-train prepare`"
            ) from error
    else:
        seq_len, vocab_size, eos_id = len(_first_tokens(source, train_index, train, scratch)), None, None
    if scratch is None:
        check_shards(Path(source) / "train")
        if val_index is not None:
            check_shards(Path(source) / "val")
    tokenizer = Path(source) / "tokenizer" if scratch is None else None
    return DatasetInfo(
        source=source,
        seq_len=seq_len,
        vocab_size=vocab_size,
        eos_id=eos_id,
        train_samples=sum(shard["samples"] for shard in train["shards"]),
        val_samples=sum(shard["samples"] for shard in val["shards"]),
        tokenizer_dir=tokenizer if tokenizer is not None and tokenizer.is_dir() else None,
    )


def check_shards(split_dir: Path) -> None:
    """Name a missing or truncated shard now, before any model is built, not in a worker thread later.

    A shard is fine when its raw file, or else its compressed file, has the size index.json gives;
    its checksum is verified when it is first read (`trainer.data.mds_shard.ShardFile`).
    """
    for shard in _read_index(split_dir / "index.json")["shards"]:
        files = [shard["raw_data"]] + ([shard["zip_data"]] if shard.get("zip_data") else [])
        present = [
            (split_dir / f["basename"], f["bytes"]) for f in files if (split_dir / f["basename"]).is_file()
        ]
        if not present:
            raise UserError(
                f"shard '{split_dir / files[-1]['basename']}' is missing; re-run `llm-train prepare`"
            )
        path, size = present[0]
        if path.stat().st_size != size:
            raise UserError(
                f"shard '{path}' has {path.stat().st_size} bytes, its index.json says {size} (truncated or "
                "damaged); re-run `llm-train prepare` or copy the dataset again"
            )
