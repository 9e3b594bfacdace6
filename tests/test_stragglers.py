"""A rank slowed by fault injection is named as the slowest in the metrics, in `status` and, when it stays
slow, in the log with its host."""

from __future__ import annotations

import re
from pathlib import Path

from trainer_runs import train, watch_steps

from launcher.cli import main as cli_main
from trainer.resilience.fault_injection import SLOW_RANK_ENV


def test_a_slowed_rank_is_named_as_the_straggler(demo_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SLOW_RANK_ENV, "1:0.3")
    overrides = [
        "train.max_steps=8",
        "log.every_steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
    ]
    records = train(tmp_path / "run", demo_dataset.path, nproc=2, overrides=overrides)
    summaries = [r for r in records if "slowest_rank" in r]
    assert summaries and all(r["slowest_rank"] == 1 and r["slowest_lag_s"] > 0.1 for r in summaries), (
        summaries
    )
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert re.search(r"rank 1 on host \S+ is a straggler: \d+\.\d+x the median", log), log[-2000:]
    capsys.readouterr()
    assert cli_main(["status", str(tmp_path / "run")]) == 0
    assert re.search(r"^slowest\s+rank 1, \+0\.\d+ s/step behind the median$", capsys.readouterr().out, re.M)


def test_no_straggler_is_named_on_one_rank(demo_dataset, tmp_path):
    records = train(tmp_path / "run", demo_dataset.path, nproc=1, overrides=["train.max_steps=2"])
    assert not [r for r in records if "slowest_rank" in r]


def test_rank_0_opens_the_same_files_per_logging_step_at_any_world_size(demo_dataset, tmp_path):
    """The straggler summary comes from the step report's all-reduce: over four logging steps rank 0's training
    thread opens the same files at world size 2 as at 4 (no other rank's heartbeat), and no rank writes its
    heartbeat from the training thread."""
    overrides = [
        "train.max_steps=8",
        "log.every_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
    ]
    opened = {
        nproc: watch_steps(tmp_path / f"run{nproc}", demo_dataset.path, nproc, overrides, steps=(3, 6))
        for nproc in (2, 4)
    }
    assert [Path(p).name for p in opened[2][0]["opened"]] == [Path(p).name for p in opened[4][0]["opened"]]
    for nproc, records in opened.items():
        for rank, record in records.items():
            assert not [p for p in record["opened"] if "heartbeats" in p], (nproc, rank, record["opened"])
