"""FSDP and DeepSpeed side by side: the same bf16 numerics, and DeepSpeed's resume on another world size
(universal checkpoints) robust to slow and interrupted conversions."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest
from trainer_runs import BATCH, losses, overrides, since_last_start, train

from trainer.checkpoint.steps import step_dir_name
from trainer.parallel.deepspeed import UNIVERSAL
from trainer.resilience.fault_injection import NAN_AT_BATCH_ENV

# Rank 0's conversion to the universal format takes LLM_TEST_SLOW_CONVERSION seconds longer.
SLOW_CONVERSION_HOOK = """
import os

from pathlib import Path

if os.environ.get("LLM_TEST_SLOW_CONVERSION"):
    import time

    import trainer.parallel.deepspeed

    _convert = trainer.parallel.deepspeed.to_universal

    def _slow(source, target):
        # The rank is read when converting: ranks are forks of a rank server that imported this before any RANK.
        if os.environ.get("RANK") == "0":
            time.sleep(float(os.environ["LLM_TEST_SLOW_CONVERSION"]))
            Path(__file__).with_name("slept").write_text("slept")
        _convert(source, target)

    trainer.parallel.deepspeed.to_universal = _slow
"""


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_dir_name(step)


@pytest.fixture(scope="module")
def deepspeed_at_6(demo_dataset, tmp_path_factory) -> dict[int, Path]:
    """Per world size (1, 2): a DeepSpeed run that stopped after step 6, with its checkpoint."""
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path_factory.mktemp(f"ds6-{nproc}") / "run"
        train(
            runs[nproc],
            demo_dataset.path,
            nproc=nproc,
            overrides=overrides("deepspeed", "train.stop_at_step=6"),
        )
    return runs


def test_bf16_losses_of_fsdp_and_deepspeed_agree_within_the_bf16_tolerance(demo_dataset, tmp_path):
    """Both backends accumulate and reduce gradients in fp32 under bf16 (DeepSpeed's defaults are bf16)."""
    runs = {}
    for backend in ("fsdp", "deepspeed"):
        extra = [f"parallel.backend={backend}", "train.precision=bf16", "train.max_steps=3", *BATCH]
        runs[backend] = losses(train(tmp_path / backend, demo_dataset.path, nproc=2, overrides=extra))
    for step, (fsdp, deepspeed) in enumerate(zip(runs["fsdp"], runs["deepspeed"], strict=True), start=1):
        assert abs(fsdp - deepspeed) / fsdp < 1e-3, f"step {step}: FSDP {fsdp} vs DeepSpeed {deepspeed}"
    log = (tmp_path / "deepspeed" / "logs" / "rank0.log").read_text()
    assert "gradients accumulated in torch.float32 and reduced in torch.float32" in log


def test_deepspeed_rollback_after_a_universal_resume_loads_its_own_checkpoint(
    deepspeed_at_6, demo_dataset, tmp_path, monkeypatch
):
    """Saved on 2 ranks, resumed on 1 (universal), saves step 9, then a NaN at step 11 rolls back to step 9:
    that load must read step 9 as the normal checkpoint it is, not as a universal one."""
    run_dir = tmp_path / "run"
    shutil.copytree(deepspeed_at_6[2], run_dir)
    monkeypatch.setenv(NAN_AT_BATCH_ENV, "10")  # global batch 10 is step 11's
    records = since_last_start(
        train(
            run_dir,
            demo_dataset.path,
            nproc=1,
            overrides=overrides("deepspeed", "train.on_nonfinite=rollback"),
        )
    )
    resume = next(r for r in records if r.get("event") == "resume")
    assert (resume["step"], resume["from_world_size"]) == (6, 2)
    assert next(r for r in records if r.get("event") == "rollback")["step"] == 9
    assert max(r["step"] for r in records if "loss" in r) == 12
    assert (ckpt(run_dir, 6) / UNIVERSAL).is_dir()
    assert not (ckpt(run_dir, 9) / UNIVERSAL).exists() and (ckpt(run_dir, 12) / "manifest.json").is_file()


def test_a_partial_universal_folder_left_by_a_killed_conversion_does_not_break_a_resume(
    deepspeed_at_6, demo_dataset, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(deepspeed_at_6[2], run_dir)
    partial = ckpt(run_dir, 6) / f"{UNIVERSAL}.tmp"
    (partial / "zero" / "transformer.wte.weight").mkdir(parents=True)
    (partial / "zero" / "transformer.wte.weight" / "fp32.pt").write_bytes(b"cut short")
    (partial / "tmp").mkdir()
    records = since_last_start(
        train(run_dir, demo_dataset.path, nproc=1, overrides=overrides("deepspeed", "train.stop_at_step=7"))
    )
    assert next(r for r in records if r.get("event") == "resume")["step"] == 6
    assert [r["step"] for r in records if "loss" in r] == [7]
    assert (ckpt(run_dir, 6) / UNIVERSAL).is_dir() and not partial.exists()
    assert "interrupted conversion" in (run_dir / "logs" / "rank0.log").read_text()


def test_ranks_wait_for_a_conversion_longer_than_the_collective_timeout(
    deepspeed_at_6, demo_dataset, tmp_path, monkeypatch
):
    """Saved on 1 rank, resumed on 2: rank 0 converts for longer than parallel.timeout_s, rank 1 waits."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SLOW_CONVERSION_HOOK))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("LLM_TEST_SLOW_CONVERSION", "40")
    run_dir = tmp_path / "run"
    shutil.copytree(deepspeed_at_6[1], run_dir)
    extra = overrides("deepspeed", "train.stop_at_step=7", "parallel.timeout_s=20")
    records = since_last_start(train(run_dir, demo_dataset.path, nproc=2, overrides=extra))
    resume = next(r for r in records if r.get("event") == "resume")
    assert (resume["step"], resume["from_world_size"]) == (6, 1)
    assert [r["step"] for r in records if "loss" in r] == [7]
    assert (hook / "slept").exists(), "rank 0's conversion was not slowed: the test showed nothing"
