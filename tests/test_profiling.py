"""`profile.steps=[a, b]`: a PyTorch profiler trace of those steps per rank; nothing without the key."""

from __future__ import annotations

import json

from trainer_runs import train

from launcher.cli import main as cli_main


def test_profile_steps_write_a_trace_per_rank_with_the_steps_ops(demo_dataset, tmp_path):
    overrides = [
        "train.max_steps=3",
        "profile.steps=[2,3]",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
    ]
    train(tmp_path / "run", demo_dataset.path, nproc=2, overrides=overrides)
    for rank in (0, 1):
        trace = json.loads(
            (tmp_path / "run" / "profiles" / f"rank{rank}" / "trace_steps_2-3.json").read_text()
        )
        names = {event.get("name", "") for event in trace["traceEvents"]}
        assert any(name.startswith("aten::") and "mm" in name for name in names), sorted(names)[:20]
        assert "aten::scaled_dot_product_attention" in names or any("softmax" in name for name in names)


def test_no_profile_without_the_key(straight):
    assert not (straight["fsdp"] / "profiles").exists()


def test_a_bad_profile_range_is_a_user_error_naming_the_key(demo_dataset, tmp_path, capsys):
    args = [f"run.dir={tmp_path}", f"data.path={demo_dataset.path}", "profile.steps=[5,2]"]
    assert cli_main(["train", "tiny", *args]) == 2
    assert "profile.steps=[5, 2] must be two steps [a, b]" in capsys.readouterr().err
