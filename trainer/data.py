"""Training data: prepared MDS datasets read with mosaicml-streaming, resumable mid-epoch.

Sample order. `StreamingDataset` lays every epoch out as one global sequence that depends only on
the sample count, `num_canonical_nodes`, the shuffle seed, algorithm and block size and the epoch
number, then deals it out so that micro-batch `b` of all ranks together holds the global positions
`[b*B*W, (b+1)*B*W)` (B the micro batch, W the world size; which rank gets which sample inside that
window depends on the layout). So with `num_canonical_nodes` pinned, any layout with the same B*W,
and every layout at the granularity of a fixed global batch, consumes the same samples per step.
Streaming pads the end of an epoch per rank (repeated samples, then -1 holes), so that tail would
depend on the layout: `TokenBatches` therefore ends each epoch after the last complete global batch.

Resume state. `TokenBatches.state_dict()` is the same dict on every rank (global sample counts), so
rank 0 saves it once; it is streaming's own resume format and `load_state_dict` hands it to
`StreamingDataset.load_state_dict`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.compression import decompress
from streaming.base.dataset import _ShardState
from streaming.base.format import reader_from_json
from streaming.base.storage import CloudDownloader
from streaming.base.util import clean_stale_shared_memory

from trainer.config import DataConfig
from trainer.errors import UserError

logger = logging.getLogger(__name__)

_PREPARE_HINT = "run `llm-train prepare` to make a dataset"
_REQUIRED_STATS = ("seq_len", "vocab_size", "eos_id")
# Messages of streaming's errors that mean a shard is missing or damaged (not a bug of ours).
_SHARD_PROBLEMS = ("a shard could not be read", "Background thread failed")
_shm_cleaned = False


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


def _as_tokens(value: Any) -> np.ndarray:
    """A sample's `tokens` as a 1-d integer array: any integer ndarray, or llm-foundry's int64 bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(value, np.int64)
    array = np.asarray(value)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"'tokens' must be a 1-d integer array, got {array.dtype} of shape {array.shape}")
    return array


def _first_tokens(source: str, index_path: Path, index: dict[str, Any], scratch: Path | None) -> np.ndarray:
    """The tokens of a split's first sample, read straight from its first shard."""
    info = index["shards"][0]
    split_dir = index_path.parent
    reader = reader_from_json(str(split_dir.parent), split_dir.name, info)
    raw = _fetch(source, f"{split_dir.name}/{info['raw_data']['basename']}", scratch)
    if raw is not None:
        return _as_tokens(reader.get_item(0)["tokens"])
    zipped = info.get("zip_data") and _fetch(
        source, f"{split_dir.name}/{info['zip_data']['basename']}", scratch
    )
    if not zipped:
        raise UserError(
            f"shard '{info['raw_data']['basename']}' of '{split_dir}' is missing; re-run `llm-train prepare`"
        )
    data = decompress(info["compression"], zipped.read_bytes())
    begin, end = np.frombuffer(data, np.uint32, 2, offset=4)
    return _as_tokens(reader.decode_sample(data[begin:end])["tokens"])


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
        raise UserError(f"{key}='{source}' does not exist; {_PREPARE_HINT}")
    train_index = _fetch(source, "train/index.json", scratch)
    if train_index is None:
        raise UserError(f"{key}='{source}' is not a prepared dataset (no train/index.json); {_PREPARE_HINT}")
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


def _check_shards_present(split_dir: Path) -> None:
    """Name a missing shard now rather than letting streaming fail inside a worker thread."""
    for shard in _read_index(split_dir / "index.json")["shards"]:
        names = [shard["raw_data"]["basename"]] + (
            [shard["zip_data"]["basename"]] if shard.get("zip_data") else []
        )
        if not any((split_dir / name).is_file() for name in names):
            raise UserError(f"shard '{split_dir / names[-1]}' is missing; re-run `llm-train prepare`")


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    tokens = np.stack([_as_tokens(sample["tokens"]) for sample in samples]).astype(np.int64)
    return {"input_ids": torch.from_numpy(tokens)}


def _as_user_error(split: str, error: Exception) -> UserError | None:
    """A UserError for streaming's missing/damaged-shard failures, None for anything else."""
    text = str(error)
    if not any(problem in text for problem in _SHARD_PROBLEMS):
        return None
    last_line = text.strip().splitlines()[-1]  # DataLoader workers wrap the original in a traceback
    last_line = re.sub(r"^(\w+Error: )?(a shard could not be read: )?", "", last_line)
    return UserError(
        f"reading the {split} shards failed: {last_line}; re-run `llm-train prepare` or re-sync data.remote"
    )


