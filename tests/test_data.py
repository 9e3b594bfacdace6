"""The training data loader: values, determinism, exact resume, ranks, elastic order, remote cache."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from mds_fixtures import sample_ids, sample_tokens, write_dataset
from streaming import MDSWriter, StreamingDataset
from streaming.base.format.mds import MDSReader
from streaming.base.partition import get_partitions
from trainer_runs import fresh_processes, run_to_completion

from trainer.config import DataConfig, StreamConfig
from trainer.data.dataset_info import _read_info, node_cache_dir
from trainer.data.loader import TokenBatches, build_loader, read_dataset_info
from trainer.data.mapped_dataset import MappedDataset
from trainer.data.shm_cleanup import clean_stale_streaming_shm, streaming_groups
from trainer.errors import UserError

SEED = 17


def take(loader: TokenBatches, count: int) -> list[list[int]]:
    """Sample ids of the next `count` batches of a fresh endless iteration."""
    return [sample_ids(batch["input_ids"]) for batch in itertools.islice(loader, count)]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", train_samples=64, val_samples=24)


# --- read_dataset_info -------------------------------------------------------------------------


def test_read_dataset_info_reports_prepare_json_and_sample_counts(dataset: Path) -> None:
    (dataset / "tokenizer").mkdir()
    info = read_dataset_info(dataset)
    assert (info.seq_len, info.vocab_size, info.eos_id) == (16, 512, 511)
    assert (info.train_samples, info.val_samples) == (64, 24)
    assert info.tokenizer_dir == dataset / "tokenizer"


def test_dataset_without_prepare_json_takes_seq_len_from_first_sample(tmp_path: Path) -> None:
    root = write_dataset(
        tmp_path / "foreign", train_samples=20, val_samples=0, seq_len=12, prepare_json=False
    )
    info = read_dataset_info(root)
    assert (info.seq_len, info.vocab_size, info.eos_id) == (12, None, None)
    assert (info.train_samples, info.val_samples) == (20, 0)


@pytest.mark.parametrize("prepare_json", [True, False])
def test_dataset_info_downloaded_from_a_remote_matches_the_folder(tmp_path: Path, prepare_json: bool) -> None:
    """A URL remote needs a network; streaming's downloader runs the same path on a plain folder."""
    root = write_dataset(tmp_path / "data", train_samples=40, val_samples=8, prepare_json=prepare_json)
    downloaded = _read_info(str(root), "data.remote", tmp_path / "scratch")
    assert downloaded == read_dataset_info(root)
    assert (tmp_path / "scratch" / "train" / "index.json").is_file()


def test_missing_folder_is_a_user_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as error:
        read_dataset_info(missing)
    message = str(error.value)
    assert str(missing) in message and "llm-train prepare" in message and "\n" not in message


def test_folder_that_is_not_a_prepared_dataset_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "plain" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"plain.*not a prepared dataset.*llm-train prepare"):
        read_dataset_info(tmp_path / "plain")


def test_dataset_without_tokens_column_is_a_user_error(tmp_path: Path) -> None:
    with MDSWriter(out=str(tmp_path / "text" / "train"), columns={"text": "str"}) as writer:
        writer.write({"text": "hello"})
    with pytest.raises(UserError, match="no integer 'tokens' column"):
        read_dataset_info(tmp_path / "text")


# --- batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["ndarray:uint16", "ndarray:uint32", "bytes"])
def test_batches_are_long_tensors_holding_the_stored_tokens(tmp_path: Path, encoding: str) -> None:
    root = write_dataset(
        tmp_path / "data", train_samples=32, val_samples=0, encoding=encoding, prepare_json=False
    )
    loader = build_loader(DataConfig(path=str(root), num_workers=0), "train", 4, SEED)
    seen = []
    for batch in itertools.islice(loader, loader.batches_per_epoch):
        input_ids = batch["input_ids"]
        assert input_ids.dtype == torch.long and input_ids.shape == (4, 16)
        for row in input_ids:
            index = int(row[0])
            assert row.tolist() == sample_tokens(index, 16, 512).tolist()
            seen.append(index)
    assert sorted(seen) == list(range(32))


