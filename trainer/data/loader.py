"""Training data: prepared MDS datasets read with mosaicml-streaming, resumable mid-epoch.

What a dataset holds is read by `trainer.data.dataset_info`; which datasets a split reads (data.path, or
for train a data.streams mixture, whose samples streaming concatenates into one sample space) is
`trainer.data.mixture`. Everything below applies to a mixture as to a single dataset.

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

Reading. `MappedDataset` (`trainer.data.mapped_dataset`) is streaming's dataset with the same order,
resume and downloads, reading local shards through memory maps, about 30x faster than streaming's
own reads.

Workers. With `data.num_workers` > 0 both splits read in persistent DataLoader workers: torch's
`iter(loader)` then resets the same worker processes instead of forking new ones, so an epoch
change, an evaluation or a rollback (close the iterator, `load_state_dict`, iterate again) costs
streaming's epoch set-up in the existing workers, not a fork each. Streaming deals the micro-batches
of a rank round-robin over its workers, in the order the DataLoader collects them, so the batches
do not depend on the worker count; the resume state and the next epoch live in streaming's shared
memory, where running workers read them. `data.prefetch_factor` batches per worker are read ahead;
on CUDA the batches are pinned (`HostBatch.pin_memory`) in the DataLoader's pin-memory thread.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Generator, Iterator

import numpy as np
import torch
import torch.distributed as dist
from streaming import StreamingDataLoader, StreamingDataset

from trainer.config import DataConfig
from trainer.data.batches import collate
from trainer.data.dataset_info import PREPARE_HINT, DatasetInfo, read_dataset_info
from trainer.data.mapped_dataset import MappedDataset
from trainer.data.mixture import describe, reseed_weights, split_streams
from trainer.data.shm_cleanup import clean_stale_streaming_shm
from trainer.errors import UserError

logger = logging.getLogger(__name__)

# Messages of streaming's errors that mean a shard is missing or damaged (not a bug of ours).
_SHARD_PROBLEMS = ("a shard could not be read", "Background thread failed")
_shm_cleaned = False


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


def _tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A batch's array as a tensor; pinned batches are tensors already (`HostBatch.pin_memory`)."""
    return torch.from_numpy(array) if isinstance(array, np.ndarray) else array  # as_tensor: 2.5 us more


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
            raise RuntimeError("TokenBatches has one iteration at a time: close the endless iterator first")
        if self._epoch_samples == 0:
            raise UserError(
                f"the {self.split} split has {self._dataset.epoch_size} samples, fewer than one global batch "
                f"of {self._step_samples}; prepare more data or lower train.global_batch_size"
            )
        self._check_layout()
        self._started = True
        try:
            while True:
                yield from self._rest_of_epoch()
                self._epoch += 1
                self._sample_in_epoch = 0
        finally:
            self._started = False  # closed: `load_state_dict` may rewind it (a rollback)

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

    def _next(self, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, torch.Tensor] | None:
        try:
            return {name: _tensor(array) for name, array in next(batches).items()}
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
        new streaming epoch, so do not mix it with `iter()` on the same loader. Workers persist, so
        cutting a pass short stops no worker (it would be killed mid-download otherwise).
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
            raise RuntimeError("load_state_dict() must come before iterating, or after closing the iterator")
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
        # Set on the main copy too: workers forked from it later do not see the resume state once it
        # is stale. Running workers hold the old copy (a mixture's weights depend on the seed), so a
        # change of order replaces them; a rollback keeps the order and its workers.
        if (canonical, seed) != (self._dataset.num_canonical_nodes, self._dataset.shuffle_seed):
            self._stop_workers()
        self._dataset.num_canonical_nodes = canonical
        if seed != self._dataset.shuffle_seed:
            reseed_weights(self._dataset, seed)
        self._dataset.shuffle_seed = seed
        self._dataset.initial_physical_nodes = self._initial_physical_nodes
        # Streaming ignores a resume state older than the epoch it thinks comes next (a rollback rewinds).
        self._dataset.next_epoch = self._epoch
        self._dataset.load_state_dict(self.state_dict())

    def _stop_workers(self) -> None:
        """End the persistent workers, if any run; the next `iter()` starts new ones."""
        workers = self._loader._iterator
        if workers is not None:
            workers._shutdown_workers()  # type: ignore[attr-defined]
            self._loader._iterator = None


def predownload(dataset: StreamingDataset, shards: int) -> int | None:
    """Streaming's `predownload` (samples a worker downloads ahead) for `shards` shards, None without a remote.

    Streaming counts it in samples of the worker's own sequence; the largest shard of a remote
    stream in the index converts it, so at least `shards` shards' worth of samples is fetched ahead.
    """
    is_remote = np.array([stream.remote is not None for stream in dataset.streams])
    remote_shards = dataset.samples_per_shard[is_remote[dataset.stream_per_shard]]
    return shards * int(remote_shards.max()) if len(remote_shards) else None


def _clean_stale_shared_memory_once() -> None:
    """Free the /dev/shm groups of killed runs (never a live one's), once per process, before any rank registers."""
    global _shm_cleaned
    if _shm_cleaned:
        return
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        clean_stale_streaming_shm()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
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
    pin_memory: bool = False,
) -> TokenBatches:
    """The loader of `split` ("train" or "val") for this rank (RANK/WORLD_SIZE/LOCAL_WORLD_SIZE from the env).

    `shuffle` defaults to `data.shuffle` for train and off otherwise. `global_batch_size` (sequences
    per optimizer step) sets where epochs end: after the last complete global batch, so that every
    layout of the same global batch sees the same samples per step; it defaults to one micro-batch
    on every rank. `pin_memory` (for a CUDA run) hands out batches in page-locked memory. All ranks
    must call this in the same order (streaming synchronises them).
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
            f"dataset '{info.source}' has no val split; {PREPARE_HINT} (it writes train/ and val/)"
        )
    _clean_stale_shared_memory_once()
    dataset = MappedDataset(
        read_retries=data.read_retries,
        read_retry_wait_s=data.read_retry_wait_s,
        streams=split_streams(data, split, info),
        epoch_size=data.epoch_size if split == "train" and data.streams else None,
        batch_size=micro_batch_size,
        shuffle=(data.shuffle and split == "train") if shuffle is None else shuffle,
        shuffle_seed=seed,
        num_canonical_nodes=data.num_canonical_nodes,
        shuffle_block_size=data.shuffle_block_size,
    )
    ahead = predownload(dataset, data.predownload_shards)
    if ahead is not None:  # local data: streaming's default (8 micro-batches) for the rare threaded read
        dataset.predownload = ahead
    for stream_id, stream in enumerate(dataset.streams):
        if stream.remote is not None:  # streaming checks hashes only of what it downloads, if told which
            hashes = dataset.shards[dataset.shard_offset_per_stream[stream_id]].hashes
            stream.validate_hash = next((name for name in ("xxh64", "sha1") if name in hashes), None)
    workers = data.num_workers
    loader = StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=split == "train",
        persistent_workers=workers > 0,
        prefetch_factor=data.prefetch_factor if workers else None,
    )
    logger.info(
        "data %s: %d samples of %d tokens from %s, micro batch %d, %d workers%s",
        split,
        dataset.epoch_size,
        info.seq_len,
        describe(dataset.streams),
        micro_batch_size,
        workers,
        "" if ahead is None else f", predownload {ahead} samples per worker",
    )
    return TokenBatches(
        dataset, loader, split, micro_batch_size, info.seq_len, global_batch_size, world_size, num_nodes
    )
