"""Retention: keep the newest `checkpoint.keep_last` complete steps of this run, delete older ones cheaply."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.checkpoint.manifest import read_manifest
from trainer.checkpoint.steps import step_folders, step_number

log = logging.getLogger(__name__)

TRASH_PREFIX = ".removing-"  # a step folder retention is deleting: no longer a step folder by its name


def _remove_all(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def retain(root: Path, belongs: Callable[[dict[str, Any]], bool], keep_last: int) -> None:
    """Keep the newest `keep_last` complete steps of this run; its incomplete folders older than its
    newest complete step go too. Another run's steps are neither counted nor deleted: a copied-in
    step of a higher number must not push this run's own steps out.

    A folder to delete is renamed first (instant, even on a shared filesystem) and deleted in a
    background thread: deleting gigabytes is not part of the save's time (a preemption save must
    fit in SLURM's grace time), and a half-deleted folder never looks like a step."""
    own, others = [], set()
    for folder in step_folders(root):
        try:
            manifest = read_manifest(folder)
        except ValueError:
            continue  # incomplete
        if belongs(manifest):
            own.append(folder)
        else:  # another run's, or written before run ids with another config: not provably ours
            others.add(folder.name)
    keep = {folder.name for folder in own[:keep_last]}
    newest_step = step_number(own[0]) if own else None
    for folder in step_folders(root):
        if folder.name in keep or folder.name in others or newest_step is None:
            continue
        if step_number(folder) > newest_step:
            continue
        log.info("retention: removing %s", folder)
        try:  # out of the way at once (one rename), deleted in the background
            folder.rename(root / f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}")
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
    if others:
        log.info("retention: leaving %s alone (written by another run)", ", ".join(sorted(others)))
    trash = [path for path in root.iterdir() if path.name.startswith(TRASH_PREFIX)]
    if trash:
        # Not a daemon: the process waits for it at exit. A folder left by a kill goes next time.
        threading.Thread(target=_remove_all, args=(trash,), name="ckpt-retention").start()
