"""data.streams: proportions, determinism, exact resume, ranks, mismatches, the fast path, a real run."""

from __future__ import annotations

import itertools
import json
import math
import re
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from mds_fixtures import sample_ids, write_dataset
from streaming import Stream, StreamingDataset
from test_data import _assert_same_sample, run_ranks
from trainer_runs import BATCH, losses, train

from launcher.cli import main as cli_main
from trainer.config import DataConfig, StreamConfig, load_config
from trainer.data.loader import TokenBatches, build_loader
from trainer.data.mapped_dataset import MappedDataset
from trainer.errors import UserError

SEED = 17
# Sample ids (first token): web 0..199, code 200..319. Sizes differ so that the shard boundaries of the two
# streams differ, and 3:1 of 320 asks streaming to up-sample web (240 of 200) and down-sample code (80 of 120).
WEB, CODE = 200, 120


def take(loader: TokenBatches, count: int) -> list[list[int]]:
    return [sample_ids(batch["input_ids"]) for batch in itertools.islice(loader, count)]


def is_code(sample_id: int) -> bool:
    return sample_id >= WEB


def epochs(batches: list[list[int]], per_epoch: int) -> list[list[int]]:
    """The sample ids of each epoch."""
    return [sum(batches[start : start + per_epoch], []) for start in range(0, len(batches), per_epoch)]


@pytest.fixture
def mixture(tmp_path: Path) -> DataConfig:
    web = write_dataset(tmp_path / "web", train_samples=WEB, val_samples=16)
    code = write_dataset(tmp_path / "code", train_samples=CODE, val_samples=8, first_id=WEB)
    streams = [StreamConfig(path=str(web), proportion=0.75), StreamConfig(path=str(code), proportion=0.25)]
    return DataConfig(path=str(web), streams=streams)


def test_an_epoch_holds_the_streams_in_their_proportions(mixture: DataConfig) -> None:
    loader = build_loader(mixture, "train", 4, SEED)
    assert loader.batches_per_epoch == (WEB + CODE) // 4 == 80
    for epoch in epochs(take(loader, 2 * 80), 80):
        code = [sample for sample in epoch if is_code(sample)]
        web = [sample for sample in epoch if not is_code(sample)]
        assert abs(len(web) / len(code) - 3) <= 3 * 0.02
        assert set(web) == set(range(WEB))  # up-sampled: every web sample, some twice
        assert len(set(code)) == len(code)  # down-sampled: no code sample twice


def test_each_epoch_draws_a_new_subset_of_a_down_sampled_stream(mixture: DataConfig) -> None:
    loader = build_loader(mixture, "train", 4, SEED)
    subsets = [{sample for sample in epoch if is_code(sample)} for epoch in epochs(take(loader, 2 * 80), 80)]
    assert len(subsets[0]) == len(subsets[1]) == 80 and subsets[0] != subsets[1]


def test_data_epoch_size_sets_the_samples_per_epoch(mixture: DataConfig) -> None:
    mixture.epoch_size = 100
    loader = build_loader(mixture, "train", 4, SEED)
    assert loader.batches_per_epoch == 25
    epoch = sum(take(loader, 25), [])
    assert sum(map(is_code, epoch)) == 25


def test_same_seed_gives_the_same_mixture_and_another_seed_another(mixture: DataConfig) -> None:
    first = take(build_loader(mixture, "train", 4, SEED), 100)
    assert take(build_loader(mixture, "train", 4, SEED), 100) == first
    assert take(build_loader(mixture, "train", 4, SEED + 1), 100) != first


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_with_exactly_the_same_batches(
    mixture: DataConfig, num_workers: int
) -> None:
    mixture.num_workers = num_workers
    uninterrupted = take(build_loader(mixture, "train", 4, SEED), 100)  # 80 batches an epoch
    first = build_loader(mixture, "train", 4, SEED)
    batches = iter(first)
    before = [sample_ids(next(batches)["input_ids"]) for _ in range(37)]
    state = first.state_dict()
    assert (state["epoch"], state["sample_in_epoch"]) == (0, 37 * 4)
    second = build_loader(mixture, "train", 4, SEED)
    second.load_state_dict(json.loads(json.dumps(state)))
    assert before + take(second, 100 - 37) == uninterrupted


