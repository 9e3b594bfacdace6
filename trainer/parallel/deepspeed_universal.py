"""DeepSpeed's universal checkpoint: a ZeRO checkpoint converted for another world size, by rank 0 alone,
while the other ranks wait on the filesystem (no collective, so no collective timeout can end the wait)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trainer.atomic import fsync_path

log = logging.getLogger(__name__)

UNIVERSAL = ".universal"  # derived data, never in the manifest (only the files the ranks wrote are)
CONVERSION_FAILED = ".universal.failed"
CONVERSION_WAIT_S = 4 * 3600  # how long the other ranks wait for rank 0's conversion (1.5B: minutes)


def to_universal(source: Path, target: Path) -> None:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (world-size independent) into `target`.

    The output is built in `target`.tmp, fsynced, then renamed: `target` exists only when complete, so
    an interrupted conversion never passes for a finished one. ds_to_universal cannot resume one (it has
    no record of which parameters it finished), so a partial `.tmp` left by a killed attempt is cleared
    and the conversion starts over, with a log line. Extraction and merging run in parallel processes.
    """
    if target.is_dir():
        return
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        log.warning(
            "%s holds an interrupted conversion, which ds_to_universal cannot resume: starting over", tmp
        )
        shutil.rmtree(tmp)
    cpus = os.cpu_count() or 2
    extract, merge = max(2, min(8, cpus)), max(2, min(4, cpus // 2))  # merging takes more memory per worker
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(tmp), "--num_extract_workers", str(extract),
               "--num_merge_workers", str(merge)]  # fmt: skip
    started = time.monotonic()
    log.info(
        "converting %s to DeepSpeed's universal format (%d extract, %d merge workers)", source, extract, merge
    )
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {source}: {result.stderr.strip().splitlines()[-1:]}")
    _fsync_tree(tmp)
    tmp.rename(target)
    fsync_path(target.parent)
    log.info("converted %s in %.0f s", source, time.monotonic() - started)


def wait_for_conversion(
    target: Path, failed: Path, token: str, deadline_s: float, poll_s: float = 2.0
) -> None:
    """Wait (polling the filesystem, in no collective) until rank 0's conversion into `target` is done.

    Raises if rank 0 reports that this conversion (`token`) failed, or after `deadline_s`.
    """
    started = time.monotonic()
    next_note = started + 60
    while not target.is_dir():
        report = read_json(failed)
        if report.get("token") == token:
            raise RuntimeError(
                f"rank 0 could not convert the checkpoint for this world size: {report.get('error')}"
            )
        now = time.monotonic()
        if now - started > deadline_s:
            raise RuntimeError(
                f"rank 0's conversion into {target} did not finish in {deadline_s:.0f} s; see rank 0's log"
            )
        if now >= next_note:
            log.info(
                "waiting for rank 0 to convert the checkpoint into %s (%.0f s so far)", target, now - started
            )
            next_note = now + 60
        time.sleep(poll_s)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (in threads: each fsync waits on the storage)."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    folders = [folder, *(path for path in folder.rglob("*") if path.is_dir())]

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(fsync_path, files))
        list(pool.map(fsync_path, folders))
