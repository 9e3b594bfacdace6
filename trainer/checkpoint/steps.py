"""What a checkpoints folder holds: step folders, which of them are complete, the newest one, `latest`.

Single-process reads, no collectives: `llm-train status` and `export` use them as the trainer does.

`checkpoints/run_id` names the run that writes there, and each manifest names the run that wrote it: a
step folder of another run (copied in by hand, or left by an earlier run that `checkpoint.resume=none`
started over) is then never taken for this run's newest step, and retention never counts or deletes it.
A manifest written before run ids existed names only its config hash: it is this run's when that hash is
the run's own (or when the caller has no config to compare, as `export` and `status`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint.manifest import MANIFEST, check_files, check_sizes, read_manifest

log = logging.getLogger(__name__)

STEP_PREFIX = "step_"
LATEST = "latest"
RUN_ID = "run_id"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_number(folder: Path) -> int:
    return int(folder.name[len(STEP_PREFIX) :])


@dataclass(frozen=True)
class ResumePoint:
    step_dir: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    def train_state(self) -> dict[str, Any]:
        return json.loads((self.step_dir / "train_state.json").read_text())


def read_run_id(root: Path) -> str | None:
    """The id of the run writing into the checkpoints folder `root`, None before its first start."""
    try:
        return (root / RUN_ID).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def belongs_to_run(manifest: dict[str, Any], run_id: str | None, config_hash: str | None = None) -> bool:
    """Whether a step's manifest is this run's: it names `run_id`, or, written before run ids, it names
    `config_hash`. None for either means "unknown": that test passes."""
    theirs = manifest.get("run_id")
    if theirs is not None:
        return run_id is None or theirs == run_id
    return config_hash is None or manifest.get("config_hash") == config_hash


def verify_step(step_dir: Path, checksums: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a complete checkpoint, else (None, what is wrong). Single process.

    Without `checksums` only the manifest and the files' sizes are checked (no data is read): the
    trainer's resume then checksums the files across its ranks, a share each."""
    try:
        manifest = read_manifest(step_dir)
    except ValueError as error:
        return None, str(error)
    problem = (check_files if checksums else check_sizes)(step_dir, manifest["files"])
    return (None, problem) if problem else (manifest, None)


def step_folders(root: Path) -> list[Path]:
    """Step folders, newest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(found, key=step_number, reverse=True)


def newest_valid_step(
    root: Path,
    run_id: str | None = None,
    config_hash: str | None = None,
    checksums: bool = True,
    skip: Collection[Path] = (),
) -> ResumePoint | None:
    """The newest step of the run in `root` (`run_id`, default the folder's own) whose manifest verifies,
    warning about each newer one that does not; steps of other runs (see `belongs_to_run`) are passed over."""
    _check_latest(root)
    run_id = run_id or read_run_id(root)
    for folder in step_folders(root):
        if folder in skip:
            continue
        try:
            if not belongs_to_run(read_manifest(folder), run_id, config_hash):
                log.info("passing over %s: another run's checkpoint", folder)
                continue
        except ValueError:
            pass  # verify_step says what is wrong
        manifest, problem = verify_step(folder, checksums)
        if manifest is not None:
            return ResumePoint(folder, manifest)
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def _check_latest(root: Path) -> None:
    latest = root / LATEST
    if not root.is_dir() or not any(step_folders(root)):
        return
    name = latest.read_text().strip() if latest.is_file() else ""
    if not name:
        log.warning("%s is missing or empty; choosing the newest valid step folder instead", latest)
    elif not (root / name / MANIFEST).is_file():
        log.warning(
            "%s names '%s', which is not a complete checkpoint; choosing the newest valid one", latest, name
        )
