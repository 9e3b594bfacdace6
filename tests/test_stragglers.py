"""A rank slowed by fault injection is named as the slowest in the metrics, in `status` and, when it stays
slow, in the log with its host."""

from __future__ import annotations

import re
from pathlib import Path

from trainer_runs import read_metrics, train, watch_steps

from launcher.cli import main as cli_main
from trainer.resilience.fault_injection import SLOW_RANK_ENV


def test_a_slowed_rank_is_named_as_the_straggler_without_reading_any_heartbeat(
    demo_dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(SLOW_RANK_ENV, "1:0.3")
    overrides = [
        "train.max_steps=8",
        "log.every_steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
    ]
    watched = watch_steps(tmp_path / "run", demo_dataset.path, 2, overrides, steps=(3, 6))
    records = read_metrics(tmp_path / "run")
    summaries = [r for r in records if "slowest_rank" in r]
    assert summaries and all(r["slowest_rank"] == 1 and r["slowest_lag_s"] > 0.1 for r in summaries), (
        summaries
    )
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert re.search(r"rank 1 on host \S+ is a straggler: \d+\.\d+x the median", log), log[-2000:]
    capsys.readouterr()
    assert cli_main(["status", str(tmp_path / "run")]) == 0
    assert re.search(r"^slowest\s+rank 1, \+0\.\d+ s/step behind the median$", capsys.readouterr().out, re.M)
    # The summary comes from the step report's all-reduce: over the logging steps 4 and 6 no rank's training
    # thread opens a heartbeat (rank 0 read every rank's at each logging step: more files at a larger world
    # size), and rank 0 opens the same files at each of them.
    for rank, record in watched.items():
        assert not [p for p in record["opened"] if "heartbeats" in p], (rank, record["opened"])
    names = [Path(p).name for p in watched[0]["opened"]]
    assert names[: len(names) // 2] == names[len(names) // 2 :], names


def test_no_straggler_is_named_on_one_rank(demo_dataset, tmp_path):
    records = train(tmp_path / "run", demo_dataset.path, nproc=1, overrides=["train.max_steps=2"])
    assert not [r for r in records if "slowest_rank" in r]