def test_same_seed_gives_same_order_and_another_seed_another(dataset: Path) -> None:
    data = DataConfig(path=str(dataset))
    first = take(build_loader(data, "train", 4, SEED), 20)
    again = take(build_loader(data, "train", 4, SEED), 20)
    other = take(build_loader(data, "train", 4, SEED + 1), 20)
    assert first == again
    assert first != other
    assert first[16:] != first[:4]  # each epoch is shuffled anew
    assert sorted(sum(first[:16], [])) == sorted(sum(other[:16], [])) == list(range(64))


def test_val_iter_batches_is_bounded_unshuffled_and_the_same_every_call(dataset: Path) -> None:
    loader = build_loader(DataConfig(path=str(dataset), num_workers=2), "val", 4, SEED)
    first = [sample_ids(batch["input_ids"]) for batch in loader.iter_batches(3)]
    again = [sample_ids(batch["input_ids"]) for batch in loader.iter_batches(3)]
    whole = [sample_ids(batch["input_ids"]) for batch in loader.iter_batches()]
    assert first == again == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sum(whole, []) == list(range(24))


def test_dataset_smaller_than_a_global_batch_is_a_user_error(dataset: Path) -> None:
    loader = build_loader(DataConfig(path=str(dataset)), "train", 4, SEED, global_batch_size=128)
    with pytest.raises(UserError, match="fewer than one global batch"):
        next(iter(loader))


# --- exact resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [5, 16, 21], ids=["mid-epoch", "epoch-end", "next-epoch"])
def test_resume_yields_exactly_the_remaining_samples(dataset: Path, num_workers: int, stop: int) -> None:
    data = DataConfig(path=str(dataset), num_workers=num_workers)
    uninterrupted = take(build_loader(data, "train", 4, SEED), 40)  # 16 batches per epoch

    first = build_loader(data, "train", 4, SEED)
    batches = iter(first)
    before = [sample_ids(next(batches)["input_ids"]) for _ in range(stop)]
    state = first.state_dict()
    assert state["epoch"] == stop // 16 and state["sample_in_epoch"] == stop % 16 * 4

    second = build_loader(data, "train", 4, SEED)
    second.load_state_dict(json.loads(json.dumps(state)))  # it travels through a checkpoint file
    after = take(second, 40 - stop)
    assert before + after == uninterrupted


# --- ranks -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, tasks: list[dict[str, Any]], out: str) -> None:
    """One rank of a local job: run each task's loader (of `path`, or of a mixture of `streams`) and
    write what it yielded."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = []
        for task in tasks:
            streams = [StreamConfig(**stream) for stream in task.get("streams", [])]
            loader = build_loader(
                DataConfig(path=task["path"], streams=streams),
                "train",
                task["micro"],
                SEED,
                global_batch_size=4,
            )
            if task["resume"]:
                loader.load_state_dict(task["resume"])
            batches = iter(loader)
            ids = [sample_ids(next(batches)["input_ids"]) for _ in range(3)]
            state = loader.state_dict()
            ids += [sample_ids(next(batches)["input_ids"]) for _ in range(task["steps"] - 3)]
            results.append({"ids": ids, "state": state})
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, tasks: list[dict[str, Any]], out: Path) -> list[list[dict[str, Any]]]:
    """Run `tasks` on `world_size` real processes; per rank, per task: {"ids", "state"}."""
    context = fresh_processes()
    port = _free_port()
    ranks = [
        context.Process(target=_rank_main, args=(r, world_size, port, tasks, str(out)))
        for r in range(world_size)
    ]
    assert run_to_completion(ranks, timeout=120) == [0] * world_size
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank job (micro batch 2, global batch 4) and the 1-rank reference (micro batch 4).

    `even` has 64 samples (16 global batches an epoch); `ragged` has 71, so that each epoch ends
    in a partial global batch, which the loader must drop the same way on every layout.
    """
    root = tmp_path_factory.mktemp("ranks")
    even = write_dataset(root / "even", train_samples=64, val_samples=0)
    ragged = write_dataset(root / "ragged", train_samples=71, val_samples=0)
    single = build_loader(DataConfig(path=str(ragged)), "train", 4, SEED, global_batch_size=4)
    batches = iter(single)
    reference = [sample_ids(next(batches)["input_ids"]) for _ in range(20)]
    resume_state = single.state_dict()  # epoch 1, 3 batches in (17 complete global batches an epoch)
    reference += [sample_ids(next(batches)["input_ids"]) for _ in range(20)]
    tasks = [
        {"path": str(even), "micro": 2, "steps": 20, "resume": None},
        {"path": str(ragged), "micro": 2, "steps": 40, "resume": None},
        {"path": str(ragged), "micro": 2, "steps": 20, "resume": resume_state},
    ]
    ranks = run_ranks(2, tasks, root)
    return {"ranks": ranks, "reference": reference, "resume_state": resume_state}


