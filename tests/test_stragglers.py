"""A rank slowed by fault injection is named as the slowest in the metrics, in `status` and, when it stays
slow, in the log with its host."""

from __future__ import annotations

import re

from trainer_runs import train

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