def test_resume_under_another_run_seed_keeps_the_checkpoints_share_of_each_stream(
    mixture: DataConfig,
) -> None:
    """320 samples at 2:1 leave one sample to a stream that the seed picks: 17 picks code, 21 web."""
    mixture.streams[0].proportion, mixture.streams[1].proportion = 2, 1
    uninterrupted = take(build_loader(mixture, "train", 4, SEED), 100)
    assert sum(map(is_code, sum(uninterrupted[:80], []))) == 107
    first = build_loader(mixture, "train", 4, SEED)
    batches = iter(first)
    before = [sample_ids(next(batches)["input_ids"]) for _ in range(37)]
    second = build_loader(mixture, "train", 4, 21)
    second.load_state_dict(first.state_dict())
    assert before + take(second, 100 - 37) == uninterrupted


def test_two_ranks_see_the_global_batches_of_one_rank(mixture: DataConfig, tmp_path: Path) -> None:
    single = build_loader(mixture, "train", 4, SEED, global_batch_size=4)
    reference = [sorted(batch) for batch in take(single, 90)]  # into the second epoch
    streams = [{"path": stream.path, "proportion": stream.proportion} for stream in mixture.streams]
    task = {"path": mixture.path, "streams": streams, "micro": 2, "steps": 90, "resume": None}
    ranks = run_ranks(2, [task], tmp_path)
    together = [sorted(a + b) for a, b in zip(ranks[0][0]["ids"], ranks[1][0]["ids"], strict=True)]
    assert together == reference


def test_a_remote_stream_is_cached_per_node_and_its_downloads_checked(
    mixture: DataConfig, tmp_path: Path
) -> None:
    code = mixture.streams[1]
    code.path, code.remote = str(tmp_path / "cache"), code.path
    loader = build_loader(mixture, "train", 4, SEED)
    assert [stream.validate_hash for stream in loader._dataset.streams] == [None, "xxh64"]
    epoch = sum(take(loader, 80), [])
    assert sum(map(is_code, epoch)) == 80
    shards = sorted(path.name for path in (Path(code.remote) / "train").glob("*.mds"))
    assert sorted(path.name for path in (tmp_path / "cache" / "node-0" / "train").glob("*.mds")) == shards


def test_validation_reads_data_paths_val_split_alone(mixture: DataConfig) -> None:
    loader = build_loader(mixture, "val", 4, SEED)
    assert sum((sample_ids(batch["input_ids"]) for batch in loader.iter_batches()), []) == list(range(16))


# --- bad mixtures ------------------------------------------------------------------------------


def test_stream_with_another_seq_len_is_a_user_error_naming_both_paths(
    mixture: DataConfig, tmp_path: Path
) -> None:
    longer = write_dataset(tmp_path / "longer", train_samples=40, val_samples=0, seq_len=32, first_id=WEB)
    mixture.streams[1].path = str(longer)
    with pytest.raises(UserError) as error:
        build_loader(mixture, "train", 4, SEED)
    message = str(error.value)
    assert f"'{longer}'" in message and f"'{mixture.path}'" in message and "seq_len 32 vs 16" in message