def _global_batches(ranks: list[list[dict[str, Any]]], task: int) -> list[list[int]]:
    """Per step, the samples of all ranks together, sorted."""
    per_rank = [rank[task]["ids"] for rank in ranks]
    return [sorted(sum(step, [])) for step in zip(*per_rank, strict=True)]


def test_two_ranks_together_see_every_sample_of_an_epoch_exactly_once(two_ranks: dict[str, Any]) -> None:
    epoch = _global_batches(two_ranks["ranks"], 0)[:16]
    assert all(len(step) == 4 for step in epoch)
    assert sorted(sum(epoch, [])) == list(range(64))
    first_rank = set(sum(two_ranks["ranks"][0][0]["ids"][:16], []))
    assert len(first_rank) == 32  # each rank a half, no overlap


def test_state_dict_is_the_same_on_every_rank(two_ranks: dict[str, Any]) -> None:
    states = [rank[0]["state"] for rank in two_ranks["ranks"]]
    assert states[0] == states[1]
    assert states[0]["epoch"] == 0 and states[0]["sample_in_epoch"] == 3 * 2 * 2


def test_elastic_order_one_rank_micro_4_equals_two_ranks_micro_2(two_ranks: dict[str, Any]) -> None:
    single = [sorted(batch) for batch in two_ranks["reference"]]
    assert _global_batches(two_ranks["ranks"], 1) == single  # 2 epochs and more, partial batches dropped


def test_resume_on_another_world_size_keeps_the_global_order(two_ranks: dict[str, Any]) -> None:
    assert two_ranks["resume_state"]["epoch"] == 1
    single = [sorted(batch) for batch in two_ranks["reference"][20:]]
    assert _global_batches(two_ranks["ranks"], 2) == single


@pytest.mark.parametrize("canonical", [1, 2, 4])
def test_streaming_layouts_with_pinned_canonical_nodes_share_each_global_batch(canonical: int) -> None:
    """Layouts this machine cannot run (several nodes) through streaming's own partitioner."""

    def global_batches(nodes: int, ranks_per_node: int, micro: int) -> list[list[int]]:
        ids = get_partitions("relaxed", 64, canonical, nodes, ranks_per_node, 1, micro)
        per_device = ids.reshape(nodes * ranks_per_node, -1, micro)  # (device, batch, sample)
        return [sorted(per_device[:, step].flatten().tolist()) for step in range(per_device.shape[1])]

    reference = global_batches(1, 1, 8)
    for nodes, ranks_per_node, micro in [(1, 2, 4), (2, 1, 4), (2, 2, 2), (4, 2, 1)]:
        assert global_batches(nodes, ranks_per_node, micro) == reference


