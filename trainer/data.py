"""Training data: prepared MDS datasets read with mosaicml-streaming, resumable mid-epoch.

What a dataset holds is read by `trainer.dataset_info`; which datasets a split reads (data.path, or
for train a data.streams mixture, whose samples streaming concatenates into one sample space) is
`trainer.mixture`. Everything below applies to a mixture as to a single dataset.

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

Reading. Streaming opens, seeks and reads the shard file for every sample, and iterates through
two background threads per worker that walk every sample too; together about 200 us a sample,
some 30x a plain memmap loader. `_Dataset` keeps streaming's sample order, resume and downloads
but reads a shard whose raw file is local through a read-only memory map (`_ShardFile`, the MDS
layout decoded exactly as `MDSReader` does), and, once every shard is local, walks its partition
without the threads (`_Dataset.__iter__`). See "Fast path" in `_Dataset` for when it applies.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable, Generator, Iterator
from threading import Event
from typing import Any

import numpy as np
import torch
import xxhash
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _Iterator, _IterState, _ShardState
from streaming.base.format.mds import MDSReader
from streaming.base.format.mds.encodings import NDArray, mds_decode
from streaming.base.util import clean_stale_shared_memory

from trainer.config import DataConfig
from trainer.dataset_info import PREPARE_HINT, DatasetInfo, as_tokens, read_dataset_info
from trainer.errors import UserError
from trainer.mixture import describe, reseed_weights, split_streams

logger = logging.getLogger(__name__)

# Messages of streaming's errors that mean a shard is missing or damaged (not a bug of ours).
_SHARD_PROBLEMS = ("a shard could not be read", "Background thread failed")
_shm_cleaned = False
# MDS stores its offsets and column sizes as numpy uint32 in native byte order: so does struct's "=".
_UINT32 = struct.Struct("=I")
_SAMPLE_SPAN = struct.Struct("=II")  # begin and end of sample i, at byte 4 + 4 * i of a shard
_SHAPE_DIM = {code: struct.Struct("=" + "BHIQ"[code]) for code in range(4)}  # NDArray's shape dtypes
_MAX_OPEN_SHARDS = 1024  # memory maps kept open per process (each is one entry of vm.max_map_count)


class DamagedShardError(RuntimeError):
    """A local shard's bytes do not match the checksum in its index.json."""


