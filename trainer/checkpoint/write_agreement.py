"""Saving is a collective, and so is failing to save: every rank learns whether any rank could not write.

A rank whose write failed (disk full, quota, permissions) must not stop alone: the others would wait for it
in their next collective. So each rank reports its failure, if any, in one all_gather_object, and when any
rank had one, every rank raises the same CheckpointWriteError, naming the step, the folder, what failed on
which rank and the free space left.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.errors import UserError


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (permissions, a read-only filesystem): the run stops, nothing is lost."""


class CheckpointDiskFullError(RuntimeError):
    """A checkpoint could not be written because the disk or the quota was full: requeued, nothing is lost."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
NEARLY_FULL_BYTES = 16 * 2**20
"""torch.save reports a full disk as an opaque RuntimeError ("unexpected pos 704 vs 598"): a failed write with
less free space than this on the folder's filesystem counts as a full disk too."""


def is_disk_full(problem: str) -> bool:
    """Whether a rank's reported write failure (first_line's text) was a full disk or quota."""
    return any(text in problem for text in DISK_FULL_TEXTS)


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


def write_error(
    step: int, step_dir: Path, problems: list[str], previous: str | None
) -> CheckpointWriteError | CheckpointDiskFullError:
    """The one-line error every rank raises; `previous` is the step folder that stays the newest complete."""
    message = (
        f"checkpoint step {step} could not be written to {step_dir} ({'; '.join(problems)}); "
        f"{free_space(step_dir.parent)} free there; "
        + (f"{previous} stays the newest complete checkpoint; " if previous else "")
    )
    free = free_bytes(step_dir.parent)
    if any(map(is_disk_full, problems)) or (free is not None and free < NEARLY_FULL_BYTES):
        return CheckpointDiskFullError(
            message + "the disk (or the quota) is full: a SLURM job is requeued and resumes from it; free "
            "space (or lower checkpoint.keep_last) if it stays full"
        )
    return CheckpointWriteError(
        message
        + "free space (or lower checkpoint.keep_last, or point run.dir elsewhere) and run again to resume"
    )


def first_line(error: BaseException, rank: int = 0) -> str:
    """The gist of an error; for DCP's CheckpointException (every rank's failures), this rank's or the first."""
    if isinstance(error, CheckpointException) and error.failures:
        error = (error.failures.get(rank) or next(iter(error.failures.values())))[0]
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS and not is_disk_full(line):
        line += f" ({DISK_FULL_TEXTS[DISK_FULL_ERRNOS.index(error.errno)]})"
    return line


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds `path` (its nearest existing folder); None if none exists."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def free_space(path: Path) -> str:
    free = free_bytes(path)
    if free is None:
        return "unknown space"
    return f"{free / 2**20:.1f} MiB" if free < 2**30 else f"{free / 2**30:.1f} GiB"