class _Dataset(StreamingDataset):
    """StreamingDataset that fails loudly, and never hangs, on a shard it cannot fetch or verify.

    Streaming leaves such a shard PREPARING, so every other reader waits for it forever, and a
    background thread that raises makes the end of the epoch wait forever for it to exit. Here a
    failed shard has its damaged copy removed and is marked LOCAL: nobody waits on it any more,
    background prefetching goes on, and the thread that reads samples finds the file missing,
    fetches it again (streaming's own retry) and raises.
    """

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as error:
            if self.streams[self.stream_per_shard[shard_id]].remote is not None:
                self.shards[shard_id].evict()  # only cached copies: never a dataset's own files
            self._shard_states[shard_id] = _ShardState.LOCAL
            if blocking:  # streaming's background threads prefetch with blocking=False
                raise RuntimeError(f"a shard could not be read: {error}") from error
            logger.warning("prefetching shard %d failed (%s); it is fetched again when read", shard_id, error)


class TokenBatches:
    """The batches of one split for this rank: `{"input_ids": LongTensor (micro_batch_size, seq_len)}`.

    `iter(loader)` never ends: it walks epoch after epoch (a new shuffle each epoch), each epoch
    ending after its last complete global batch. `iter_batches(limit)` is one pass from the start of
    the split for evaluation. `state_dict()`/`load_state_dict()` resume the endless iteration exactly.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        loader: StreamingDataLoader,
        split: str,
        micro_batch_size: int,
        seq_len: int,
        global_batch_size: int,
        world_size: int,
        num_nodes: int,
    ) -> None:
        self.split = split
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.world_size = world_size
        self.num_nodes = num_nodes
        self._dataset = dataset
        self._loader = loader
        self._step_samples = micro_batch_size * world_size
        self._epoch_samples = dataset.epoch_size // global_batch_size * global_batch_size
        self._epoch = 0
        self._sample_in_epoch = 0
        self._initial_physical_nodes: int | None = None
        self._started = False

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields per epoch of the endless iteration."""
        return self._epoch_samples // self._step_samples

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._started:
            raise RuntimeError("TokenBatches is iterated once: its iterator is endless")
        if self._epoch_samples == 0:
            raise UserError(
                f"the {self.split} split has {self._dataset.epoch_size} samples, fewer than one global batch "
                f"of {self._step_samples}; prepare more data or lower train.global_batch_size"
            )
        self._check_layout()
        self._started = True
        while True:
            yield from self._rest_of_epoch()
            self._epoch += 1
            self._sample_in_epoch = 0

    def _check_layout(self) -> None:
        canonical, nodes = self._dataset.num_canonical_nodes, self.num_nodes
        if self._initial_physical_nodes is None and canonical % nodes and nodes % canonical:
            raise UserError(
                f"data.num_canonical_nodes={canonical} and the {nodes} nodes of this run must divide one "
                f"another; set data.num_canonical_nodes to a multiple of the node count (e.g. {canonical * nodes})"
            )

    def _rest_of_epoch(self) -> Generator[dict[str, torch.Tensor], None, None]:
        remaining = (self._epoch_samples - self._sample_in_epoch) // self._step_samples
        if remaining <= 0:
            return
        batches = iter(self._loader)
        try:
            for _ in range(remaining):
                batch = self._next(batches)
                if batch is None:
                    raise UserError(
                        f"the {self.split} split ended early in epoch {self._epoch} (after "
                        f"{self._sample_in_epoch // self._step_samples} of {self.batches_per_epoch} batches); "
                        "a shard could not be read, see the log above"
                    )
                self._sample_in_epoch += self._step_samples  # counted as the consumer receives it
                yield batch
            # Let streaming end the epoch itself (the tail is less than a global batch): closing it
            # early can kill a worker mid-download and leave that shard marked in progress forever.
            while self._next(batches) is not None:
                pass
        finally:
            batches.close()  # type: ignore[attr-defined]  # when the consumer stops: stop the workers

    def _next(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        try:
            return next(batches)
        except StopIteration:
            return None
        except (RuntimeError, ValueError, OSError) as error:
            user_error = _as_user_error(self.split, error)
            if user_error is None:
                raise
            raise user_error from error

    def iter_batches(self, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One pass from the start of the split, at most `limit` batches (evaluation).

        With shuffle off (the default for val) every call yields the same batches. Each call is a
        new streaming epoch, so do not mix it with `iter()` on the same loader. A val loader reads
        in this process (no workers), so that cutting a pass short never kills a worker mid-download.
        """
        batches = iter(self._loader)
        try:
            count = 0
            while limit is None or count < limit:
                batch = self._next(batches)
                if batch is None:
                    return
                count += 1
                yield batch
        finally:
            batches.close()  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, int]:
        """Where the endless iteration stands; the same dict on every rank (save it once)."""
        epoch, sample_in_epoch = self._epoch, self._sample_in_epoch
        if sample_in_epoch >= self._epoch_samples:  # the last batch of an epoch was handed out
            epoch, sample_in_epoch = epoch + 1, 0
        return {
            "epoch": epoch,
            "sample_in_epoch": sample_in_epoch,
            "num_canonical_nodes": int(self._dataset.num_canonical_nodes),
            "shuffle_seed": int(self._dataset.shuffle_seed),
            "initial_physical_nodes": self._initial_physical_nodes or self.num_nodes,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where `state` was taken, on this or another world size; call before `iter()`.

        The checkpoint's shuffle seed and num_canonical_nodes win over the config's, so the order
        of the interrupted run is kept.
        """
        if self._started:
            raise RuntimeError("load_state_dict() must come before iterating")
        canonical, seed = int(state["num_canonical_nodes"]), int(state["shuffle_seed"])
        if (canonical, seed) != (self._dataset.num_canonical_nodes, self._dataset.shuffle_seed):
            logger.warning(
                "resuming the %s data order of the checkpoint: num_canonical_nodes=%d, shuffle seed=%d "
                "(the config says %d, %d)",
                self.split,
                canonical,
                seed,
                self._dataset.num_canonical_nodes,
                self._dataset.shuffle_seed,
            )
        self._epoch, self._sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        if self._sample_in_epoch >= self._epoch_samples:  # saved as an epoch ended
            self._epoch, self._sample_in_epoch = self._epoch + 1, 0
        self._initial_physical_nodes = int(state.get("initial_physical_nodes") or self.num_nodes)
        # Set on the main copy too: workers of later epochs are forked from it and do not see the
        # resume state once it is stale.
        self._dataset.num_canonical_nodes = canonical
        self._dataset.shuffle_seed = seed
        self._dataset.initial_physical_nodes = self._initial_physical_nodes
        self._dataset.load_state_dict(self.state_dict())


def _clean_stale_shared_memory_once() -> None:
    """Free /dev/shm left by killed runs, once per process (it would also free live datasets' memory)."""
    global _shm_cleaned
    if not _shm_cleaned:
        clean_stale_shared_memory()
        _shm_cleaned = True


def build_loader(
    data: DataConfig,
    split: str,
    micro_batch_size: int,
    seed: int,
    *,
    shuffle: bool | None = None,
    global_batch_size: int | None = None,
    info: DatasetInfo | None = None,
) -> TokenBatches:
    """The loader of `split` ("train" or "val") for this rank (RANK/WORLD_SIZE/LOCAL_WORLD_SIZE from the env).

    `shuffle` defaults to `data.shuffle` for train and off otherwise. `global_batch_size` (sequences
    per optimizer step) sets where epochs end: after the last complete global batch, so that every
    layout of the same global batch sees the same samples per step; it defaults to one micro-batch
    on every rank. All ranks must call this in the same order (streaming synchronises them).
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    num_nodes = world_size // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    global_batch_size = global_batch_size or micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size % (micro_batch_size * world_size):
        raise ValueError(
            f"global batch {global_batch_size} is not a multiple of {micro_batch_size} x {world_size}"
        )
    if seed < 0:
        raise UserError(f"run.seed={seed} must be >= 0 (it seeds the data shuffle)")
    info = info or read_dataset_info(data.path, data.remote)
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    if split == "val" and info.val_samples == 0:
        raise UserError(
            f"dataset '{info.source}' has no val split; {_PREPARE_HINT} (it writes train/ and val/)"
        )
    _clean_stale_shared_memory_once()
    if data.remote:
        local, remote = str(node_cache_dir(data.path)), data.remote
    else:
        local, remote = data.path, None
        _check_shards_present(Path(data.path) / split)
    dataset = _Dataset(
        remote=remote,
        local=local,
        split=split,
        batch_size=micro_batch_size,
        shuffle=(data.shuffle and split == "train") if shuffle is None else shuffle,
        shuffle_seed=seed,
        num_canonical_nodes=data.num_canonical_nodes,
        shuffle_block_size=data.shuffle_block_size,
    )
    if remote is not None:  # streaming checks hashes only of what it downloads, and only if told which
        algorithm = next((name for name in ("xxh64", "sha1") if name in dataset.shards[0].hashes), None)
        for stream in dataset.streams:
            stream.validate_hash = algorithm
    loader = StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=data.num_workers if split == "train" else 0,
        collate_fn=_collate,
        drop_last=split == "train",
        persistent_workers=False,
    )
    logger.info(
        "data %s: %d samples of %d tokens from %s%s, micro batch %d, %d workers",
        split,
        dataset.epoch_size,
        info.seq_len,
        info.source,
        f" cached in {local}" if remote else "",
        micro_batch_size,
        loader.num_workers,
    )
    return TokenBatches(
        dataset, loader, split, micro_batch_size, info.seq_len, global_batch_size, world_size, num_nodes
    )