# --- remote, damaged data ----------------------------------------------------------------------


def test_remote_is_streamed_into_a_per_node_cache(dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = DataConfig(path=str(cache), remote=str(dataset))
    loader = build_loader(data, "train", 4, SEED)
    seen = sorted(sum(take(loader, loader.batches_per_epoch), []))
    assert seen == list(range(64))
    shards = sorted(path.name for path in (dataset / "train").iterdir())
    assert sorted(path.name for path in (cache / "node-0" / "train").iterdir()) == shards


def test_node_cache_folder_is_rank_over_local_world_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert node_cache_dir(tmp_path) == tmp_path / "node-2"
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert node_cache_dir(tmp_path) == tmp_path / "node-0"


def test_missing_shard_is_a_user_error_naming_it(dataset: Path) -> None:
    (dataset / "train" / "shard.00001.mds").unlink()
    with pytest.raises(UserError, match=r"shard\.00001\.mds.* is missing"):
        read_dataset_info(dataset)  # what training calls first, before any model is built
    with pytest.raises(UserError, match=r"shard\.00001\.mds.* is missing"):
        build_loader(DataConfig(path=str(dataset)), "train", 4, SEED)


def test_truncated_shard_is_a_user_error_naming_it_before_training(dataset: Path) -> None:
    shard = dataset / "val" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"val/shard\.00000\.mds.* bytes, its index.json says .*truncated"):
        read_dataset_info(dataset)


def test_altered_byte_in_a_local_shard_is_a_user_error_naming_it(dataset: Path) -> None:
    shard = dataset / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    read_dataset_info(dataset)
    loader = build_loader(DataConfig(path=str(dataset)), "train", 4, SEED)
    with pytest.raises(UserError, match=r"shard\.00001\.mds does not match the xxh64 checksum"):
        take(loader, loader.batches_per_epoch)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_remote_shard_is_a_user_error_naming_it(
    dataset: Path, tmp_path: Path, num_workers: int
) -> None:
    shard = dataset / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    loader = build_loader(
        DataConfig(path=str(tmp_path / "cache"), remote=str(dataset), num_workers=num_workers),
        "train",
        4,
        SEED,
    )
    with pytest.raises(UserError, match=r"Checksum failure: .*shard\.00001\.mds"):
        take(loader, loader.batches_per_epoch)
    assert not (tmp_path / "cache" / "node-0" / "train" / "shard.00001.mds").exists()  # not kept as if good


# --- fast path: memory-mapped shards, no streaming threads ---------------------------------------


def _write_compressed(root: Path, num_samples: int, encoding: str = "ndarray:uint16") -> Path:
    """A train split like `write_split`'s, with zstd-compressed shards."""
    dtype = np.int64 if encoding == "bytes" else np.dtype(encoding.split(":")[1])
    with MDSWriter(
        out=str(root / "train"),
        columns={"tokens": encoding},
        compression="zstd",
        hashes=["sha1", "xxh64"],
        size_limit=1024,
    ) as writer:
        for index in range(num_samples):
            tokens = sample_tokens(index, 16, 512).astype(dtype)
            writer.write({"tokens": tokens.tobytes() if encoding == "bytes" else tokens})
    return root


def _write_many_columns(root: Path, num_samples: int) -> Path:
    """Fixed- and variable-size columns of several encodings, to check the sample layout decoding."""
    columns = {
        "tokens": "ndarray:uint16",
        "fixed": "ndarray:int32:2,3",
        "free": "ndarray",  # dtype and shape stored with every sample
        "raw": "bytes",
        "id": "int",
        "name": "str",
        "score": "float64",
    }
    with MDSWriter(out=str(root / "train"), columns=columns, size_limit=4096) as writer:
        for index in range(num_samples):
            writer.write(
                {
                    "tokens": sample_tokens(index, 16 + index % 5, 512).astype(np.uint16),
                    "fixed": np.arange(6, dtype=np.int32).reshape(2, 3) * index,
                    "free": np.full((2, 300) if index % 2 else (index + 1,), index, np.float32),
                    "raw": bytes(range(index % 7)) + b"x",
                    "id": index,
                    "name": f"sample-{index}",
                    "score": index / 3,
                }
            )
    return root


