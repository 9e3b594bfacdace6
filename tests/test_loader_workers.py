"""The loader with DataLoader workers: kept across epochs, evaluations and rollbacks, the same batches as
without workers, exact resume, streaming's predownload in shards, pinned batches on CUDA, config errors."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from mds_fixtures import sample_ids, write_dataset

from launcher.cli import main as cli_main
from trainer.config import DataConfig, StreamConfig, load_config
from trainer.data.loader import TokenBatches, build_loader
from trainer.errors import UserError

SEED = 17
MICRO = 4


def ids_of(batches: object, count: int) -> list[list[int]]:
    """Sample ids of the next `count` batches of an iterator."""
    return [sample_ids(batch["input_ids"]) for batch in itertools.islice(batches, count)]  # type: ignore[call-overload]


def worker_pids(loader: TokenBatches) -> list[int]:
    """The pids of the loader's DataLoader worker processes (empty before the first batch).

    Each is checked to be a live child of this process: workers forked anew would be other children.
    """
    workers = loader._loader._iterator
    pids = [] if workers is None else [process.pid for process in workers._workers]
    assert set(pids) <= {child.pid for child in multiprocessing.active_children()}
    return pids


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", train_samples=64, val_samples=24)  # 16 train batches of 4


def test_train_workers_are_the_same_processes_across_an_epoch_boundary(dataset: Path) -> None:
    loader = build_loader(DataConfig(path=str(dataset), num_workers=2), "train", MICRO, SEED)
    batches = iter(loader)
    ids_of(batches, 1)
    first_epoch = worker_pids(loader)
    ids_of(batches, loader.batches_per_epoch + 2)  # into the second epoch
    assert loader.epoch == 1
    assert len(first_epoch) == 2 and worker_pids(loader) == first_epoch


def test_val_workers_are_the_same_processes_across_evaluations(dataset: Path) -> None:
    loader = build_loader(DataConfig(path=str(dataset), num_workers=2), "val", MICRO, SEED)
    first = ids_of(loader.iter_batches(2), 2)  # cut short, as an evaluation of eval.batches does
    pids = worker_pids(loader)
    second = ids_of(loader.iter_batches(2), 2)
    whole = ids_of(loader.iter_batches(), 100)
    assert len(pids) == 2 and worker_pids(loader) == pids
    assert first == second == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sum(whole, []) == list(range(24))


@pytest.mark.parametrize("train_samples", [64, 60], ids=["even", "odd-batches"])
def test_train_batches_with_two_workers_equal_the_batches_without(tmp_path: Path, train_samples: int) -> None:
    """Shuffled, over two and a half epochs; 60 samples make 15 batches, one more for one worker."""
    root = write_dataset(tmp_path / "data", train_samples=train_samples, val_samples=0)
    without = ids_of(iter(build_loader(DataConfig(path=str(root), num_workers=0), "train", MICRO, SEED)), 38)
    loader = build_loader(DataConfig(path=str(root), num_workers=2, prefetch_factor=3), "train", MICRO, SEED)
    assert ids_of(iter(loader), 38) == without
    assert sorted(sum(without[: loader.batches_per_epoch], [])) == list(range(train_samples))


def test_val_batches_with_two_workers_equal_the_batches_without(tmp_path: Path) -> None:
    """26 samples: 7 batches, the last one partial (val keeps it)."""
    root = write_dataset(tmp_path / "data", train_samples=16, val_samples=26)
    without = ids_of(build_loader(DataConfig(path=str(root)), "val", MICRO, SEED).iter_batches(), 100)
    with_workers = build_loader(DataConfig(path=str(root), num_workers=2), "val", MICRO, SEED)
    assert ids_of(with_workers.iter_batches(), 100) == without
    assert without[-1] == [24, 25] and sum(without, []) == list(range(26))


def test_resume_mid_epoch_with_workers_gives_the_same_next_batches(dataset: Path) -> None:
    data = DataConfig(path=str(dataset), num_workers=2)
    uninterrupted = ids_of(iter(build_loader(data, "train", MICRO, SEED)), 24)
    first = build_loader(data, "train", MICRO, SEED)
    batches = iter(first)
    before = ids_of(batches, 5)
    state = json.loads(json.dumps(first.state_dict()))  # it travels through a checkpoint file
    batches.close()
    second = build_loader(data, "train", MICRO, SEED)
    second.load_state_dict(state)
    assert before + ids_of(iter(second), 19) == uninterrupted


def test_rollback_with_workers_repeats_the_batches_in_the_same_workers(dataset: Path) -> None:
    """The rollback path: close the endless iterator, load an earlier state, iterate again."""
    loader = build_loader(DataConfig(path=str(dataset), num_workers=2), "train", MICRO, SEED)
    batches = iter(loader)
    ids_of(batches, 3)
    state, pids = loader.state_dict(), worker_pids(loader)
    after_state = ids_of(batches, 15)  # into the next epoch
    batches.close()
    loader.load_state_dict(state)
    assert ids_of(iter(loader), 15) == after_state
    assert len(pids) == 2 and worker_pids(loader) == pids


def test_predownload_is_the_configured_shards_times_samples_per_shard(dataset: Path, tmp_path: Path) -> None:
    index = json.loads((dataset / "train" / "index.json").read_text())
    per_shard = max(shard["samples"] for shard in index["shards"])
    assert len(index["shards"]) > 1 and per_shard > 1
    data = DataConfig(path=str(tmp_path / "cache"), remote=str(dataset), predownload_shards=3)
    loader = build_loader(data, "train", MICRO, SEED)
    assert loader._dataset.predownload == 3 * per_shard
    local = build_loader(DataConfig(path=str(dataset), predownload_shards=3), "train", MICRO, SEED)
    assert local._dataset.predownload == 8 * MICRO  # no remote: streaming's own default


@pytest.mark.parametrize(
    "overrides", [["data.prefetch_factor=0"], ["data.predownload_shards=0"], ["data.prefetch_factor=-1"]]
)
def test_bad_worker_settings_are_one_line_user_errors_naming_the_key(overrides: list[str]) -> None:
    key, value = overrides[0].split("=")
    with pytest.raises(UserError) as error:
        load_config("tiny", overrides)
    assert f"{key}={value} must be >= 1" in str(error.value) and "\n" not in str(error.value)


def test_bad_worker_settings_are_reported_at_once_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", "tiny", "data.prefetch_factor=0", "data.predownload_shards=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "data.prefetch_factor=0" in err and "data.predownload_shards=0" in err


def test_batches_are_tensors_in_pageable_memory_without_pinning(dataset: Path) -> None:
    loader = build_loader(DataConfig(path=str(dataset), num_workers=2), "train", MICRO, SEED)
    batch = next(iter(loader))
    assert isinstance(batch["input_ids"], torch.Tensor) and batch["input_ids"].dtype == torch.long
    assert not loader._loader.pin_memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_pinned_with_pin_memory_on_cuda(dataset: Path, num_workers: int) -> None:
    data = DataConfig(path=str(dataset), num_workers=num_workers)
    loader = build_loader(data, "train", MICRO, SEED, pin_memory=True)
    pinned = ids_of(iter(loader), 3)
    batch = next(iter(build_loader(data, "train", MICRO, SEED, pin_memory=True)))
    assert batch["input_ids"].is_pinned() and batch["input_ids"].dtype == torch.long
    assert pinned == ids_of(iter(build_loader(data, "train", MICRO, SEED)), 3)


def test_loading_another_seeds_state_restarts_running_workers_with_its_mixture(tmp_path: Path) -> None:
    """320 samples at 2:1 leave one sample to the stream the seed picks (17: code, 21: web); running workers
    hold the mixture of the seed they were forked with, so loading another seed's state must replace them."""
    web = write_dataset(tmp_path / "web", train_samples=200, val_samples=8)
    code = write_dataset(tmp_path / "code", train_samples=120, val_samples=8, first_id=200)
    streams = [StreamConfig(path=str(web), proportion=2), StreamConfig(path=str(code), proportion=1)]
    data = DataConfig(path=str(web), streams=streams, num_workers=2)
    uninterrupted = ids_of(iter(build_loader(data, "train", MICRO, SEED)), 100)  # 80 batches an epoch
    first = build_loader(data, "train", MICRO, SEED)
    before = ids_of(iter(first), 37)
    other = build_loader(data, "train", MICRO, 21)
    batches = iter(other)
    ids_of(batches, 2)
    pids = worker_pids(other)
    batches.close()
    other.load_state_dict(first.state_dict())
    assert before + ids_of(iter(other), 63) == uninterrupted
    assert len(pids) == 2 and not set(pids) & set(worker_pids(other))
