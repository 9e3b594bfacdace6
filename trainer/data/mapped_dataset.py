"""`MappedDataset`: mosaicml-streaming's dataset, reading local shards through memory maps.

Reading. Streaming opens, seeks and reads the shard file for every sample, and iterates through
two background threads per worker that walk every sample too; together about 200 us a sample,
some 30x a plain memmap loader. `MappedDataset` keeps streaming's sample order, resume and downloads
but reads a shard whose raw file is local through a read-only memory map (`ShardFile`, the MDS
layout decoded exactly as `MDSReader` does), and, once every shard is local, walks its partition
without the threads (`MappedDataset.__iter__`). See "Fast path" in `MappedDataset` for when it applies.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterator
from threading import Event
from typing import Any

import numpy as np
from streaming import StreamingDataset
from streaming.base.dataset import _Iterator, _IterState, _ShardState
from streaming.base.format.mds import MDSReader

from trainer.data.mds_shard import ShardFile
from trainer.data.read_retry import (
    InjectedReadErrors,
    ShardReadError,
    UnreadableShardError,
    read_with_retries,
)
from trainer.data.shm_cleanup import register_owner
from trainer.data.shm_prefix import streaming_claims_prefix

logger = logging.getLogger(__name__)

_MAX_OPEN_SHARDS = 1024  # memory maps kept open per process (each is one entry of vm.max_map_count)


class MappedDataset(StreamingDataset):
    """StreamingDataset that reads local shards fast and fails loudly, never hangs, on a bad shard.

    Failures. Streaming leaves a shard it cannot fetch or verify PREPARING, so every other reader
    waits for it forever, and a background thread that raises makes the end of the epoch wait
    forever for it to exit. Here a failed shard has its damaged copy removed and is marked LOCAL:
    nobody waits on it any more, background prefetching goes on, and the thread that reads samples
    finds the file missing, fetches it again (streaming's own retry) and raises.

    Fast path. It applies when the dataset has no `cache_limit`, so that no shard is ever evicted
    once complete (the trainer never sets one): then a shard that is LOCAL, whose raw file has the
    size and sample count of its index entry, stays valid for the life of the process. Such a shard
    ("ready") is read through a cached read-only memory map (`ShardFile`) instead of an open, seek
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

    def __init__(self, read_retries: int = 5, read_retry_wait_s: float = 1.0, **kwargs: Any) -> None:
        self._read_retries, self._read_retry_wait_s = read_retries, read_retry_wait_s
        self._injected_read_errors = InjectedReadErrors()
        with streaming_claims_prefix():  # jobs that start together on one host get groups of their own
            super().__init__(**kwargs)
        register_owner(self._shm_prefix_int)  # so that a later start can tell when its shared memory is stale
        self._shard_starts = [0, *np.cumsum(self.samples_per_shard).tolist()]
        self._ready_shards: set[int] = set()
        self._shard_files: dict[int, ShardFile] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shard_files"] = {}  # memory maps do not pickle; a spawned worker maps its own
        return state

    def _is_ready(self, shard_id: int) -> bool:
        """Whether shard `shard_id` is complete on local disk for good (see "Fast path")."""
        return shard_id in self._ready_shards or self._shard_file(shard_id) is not None

    def _shard_file(self, shard_id: int) -> ShardFile | None:
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
            shard_file = ShardFile(path, shard)
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
        """Sample `sample_id`, its read retried through transient failures (trainer/data/read_retry.py)."""
        return read_with_retries(
            lambda: self._get_item_once(sample_id, retry),
            f"reading sample {sample_id}",
            self._read_retries,
            self._read_retry_wait_s,
        )

    def _get_item_once(self, sample_id: int, retry: int) -> Any:
        self._injected_read_errors.check()
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
                if shard_file is None or self._injected_read_errors.left:
                    yield self.get_item(sample_id)
                else:
                    yield shard_file.sample(index)
            it.yield_index += 1
        it.exit()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        if not blocking:  # streaming's background threads prefetch so; a failure is retried when read
            if shard_id in self._ready_shards:
                return  # the prefetch thread asks for every sample; a ready shard needs nothing
            try:
                self._prepare_once(shard_id, blocking)
            except Exception as error:
                logger.warning(
                    "prefetching shard %d failed (%s); it is fetched again when read", shard_id, error
                )
            return
        try:
            read_with_retries(
                lambda: self._prepare_once(shard_id, blocking),
                f"fetching shard {shard_id}",
                self._read_retries,
                self._read_retry_wait_s,
            )
        except ShardReadError:
            raise
        except Exception as error:  # missing or damaged: the loader reports it as a user error
            raise UnreadableShardError(f"a shard could not be read: {error}") from error

    def _prepare_once(self, shard_id: int, blocking: bool) -> None:
        """Streaming's `prepare_shard`; on failure the shard is left for the next try (see "Failures")."""
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception:
            self._forget_shard(shard_id)
            if self.streams[self.stream_per_shard[shard_id]].remote is not None:
                self.shards[shard_id].evict()  # only cached copies: never a dataset's own files
            self._shard_states[shard_id] = _ShardState.LOCAL
            raise

    def _evict_shard(self, shard_id: int) -> None:
        self._forget_shard(shard_id)  # unmap it in this process before the file goes
        super()._evict_shard(shard_id)
