"""What a training step costs the host: no conversion of a device tensor to a host value on a step that
does not log, evaluate or save (trainer/step_report.py). Speed itself is measured in bench/overhead.py."""

from __future__ import annotations

from trainer_runs import host_conversions


def test_ten_non_logging_steps_read_nothing_from_the_device(demo_dataset, tmp_path):
    """Two ranks, FSDP, accumulation 2: steps 3-12 convert no tensor to a host value on any rank (the
    loss, the gradient norm and the stop signal stay on the device until a step that logs)."""
    extra = ["train.max_steps=14", "train.global_batch_size=8", "train.micro_batch_size=2"]
    conversions = host_conversions(tmp_path / "run", demo_dataset.path, 2, extra, steps=(3, 12))
    assert conversions == {0: [], 1: []}