def test_mismatch_stops_llm_train_before_any_process_starts(
    mixture: DataConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other_vocab = write_dataset(tmp_path / "vocab", train_samples=40, val_samples=0, vocab_size=1024)
    streams = (
        f"data.streams=[{{path: {mixture.path}, proportion: 1}}, {{path: {other_vocab}, proportion: 1}}]"
    )
    code = cli_main(["train", "tiny", f"run.dir={tmp_path / 'run'}", f"data.path={mixture.path}", streams])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(other_vocab) in error and "vocab_size 1024 vs 512" in error
    assert not (tmp_path / "run" / "logs").exists()


def test_missing_shard_of_a_stream_is_a_user_error_naming_it(mixture: DataConfig) -> None:
    shard = Path(mixture.streams[1].path) / "train" / "shard.00001.mds"
    shard.unlink()
    with pytest.raises(UserError, match=rf"{shard}' is missing"):
        build_loader(mixture, "train", 4, SEED)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.streams=[{path: /a, proportion: 0}]"], "data.streams[0].proportion=0.0 must be > 0"),
        (["data.streams=[{path: /a, proportion: 1}, {path: /a, proportion: 2}]"], "lists '/a' twice"),
        (["data.streams=[{path: /a}]"], "'data.streams[0].proportion' is required"),
        (["data.epoch_size=100"], "data.epoch_size needs data.streams"),
    ],
)
def test_bad_streams_settings_are_user_errors_naming_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError, match=re.escape(expected)):
        load_config("tiny", ["run.dir=/r", "data.path=/a", *overrides])


def test_submit_makes_the_stream_paths_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from launcher.slurm_job import _with_absolute_paths

    monkeypatch.chdir(tmp_path)
    streams = (
        "data.streams=[{path: web, proportion: 3}, {path: cache, remote: s3://bucket/code, proportion: 1}]"
    )
    data = _with_absolute_paths(load_config("tiny", ["run.dir=run", "data.path=web", streams])).data
    assert [(s.path, s.remote) for s in data.streams] == [
        (str(tmp_path / "web"), None),
        (str(tmp_path / "cache"), "s3://bucket/code"),
    ]


# --- fast path ---------------------------------------------------------------------------------


def test_fast_path_reads_each_streams_samples_exactly_as_streaming_does(mixture: DataConfig) -> None:
    streams = [
        Stream(local=stream.path, split="train", proportion=stream.proportion) for stream in mixture.streams
    ]
    dataset = MappedDataset(streams=streams, batch_size=4)
    assert dataset.num_samples == WEB + CODE and dataset.shards_per_stream.min() > 1
    for sample_id in range(dataset.num_samples):
        reference = StreamingDataset.get_item(dataset, sample_id)  # streaming's own shard -> file mapping
        fast = dataset._fast_item(sample_id)
        assert fast is not None and int(fast["tokens"][0]) == sample_id  # web 0..199, then code 200..319
        _assert_same_sample(fast, reference)
    assert sorted(dataset._shard_files) == list(range(dataset.num_shards))


def test_fast_path_yields_the_mixture_batches_of_streamings_own_path(
    mixture: DataConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = take(build_loader(mixture, "train", 4, SEED), 100)
    monkeypatch.setattr(MappedDataset, "_shard_file", lambda self, shard_id: None)  # nothing is ever ready
    assert take(build_loader(mixture, "train", 4, SEED), 100) == fast


# --- a real run --------------------------------------------------------------------------------


def test_llm_train_with_two_processes_trains_on_a_mixture(demo_dataset: Any, tmp_path: Path) -> None:
    from trainer.data.prepare import PrepareOptions, run_prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    other = tmp_path / "other"
    run_prepare(
        PrepareOptions(
            inputs=[str(stdlib / name) for name in ("heapq.py", "bisect.py", "queue.py", "copy.py")],
            out=other,
            tokenizer=str(demo_dataset.path / "tokenizer"),
            seq_len=demo_dataset.seq_len,
            workers=1,
        )
    )
    streams = (
        f"data.streams=[{{path: {demo_dataset.path}, proportion: 0.75}}, {{path: {other}, proportion: 0.25}}]"
    )
    run_dir = tmp_path / "run"
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=["train.max_steps=4", *BATCH, streams])
    assert len(losses(records)) == 4 and all(math.isfinite(loss) for loss in losses(records))
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"{other} (" in log and "25.0%)" in log  # the loader said what it mixes
