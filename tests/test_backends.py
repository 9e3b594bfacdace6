"""FSDP and DeepSpeed side by side: the same bf16 numerics, and DeepSpeed's resume on another world size
(universal checkpoints) robust to slow and interrupted conversions. The DeepSpeed runs are one lineage: a
2-rank run to step 6 (`deepspeed_at_6`), resumed on 1 rank to step 12 (`universal_resume`), whose step 9 is
resumed on 2 ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from trainer_runs import losses, overrides, read_metrics, since_last_start, train

from trainer.checkpoint.steps import step_dir_name
from trainer.parallel.deepspeed import UNIVERSAL
from trainer.resilience.fault_injection import NAN_AT_BATCH_ENV


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_dir_name(step)


CONVERSION_TIMEOUT_S = 12  # parallel.timeout_s of the run that waits for the slowed conversion
SLOW_CONVERSION_S = 18  # 1.5 x CONVERSION_TIMEOUT_S: rank 1 must wait past its collective timeout


def loss_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


def bf16(backend: str, *extra: str) -> list[str]:
    """The checkpoint tests' 12-step schedule (trainer_runs.overrides), in bf16."""
    return overrides(backend, "train.precision=bf16", *extra)


@pytest.fixture(scope="module")
def deepspeed_at_6(demo_dataset, tmp_path_factory) -> Path:
    """A bf16 DeepSpeed run on 2 ranks that stopped after step 6, with its checkpoint. Every DeepSpeed run
    of this module descends from it (DeepSpeed's fp32 resumes on another world size: test_checkpoint.py)."""
    run_dir = tmp_path_factory.mktemp("ds6-2") / "run"
    train(run_dir, demo_dataset.path, nproc=2, overrides=bf16("deepspeed", "train.stop_at_step=6"))
    return run_dir


@pytest.fixture(scope="module")
def universal_resume(deepspeed_at_6, demo_dataset, tmp_path_factory) -> tuple[Path, list[dict]]:
    """`deepspeed_at_6` resumed on 1 rank (a universal conversion of step 6) to step 12, with what a killed
    conversion leaves in step 6 (a partial `.universal.tmp`), and a NaN loss at step 11 that rolls back to
    step 9, which this run saved itself. Its run folder and the records since its start."""
    run_dir = tmp_path_factory.mktemp("ds-universal-resume") / "run"
    shutil.copytree(deepspeed_at_6, run_dir)
    partial = ckpt(run_dir, 6) / f"{UNIVERSAL}.tmp"
    (partial / "zero" / "transformer.wte.weight").mkdir(parents=True)
    (partial / "zero" / "transformer.wte.weight" / "fp32.pt").write_bytes(b"cut short")
    (partial / "tmp").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(NAN_AT_BATCH_ENV, "10")  # global batch 10 is step 11's
        extra = bf16("deepspeed", "train.on_nonfinite=rollback")
        records = since_last_start(train(run_dir, demo_dataset.path, nproc=1, overrides=extra))
    return run_dir, records


def test_bf16_losses_of_fsdp_and_deepspeed_agree_within_the_bf16_tolerance(
    deepspeed_at_6, demo_dataset, tmp_path
):
    """Both backends accumulate and reduce gradients in fp32 under bf16 (DeepSpeed's defaults are bf16): the
    first 3 steps of an FSDP run and of `deepspeed_at_6` (same schedule, batches and seed)."""
    fsdp = losses(
        train(tmp_path / "fsdp", demo_dataset.path, nproc=2, overrides=bf16("fsdp", "train.stop_at_step=3"))
    )
    deepspeed = losses(read_metrics(deepspeed_at_6))[:3]
    assert len(fsdp) == 3
    for step, (fsdp_loss, ds_loss) in enumerate(zip(fsdp, deepspeed, strict=True), start=1):
        assert abs(fsdp_loss - ds_loss) / fsdp_loss < 1e-3, (
            f"step {step}: FSDP {fsdp_loss} vs DeepSpeed {ds_loss}"
        )
    log = (deepspeed_at_6 / "logs" / "rank0.log").read_text()
    assert "gradients accumulated in torch.float32 and reduced in torch.float32" in log


def test_deepspeed_rollback_after_a_universal_resume_loads_its_own_checkpoint(universal_resume):
    """Saved on 2 ranks, resumed on 1 (universal), saves step 9, then a NaN at step 11 rolls back to step 9:
    that load must read step 9 as the normal checkpoint it is, not as a universal one."""
    run_dir, records = universal_resume
    resume = next(r for r in records if r.get("event") == "resume")
    assert (resume["step"], resume["from_world_size"]) == (6, 2)
    assert next(r for r in records if r.get("event") == "rollback")["step"] == 9
    assert max(loss_steps(records)) == 12
    assert (ckpt(run_dir, 6) / UNIVERSAL).is_dir()
    assert not (ckpt(run_dir, 9) / UNIVERSAL).exists() and (ckpt(run_dir, 12) / "manifest.json").is_file()


def test_a_partial_universal_folder_left_by_a_killed_conversion_does_not_break_a_resume(universal_resume):
    """The resume converts step 6 afresh (the partial folder is cleared, with a log line) and trains on from
    step 7 (the same run as the rollback test's: one run, several assertions)."""
    run_dir, records = universal_resume
    assert next(r for r in records if r.get("event") == "resume")["step"] == 6
    assert loss_steps(records)[0] == 7
    assert (ckpt(run_dir, 6) / UNIVERSAL).is_dir() and not (ckpt(run_dir, 6) / f"{UNIVERSAL}.tmp").exists()
    assert "interrupted conversion" in (run_dir / "logs" / "rank0.log").read_text()


def test_ranks_wait_for_a_conversion_longer_than_the_collective_timeout(
    universal_resume, demo_dataset, tmp_path, monkeypatch
):
    """Saved on 1 rank (step 9 of `universal_resume`), resumed on 2: rank 0 converts for longer than
    parallel.timeout_s (the hook records that it slept), rank 1 waits."""
    slept = tmp_path / "slept"
    monkeypatch.setenv("LLM_TRAIN_TEST_SLOW_CONVERSION", f"{SLOW_CONVERSION_S}:{slept}")  # tests/rank_hooks
    run_dir = tmp_path / "run"
    shutil.copytree(universal_resume[0], run_dir)
    shutil.rmtree(ckpt(run_dir, 12))  # as if the 1-rank run had stopped after saving step 9
    (run_dir / "checkpoints" / "latest").write_text(step_dir_name(9))
    assert not (ckpt(run_dir, 9) / UNIVERSAL).exists()
    extra = bf16("deepspeed", "train.stop_at_step=10", f"parallel.timeout_s={CONVERSION_TIMEOUT_S}")
    records = since_last_start(train(run_dir, demo_dataset.path, nproc=2, overrides=extra))
    resume = next(r for r in records if r.get("event") == "resume")
    assert (resume["step"], resume["from_world_size"]) == (9, 1)
    assert loss_steps(records) == [10]
    assert slept.exists(), "rank 0's conversion was not slowed: the test showed nothing"
    assert (ckpt(run_dir, 9) / UNIVERSAL).is_dir()
