"""What a checkpoints folder holds: step folders, which of them are complete, the newest one, `latest`.

Single-process reads, no collectives: `llm-train status` and `export` use them as the trainer does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint.manifest import MANIFEST, check_files, read_manifest

log = logging.getLogger(__name__)

STEP_PREFIX = "step_"
LATEST = "latest"


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


def verify_step(step_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a complete checkpoint, else (None, what is wrong). Single process."""
    try:
        manifest = read_manifest(step_dir)
    except ValueError as error:
        return None, str(error)
    problem = check_files(step_dir, manifest["files"])
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


def newest_valid_step(root: Path) -> ResumePoint | None:
    """The newest step whose manifest verifies, warning about each newer one that does not."""
    _check_latest(root)
    for folder in step_folders(root):
        manifest, problem = verify_step(folder)
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
