"""Checkpoints on shared filesystems: manifests from the ranks' own reports, fsync before the manifest,
retention that keeps this run's steps, and checkpoint.resume=none on requeued attempts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainer_runs import BATCH, read_metrics, since_last_start, train

from trainer.checkpoint import verify_step
from trainer.checkpoint.manifest import MANIFEST, list_files
from trainer.checkpoint.steps import RUN_ID, step_dir_name, step_folders

HIDDEN = "__1_0.distcp"  # rank 1's DCP shard, which rank 0's listing leaves out (tests/rank_hooks)


def steps(run_dir: Path) -> list[str]:
    return sorted(folder.name for folder in step_folders(run_dir / "checkpoints"))


def test_manifest_lists_what_the_ranks_wrote_even_when_a_listing_misses_a_file(
    demo_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("LLM_TRAIN_TEST_HIDE_FROM_RANK0", HIDDEN)  # as an NFS client with a stale cache would
    run_dir = tmp_path / "run"
    overrides = ["parallel.backend=fsdp", "train.max_steps=2", "checkpoint.every_steps=2", *BATCH]
    train(run_dir, demo_dataset.path, nproc=2, overrides=overrides)
    step_dir = run_dir / "checkpoints" / step_dir_name(2)
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert f"model/{HIDDEN}" in manifest["files"]
    assert set(manifest["files"]) == set(list_files(step_dir))  # this process's listing is complete
    assert verify_step(step_dir)[0] is not None


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_every_file_and_folder_of_a_step_is_fsynced_before_its_manifest(
    backend, demo_dataset, tmp_path, monkeypatch
):
    log_file = tmp_path / "fsyncs.tsv"
    monkeypatch.setenv(
        "LLM_TRAIN_TEST_FSYNC_LOG", str(log_file)
    )  # tests/rank_hooks: every os.fsync, in order
    run_dir = tmp_path / "run"
    overrides = [f"parallel.backend={backend}", "train.max_steps=2", "checkpoint.every_steps=1", *BATCH]
    train(run_dir, demo_dataset.path, nproc=1, overrides=overrides)
    synced = log_file.read_text().splitlines()
    for step in (1, 2):
        step_dir = (run_dir / "checkpoints" / step_dir_name(step)).resolve()
        # The manifest is written to a temporary name, fsynced, renamed: what was synced before that counts.
        manifest_at = next(
            i for i, path in enumerate(synced) if path.startswith(f"{step_dir}/.{MANIFEST}.tmp")
        )
        before_manifest = set(synced[:manifest_at])
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
        kinds = {"rng/rank00000.pt", "train_state.json", "config.yaml"} | (
            {"model/__0_0.distcp", "model/.metadata", "scheduler.json"}
            if backend == "fsdp"
            else {
                "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt",
                "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            }
        )
        assert kinds <= files.keys()
        folders = {str((step_dir / name).parent) for name in files} | {str(step_dir), str(step_dir.parent)}
        unsynced = sorted(({str(step_dir / name) for name in files} | folders) - before_manifest)
        assert not unsynced, f"not fsynced before the manifest of step {step}: {unsynced}"


def test_retention_keeps_this_runs_steps_whatever_other_runs_left_there(demo_dataset, tmp_path):
    other = tmp_path / "other"
    train(other, demo_dataset.path, nproc=1, overrides=["train.max_steps=6", "checkpoint.every_steps=1",
                                                         "checkpoint.keep_last=10", *BATCH])  # fmt: skip
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for step in (2, 6):  # copied in by hand: their manifests name the other run
        shutil.copytree(
            other / "checkpoints" / step_dir_name(step), run_dir / "checkpoints" / step_dir_name(step)
        )
    legacy = run_dir / "checkpoints" / step_dir_name(5)  # written before run ids, with another config
    shutil.copytree(other / "checkpoints" / step_dir_name(5), legacy)
    manifest = json.loads((legacy / MANIFEST).read_text())
    del manifest["run_id"]
    (legacy / MANIFEST).write_text(json.dumps(manifest))

    records = train(run_dir, demo_dataset.path, nproc=1, overrides=["train.max_steps=4", "checkpoint.every_steps=1",
                                                                    "checkpoint.keep_last=2", *BATCH])  # fmt: skip
    assert not any(r.get("event") == "resume" for r in records)  # the other run's step 6 is not this run's
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert steps(run_dir) == [step_dir_name(s) for s in (3, 4, 5, 6)]
    own_id = (run_dir / "checkpoints" / RUN_ID).read_text().strip()
    for step in (3, 4):
        assert (
            json.loads((run_dir / "checkpoints" / step_dir_name(step) / MANIFEST).read_text())["run_id"]
            == own_id
        )
    other_id = (other / "checkpoints" / RUN_ID).read_text().strip()
    assert (
        json.loads((run_dir / "checkpoints" / step_dir_name(6) / MANIFEST).read_text())["run_id"] == other_id
    )
    aside = run_dir / "checkpoints" / f"{step_dir_name(2)}.run-{other_id}"  # this run's step 2 took its place
    assert verify_step(aside)[0] is not None


def test_resume_none_restarts_only_the_first_attempt(demo_dataset, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    overrides = ["checkpoint.resume=none", "train.max_steps=4", "checkpoint.every_steps=2", *BATCH]
    first = train(run_dir, demo_dataset.path, nproc=1, overrides=[*overrides, "train.stop_at_step=2"])
    assert [r["step"] for r in first if "loss" in r] == [1, 2]

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued: the same config.yaml
    requeued = since_last_start(train(run_dir, demo_dataset.path, nproc=1, overrides=overrides))
    assert next(r for r in requeued if r.get("event") == "resume")["step"] == 2
    assert [r["step"] for r in requeued if "loss" in r] == [3, 4]
    assert (
        "checkpoint.resume=none applies to a job's first attempt only"
        in (run_dir / "logs" / "rank0.log").read_text()
    )

    monkeypatch.delenv("SLURM_RESTART_COUNT")  # a new job with resume=none: a new run from step 0
    fresh = since_last_start(train(run_dir, demo_dataset.path, nproc=1, overrides=overrides))
    assert not any(r.get("event") == "resume" for r in fresh)
    assert [r["step"] for r in fresh if "loss" in r] == [1, 2, 3, 4]
    assert len(read_metrics(run_dir)) > len(fresh)
