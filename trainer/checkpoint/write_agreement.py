"""Saving is a collective, and so is failing to save: every rank learns whether any rank could not write.

A rank whose write failed (disk full, quota, permissions) must not stop alone: the others would wait for it
in their next collective. So each rank reports its failure, if any, in one all_gather_object, and when any
rank had one, every rank raises the same CheckpointWriteError, naming the step, the folder, what failed on
which rank and the free space left.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.errors import UserError


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions): the run stops, nothing is lost."""


def exchange(
    value: Any, failure: BaseException | None, rank: int, world_size: int, group: Any = None
) -> tuple[list[Any], list[str]]:
    """Every rank's `value` and the failures any rank had (one all_gather_object)."""
    mine = None if failure is None else f"rank {rank}: {first_line(failure, rank)}"
    if dist.is_initialized() and world_size > 1:
        reports: list[Any] = [None] * world_size
        dist.all_gather_object(reports, (value, mine), group=group)
    else:
        reports = [(value, None if failure is None else first_line(failure))]
    return [report[0] for report in reports], [report[1] for report in reports if report[1]]


def write_error(step: int, step_dir: Path, problems: list[str], previous: str | None) -> CheckpointWriteError:
    """The one-line error every rank raises; `previous` is the step folder that stays the newest complete."""
    return CheckpointWriteError(
        f"checkpoint step {step} could not be written to {step_dir} ({'; '.join(problems)}); "
        f"{free_space(step_dir.parent)} free there; "
        + (f"{previous} stays the newest complete checkpoint; " if previous else "")
        + "free space (or lower checkpoint.keep_last, or point run.dir elsewhere) and run again to resume"
    )


def first_line(error: BaseException, rank: int = 0) -> str:
    """The gist of an error; for DCP's CheckpointException (every rank's failures), this rank's or the first."""
    if isinstance(error, CheckpointException) and error.failures:
        error = (error.failures.get(rank) or next(iter(error.failures.values())))[0]
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**20:.1f} MiB" if free < 2**30 else f"{free / 2**30:.1f} GiB"
    return "unknown space"
