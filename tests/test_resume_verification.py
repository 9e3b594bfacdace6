"""A resume checksums the checkpoint once, spread over the ranks, and still refuses a damaged file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainer_runs import overrides, since_last_start, train


@pytest.fixture
def observed(monkeypatch, tmp_path) -> Path:
    """Ranks that list every file they checksum (tests/rank_hooks/sitecustomize.py)."""
    prefix = tmp_path / "checksums"
    monkeypatch.setenv("LLM_TRAIN_TEST_CHECKSUMS", str(prefix))
    return prefix


def checksummed(prefix: Path) -> list[list[str]]:
    lists = [prefix.with_name(f"{prefix.name}.rank{rank}.txt") for rank in (0, 1)]
    return [path.read_text().split() if path.is_file() else [] for path in lists]


def test_a_resume_on_two_ranks_checksums_each_file_once_in_all(straight, demo_dataset, tmp_path, observed):
    run_dir = Path(shutil.copytree(straight["fsdp"], tmp_path / "run"))
    newest = run_dir / "checkpoints" / "step_00000012"
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=overrides("fsdp", "train.max_steps=13"))
    assert next(r for r in since_last_start(records) if r.get("event") == "resume")["step"] == 12
    rank0, rank1 = checksummed(observed)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert sorted(rank0 + rank1) == sorted(str(newest / name) for name in manifest["files"]), (rank0, rank1)
    assert rank0 and rank1, "both ranks take a share"


def test_a_file_damaged_since_the_save_sends_the_resume_to_the_previous_step(
    straight, demo_dataset, tmp_path, observed
):
    run_dir = Path(shutil.copytree(straight["fsdp"], tmp_path / "run"))
    shard = next((run_dir / "checkpoints" / "step_00000012" / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a checksum can tell
    shard.write_bytes(bytes(data))
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=overrides("fsdp", "train.max_steps=13"))
    assert next(r for r in since_last_start(records) if r.get("event") == "resume")["step"] == 9
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "skipping checkpoint" in log and "does not match its checksum" in log