def _collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The batch as an int64 array; `TokenBatches` makes it a tensor in the training process.

    A DataLoader worker passes a numpy array through its result pipe, about 4x cheaper per batch
    than a tensor, which torch moves to a new shared-memory file and hands over as a descriptor.
    """
    rows = [as_tokens(sample["tokens"]) for sample in samples]
    tokens = np.empty((len(rows), len(rows[0])), np.int64)  # filled row by row: faster than np.stack
    for index, row in enumerate(rows):
        if len(row) != tokens.shape[1]:
            raise ValueError(f"a batch mixes samples of {tokens.shape[1]} and {len(row)} tokens")
        tokens[index] = row
    return {"input_ids": tokens}


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


def _ndarray_decoder(encoding: str) -> Callable[[bytes], np.ndarray]:
    """`NDArray.decode` of streaming for one column, its dtype and shape parsed once, not per sample."""
    coder = NDArray.from_str(encoding.partition(":")[2])
    fixed_dtype = np.dtype(coder.dtype) if coder.dtype else None
    fixed_shape = coder.shape
    value_dtypes = {code: np.dtype(name) for code, name in NDArray._int2value_dtype.items()}

    def decode(data: bytes) -> np.ndarray:
        index = 0
        dtype = fixed_dtype
        if dtype is None:
            dtype = value_dtypes[data[0]]
            index = 1
        if fixed_shape is not None:
            return np.frombuffer(data, dtype, offset=index).reshape(fixed_shape)
        byte = data[index]
        ndim, code = byte >> 2, byte % 4
        start = index + 1 + ndim * (1 << code)
        values = np.frombuffer(data, dtype, offset=start)
        if ndim == 1 and _SHAPE_DIM[code].unpack_from(data, index + 1)[0] == len(values):
            return values  # the common case, without building a shape array
        shape = np.frombuffer(data[index + 1 : start], NDArray._int2shape_dtype[code])
        return values.reshape(shape)  # raises as streaming does when the sizes disagree

    return decode


def _column_decoder(encoding: str) -> Callable[[bytes], Any]:
    if encoding == "bytes":
        return bytes
    if encoding == "ndarray" or encoding.startswith("ndarray:"):
        return _ndarray_decoder(encoding)
    return lambda data: mds_decode(encoding, data)  # streaming's own decoder for everything else


def _sample_decoder(reader: MDSReader) -> Callable[[bytes], dict[str, Any]]:
    """`MDSReader.decode_sample`: the 4-byte sizes of the variable-size columns, then the columns."""
    columns = [
        (name, size or None, _column_decoder(encoding))
        for name, encoding, size in zip(
            reader.column_names, reader.column_encodings, reader.column_sizes, strict=True
        )
    ]
    if len(columns) == 1 and columns[0][1] is None:  # the usual one variable-size `tokens` column
        name, _, decode_one = columns[0]

        def decode_single(data: bytes) -> dict[str, Any]:
            (size,) = _UINT32.unpack_from(data)
            return {name: decode_one(data[4 : 4 + size])}

        return decode_single
    header = 4 * sum(size is None for _, size, _ in columns)

    def decode(data: bytes) -> dict[str, Any]:
        sample, index, start = {}, 0, header
        for name, size, decode_column in columns:
            if size is None:
                (size,) = _UINT32.unpack_from(data, index)
                index += 4
            sample[name] = decode_column(data[start : start + size])
            start += size
        return sample

    return decode


class _ShardFile:
    """The raw (uncompressed or already decompressed) file of a local MDS shard, memory-mapped read-only.

    Sample i of a shard with n samples: bytes 0-4 hold n, bytes 4+4i and 8+4i the sample's begin
    and end in the file; the sample is the 4-byte sizes of its variable-size columns, then each
    column's bytes. Samples are copied out of the map (they are a few KB), so no buffer of the
    map stays exported: the map is closed as soon as the last reference to this object goes.
    """

    def __init__(self, path: str, reader: MDSReader) -> None:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size != reader.raw_data.bytes:
                raise ValueError(f"{path} is not the size its index.json gives")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            status = os.fstat(file.fileno())
        self._file_id = (status.st_dev, status.st_ino)
        if _UINT32.unpack_from(self._map)[0] != reader.samples:
            self._map.close()
            raise ValueError(f"{path} does not hold the sample count its index.json gives")
        self._verify(path, reader.raw_data.hashes or {})
        self._decode = _sample_decoder(reader)

    def _verify(self, path: str, hashes: dict[str, str]) -> None:
        """Check the shard against the xxh64 (else sha1) checksum its index.json records, once per process."""
        if "xxh64" in hashes:
            algorithm, actual = "xxh64", xxhash.xxh64(self._map).hexdigest()
        elif "sha1" in hashes:
            algorithm, actual = "sha1", hashlib.sha1(self._map).hexdigest()
        else:
            return
        if actual != hashes[algorithm]:
            self._map.close()
            raise DamagedShardError(
                f"a shard could not be read: {path} does not match the {algorithm} checksum in its "
                "index.json (altered or damaged)"
            )

    def sample(self, index: int) -> dict[str, Any]:
        begin, end = _SAMPLE_SPAN.unpack_from(self._map, 4 + 4 * index)
        data = self._map[begin:end]
        if not data:
            raise IndexError(f"sample {index} is not present in the shard file")
        return self._decode(data)

    def is_at(self, path: str) -> bool:
        """Whether the mapped file is (still) the file at `path`."""
        try:
            status = os.stat(path)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == self._file_id

    def close(self) -> None:
        self._map.close()


class _Dataset(StreamingDataset):
    """StreamingDataset that reads local shards fast and fails loudly, never hangs, on a bad shard.

    Failures. Streaming leaves a shard it cannot fetch or verify PREPARING, so every other reader
    waits for it forever, and a background thread that raises makes the end of the epoch wait
    forever for it to exit. Here a failed shard has its damaged copy removed and is marked LOCAL:
    nobody waits on it any more, background prefetching goes on, and the thread that reads samples
    finds the file missing, fetches it again (streaming's own retry) and raises.

    Fast path. It applies when the dataset has no `cache_limit`, so that no shard is ever evicted
    once complete (the trainer never sets one): then a shard that is LOCAL, whose raw file has the
    size and sample count of its index entry, stays valid for the life of the process. Such a shard
    ("ready") is read through a cached read-only memory map (`_ShardFile`) instead of an open, seek
    and read per sample. That covers an uncompressed shard, and a compressed one once streaming has
    decompressed it; a shard still remote, being downloaded, or only present compressed goes
    through streaming's own `get_item`, which downloads or decompresses it. When every shard is
    ready (a local dataset, or a remote one fully cached), `__iter__` walks this worker's partition
    itself: the same sample ids from streaming's `_resume_incr_epoch`/`_get_work`, so order, resume
    and elasticity are unchanged, without the download and ready threads that have nothing to do.
    Otherwise streaming's threaded `__iter__` runs, and its prefetch thread skips ready shards
    instead of taking the cache file lock for every sample. A shard that this process evicts
    (`_evict_shard`, or a failed download) is unmapped first; with a `cache_limit` other
    processes evict shards too, and a map would keep a deleted file's disk space allocated, so
    then nothing is mapped.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shard_starts = [0, *np.cumsum(self.samples_per_shard).tolist()]
        self._ready_shards: set[int] = set()
        self._shard_files: dict[int, _ShardFile] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shard_files"] = {}  # memory maps do not pickle; a spawned worker maps its own
        return state

    def _is_ready(self, shard_id: int) -> bool:
        """Whether shard `shard_id` is complete on local disk for good (see "Fast path")."""
        return shard_id in self._ready_shards or self._shard_file(shard_id) is not None

    def _shard_file(self, shard_id: int) -> _ShardFile | None:
        """The memory map of a ready shard, opened on first use; None when the shard is not ready.

        A shard is ready when it is LOCAL both before and after its file is mapped, and the mapped
        file is still the one at its path: streaming marks a download LOCAL only after checking its
        hash, and a failed download is deleted before `prepare_shard` below marks it LOCAL, so a
        file caught between download and hash check is never taken for a ready one.
        """
        shard_file = self._shard_files.get(shard_id)
        shard = self.shards[shard_id]
        if shard_file is not None or self.cache_limit or not isinstance(shard, MDSReader):
            return shard_file
        known = shard_id in self._ready_shards
        if not known and self._shard_states[shard_id] != _ShardState.LOCAL:
            return None
        path = os.path.join(shard.dirname, shard.split, shard.raw_data.basename)
        try:
            shard_file = _ShardFile(path, shard)
        except (OSError, ValueError):
            return None
        if not known and not (self._shard_states[shard_id] == _ShardState.LOCAL and shard_file.is_at(path)):
            shard_file.close()
            return None
        self._ready_shards.add(shard_id)
        if len(self._shard_files) >= _MAX_OPEN_SHARDS:
            self._shard_files.pop(next(iter(self._shard_files)), None)  # the first opened: unmapped
        self._shard_files[shard_id] = shard_file
        return shard_file

    def _forget_shard(self, shard_id: int) -> None:
        """Stop reading shard `shard_id` through a map: it is unmapped once no read in flight uses it.

        Not closed here: a background thread may forget a shard that the main thread is reading.
        """
        self._ready_shards.discard(shard_id)
        self._shard_files.pop(shard_id, None)

    def _fast_item(self, sample_id: int) -> dict[str, Any] | None:
        """Sample `sample_id` read through its shard's memory map, or None if that shard is not ready."""
        if not 0 <= sample_id < self.num_samples:
            return None
        shard_id = bisect.bisect_right(self._shard_starts, sample_id) - 1
        shard_file = self._shard_files.get(shard_id) or self._shard_file(shard_id)
        if shard_file is None:
            return None
        return shard_file.sample(sample_id - self._shard_starts[shard_id])

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        event = getattr(self, "_event", None)
        sample = None if event is not None and event.is_set() else self._fast_item(sample_id)
        return super().get_item(sample_id, retry) if sample is None else sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not all(self._is_ready(shard_id) for shard_id in range(self.num_shards)):
            yield from super().__iter__()
            return
        # Streaming's own preamble: end the previous epoch's iteration, fail as it does after a
        # background failure, then this worker's sample ids of this (or the resumed) epoch.
        if hasattr(self, "_iterator"):
            self._iterator.exit()
        if not hasattr(self, "_event"):
            self._event = Event()
        elif self._event.is_set():
            raise RuntimeError("Background thread failed. Check other traceback.")
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, sample_in_epoch = self._resume_incr_epoch()
        sample_ids = self._get_work(epoch, sample_in_epoch)
        if not len(sample_ids):
            return
        self._iterator = it = _Iterator(sample_ids)
        for _ in range(it._num_threads_to_exit):
            it.on_exit()  # there are no download and ready threads to wait for
        it.prepare_index = it.ready_index = it.total
        starts = np.array(self._shard_starts)
        shard_ids = np.searchsorted(starts, sample_ids, side="right") - 1
        indices = sample_ids - starts[shard_ids]  # (-1 holes give nonsense here, and are skipped)
        shard_files = self._shard_files
        for sample_id, shard_id, index in zip(
            sample_ids.tolist(), shard_ids.tolist(), indices.tolist(), strict=True
        ):
            if it._state != _IterState.ITERATING:  # should_exit() without its lock: a newer epoch began
                return
            if sample_id != -1:  # -1: a hole streaming pads the partition with
                shard_file = shard_files.get(shard_id) or self._shard_file(shard_id)
                yield super().get_item(sample_id) if shard_file is None else shard_file.sample(index)
            it.yield_index += 1
        it.exit()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        if not blocking and shard_id in self._ready_shards:
            return  # streaming's prefetch thread asks for every sample; a ready shard needs nothing
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as error:
            self._forget_shard(shard_id)
            if self.streams[self.stream_per_shard[shard_id]].remote is not None:
                self.shards[shard_id].evict()  # only cached copies: never a dataset's own files
            self._shard_states[shard_id] = _ShardState.LOCAL
            if blocking:  # streaming's background threads prefetch with blocking=False
                raise RuntimeError(f"a shard could not be read: {error}") from error
            logger.warning("prefetching shard %d failed (%s); it is fetched again when read", shard_id, error)

    def _evict_shard(self, shard_id: int) -> None:
        self._forget_shard(shard_id)  # unmap it in this process before the file goes
        super()._evict_shard(shard_id)


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
            return {"input_ids": torch.from_numpy(next(batches)["input_ids"])}
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
        # Set on the main copy too: workers of later epochs are forked from it and do not see the
        # resume state once it is stale.
        self._dataset.num_canonical_nodes = canonical
        if seed != self._dataset.shuffle_seed:
            reseed_weights(self._dataset, seed)
        self._dataset.shuffle_seed = seed
        self._dataset.initial_physical_nodes = self._initial_physical_nodes
        # Streaming ignores a resume state older than the epoch it thinks comes next (a rollback rewinds).
        self._dataset.next_epoch = self._epoch
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
            f"dataset '{info.source}' has no val split; {PREPARE_HINT} (it writes train/ and val/)"
        )
    _clean_stale_shared_memory_once()
    dataset = _Dataset(
        streams=split_streams(data, split, info),
        epoch_size=data.epoch_size if split == "train" and data.streams else None,
        batch_size=micro_batch_size,
        shuffle=(data.shuffle and split == "train") if shuffle is None else shuffle,
        shuffle_seed=seed,
        num_canonical_nodes=data.num_canonical_nodes,
        shuffle_block_size=data.shuffle_block_size,
    )
    for stream_id, stream in enumerate(dataset.streams):
        if stream.remote is not None:  # streaming checks hashes only of what it downloads, if told which
            hashes = dataset.shards[dataset.shard_offset_per_stream[stream_id]].hashes
            stream.validate_hash = next((name for name in ("xxh64", "sha1") if name in hashes), None)
    loader = StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=data.num_workers if split == "train" else 0,
        collate_fn=_collate,
        drop_last=split == "train",
        persistent_workers=False,
    )
    logger.info(
        "data %s: %d samples of %d tokens from %s, micro batch %d, %d workers",
        split,
        dataset.epoch_size,
        info.seq_len,
        describe(dataset.streams),
        micro_batch_size,
        loader.num_workers,
    )
    return TokenBatches(
        dataset, loader, split, micro_batch_size, info.seq_len, global_batch_size, world_size, num_nodes
    )