def _assert_same_sample(fast: dict[str, Any], reference: dict[str, Any]) -> None:
    assert fast.keys() == reference.keys()
    for name, value in reference.items():
        assert type(fast[name]) is type(value), name
        if isinstance(value, np.ndarray):
            assert (fast[name].dtype, fast[name].shape) == (value.dtype, value.shape), name
            assert np.array_equal(fast[name], value), name
        else:
            assert fast[name] == value, name


@pytest.mark.parametrize(
    "layout", ["ndarray:uint16", "ndarray:uint32", "bytes", "zstd ndarray:uint16", "zstd bytes", "columns"]
)
def test_fast_path_reads_exactly_what_streaming_reads(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    if layout == "columns":
        _write_many_columns(root, 40)
    elif layout.startswith("zstd"):
        _write_compressed(root, 40, layout.split()[1])
    else:
        write_dataset(root, train_samples=40, val_samples=0, encoding=layout)
    dataset = MappedDataset(local=str(root), split="train", batch_size=4)
    assert dataset.num_shards > 1
    compressed = layout.startswith("zstd")
    if compressed:  # only the .zstd files are there: streaming's path decompresses them on first use
        assert dataset._fast_item(0) is None
    for sample_id in range(dataset.num_samples):
        reference = StreamingDataset.get_item(dataset, sample_id)  # streaming's open, seek and read
        fast = dataset._fast_item(sample_id)
        assert fast is not None
        _assert_same_sample(fast, reference)
        _assert_same_sample(dataset[sample_id], reference)
    assert sorted(dataset._shard_files) == list(range(dataset.num_shards))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_reads_local_shards_without_streamings_per_sample_read(
    dataset: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int
) -> None:
    def fail(*args: Any) -> None:
        raise AssertionError("streaming's per-sample read was used")

    monkeypatch.setattr(MDSReader, "get_sample_data", fail)  # DataLoader workers are forked: patched too
    loader = build_loader(DataConfig(path=str(dataset), num_workers=num_workers), "train", 4, SEED)
    seen = sorted(sum(take(loader, loader.batches_per_epoch), []))
    assert seen == list(range(64))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fast_path_yields_the_batches_of_streamings_own_path(
    dataset: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int
) -> None:
    """Same order, epochs and resume as streaming's threaded iteration with its own reads."""
    data = DataConfig(path=str(dataset), num_workers=num_workers)
    fast = take(build_loader(data, "train", 4, SEED), 40)
    first = build_loader(data, "train", 4, SEED)
    batches = iter(first)
    before = [sample_ids(next(batches)["input_ids"]) for _ in range(21)]
    state = first.state_dict()

    monkeypatch.setattr(MappedDataset, "_shard_file", lambda self, shard_id: None)  # nothing is ever ready
    slow = take(build_loader(data, "train", 4, SEED), 40)
    second = build_loader(data, "train", 4, SEED)
    second.load_state_dict(state)
    assert fast == slow
    assert before + take(second, 19) == slow


def test_compressed_dataset_is_decompressed_then_read_fast(tmp_path: Path) -> None:
    plain = write_dataset(tmp_path / "plain", train_samples=64, val_samples=0, prepare_json=False)
    zipped = _write_compressed(tmp_path / "zipped", 64)
    expected = take(build_loader(DataConfig(path=str(plain)), "train", 4, SEED), 40)
    loader = build_loader(DataConfig(path=str(zipped)), "train", 4, SEED)
    assert take(loader, 40) == expected  # epoch 0 through streaming (decompressing), then fast
    assert sorted(loader._dataset._shard_files) == list(range(loader._dataset.num_shards))


def test_remote_cache_maps_shards_and_closes_them_on_eviction(dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    loader = build_loader(DataConfig(path=str(cache), remote=str(dataset)), "train", 4, SEED)
    assert sorted(sum(take(loader, 2 * loader.batches_per_epoch), [])) == sorted(list(range(64)) * 2)
    shards = loader._dataset
    assert sorted(shards._shard_files) == list(range(shards.num_shards))
    mapped = weakref.ref(shards._shard_files[1])

    shards.evict_shard(1)
    assert 1 not in shards._shard_files and 1 not in shards._ready_shards
    assert mapped() is None  # unmapped: the file's space is freed
    assert not (cache / "node-0" / "train" / "shard.00001.mds").exists()
    assert shards._fast_item(int(shards._shard_starts[1])) is None  # evicted: not read from a map
    again = StreamingDataset.get_item(shards, int(shards._shard_starts[1]))  # downloads it again
    assert again["tokens"].tolist() == sample_tokens(shards._shard_starts[1], 16, 512).tolist()
    assert shards._fast_item(int(shards._shard_starts[1])) is not None


def test_no_shard_is_mapped_when_a_cache_limit_may_evict_it(dataset: Path, tmp_path: Path) -> None:
    shards = MappedDataset(
        remote=str(dataset), local=str(tmp_path / "cache"), split="train", batch_size=4, cache_limit="1mb"
    )
    assert sorted(int(sample["tokens"][0]) for sample in shards) == list(range(64))
    assert shards._shard_files == {} and shards._ready_shards == set()


HOLD_A_DATASET = """
import sys, time
from streaming import StreamingDataset
from trainer.data.shm_cleanup import register_owner
dataset = StreamingDataset(local=sys.argv[1], split="train", batch_size=1)
if sys.argv[2] == "record":
    register_owner(dataset._shm_prefix_int)
print(f"{dataset._shm_prefix_int:06d}", flush=True)
time.sleep(600)
"""


def hold_a_dataset(dataset: Path, record: bool) -> tuple[subprocess.Popen, str]:
    """A process holding a StreamingDataset, in its own session (so that its resource tracker dies with it)."""
    command = [sys.executable, "-c", HOLD_A_DATASET, str(dataset), "record" if record else "no"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc, proc.stdout.readline().strip()


def kill_session(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_stopped_loaders_shared_memory_is_freed_and_live_ones_kept(dataset: Path) -> None:
    """Streaming's own clean-up frees every group, live ones too; ours frees those whose recorded owners died.

    The live loader started after the stopped one, so it maps the stopped one's group too (streaming
    attaches to every group while it looks for a free number): mapping alone cannot tell them apart.
    """
    stopped, stopped_prefix = hold_a_dataset(dataset, record=True)
    live, live_prefix = hold_a_dataset(dataset, record=True)
    try:
        kill_session(stopped)
        groups = streaming_groups()
        assert {live_prefix, stopped_prefix} <= set(groups)
        freed = clean_stale_streaming_shm()
        assert stopped_prefix in freed and stopped_prefix not in streaming_groups()
        assert not (Path(tempfile.gettempdir()) / f"{stopped_prefix}_barrier_filelock").exists()
        assert live_prefix not in freed and streaming_groups()[live_prefix] == groups[live_prefix]
    finally:
        kill_session(live)
    assert live_prefix in clean_stale_streaming_shm()  # once its process is gone, its group goes too


def test_group_that_no_loader_of_ours_recorded_is_left_alone(dataset: Path) -> None:
    other, other_prefix = hold_a_dataset(dataset, record=False)  # another program's, or an older version's
    kill_session(other)
    segments = streaming_groups()[other_prefix]
    try:
        assert other_prefix not in clean_stale_streaming_shm()
        assert streaming_groups()[other_prefix] == segments
    finally:
        for name in segments:
            (Path("/dev/shm") / name).unlink(missing_ok=True)
