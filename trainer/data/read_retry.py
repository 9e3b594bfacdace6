"""Reading shards through transient failures: a parallel filesystem's bad second or an object store's timeout
must not end a week-long run, and a shard that is wrong must not be retried forever.

A read that raises one of PERMANENT (a missing file, no permission, wrong size or checksum, a format error)
fails at once, and the loader turns it into a user error (exit 2, not requeued). Anything else is retried
`retries` times with doubling waits from `first_wait_s` (capped at MAX_WAIT_S); a read that still fails
raises `ShardReadError`: the rank exits 1 and, under SLURM, the job is requeued with that cause.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from trainer.data.mds_shard import DamagedShardError
from trainer.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_WAIT_S = 30.0
READ_ERROR_ENV = "LLM_TRAIN_TEST_READ_ERROR"
"""Test hook "RANK:COUNT[:ALLOCATION]": the first COUNT sample reads of each process of rank RANK fail with EIO
(in SLURM allocation ALLOCATION only, when given: trainer/resilience/fault_injection.py)."""


class ShardReadError(RuntimeError):
    """A shard read failed every time it was tried: transient by its kind, so the run is requeued."""


class UnreadableShardError(RuntimeError):
    """A shard is missing or damaged (a PERMANENT cause): the loader reports it as a user error."""


PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,  # streaming's "Checksum failure", a size or sample count that disagrees with index.json
    DamagedShardError,
    UnreadableShardError,
    ShardReadError,  # retried already, further down: not again
    UserError,
)


def read_with_retries(read: Callable[[], T], what: str, retries: int, first_wait_s: float) -> T:
    """`read()`, retried through transient failures (see the module docstring)."""
    wait = first_wait_s
    for attempt in range(retries + 1):
        try:
            return read()
        except PERMANENT:
            raise
        except Exception as error:
            if "Background thread failed" in str(error):  # streaming's: its own thread failed and said why
                raise
            if attempt == retries:
                raise ShardReadError(
                    f"{what} failed {retries + 1} times ({type(error).__name__}: {error}); the data is there "
                    "but could not be read (filesystem or network): the job is requeued"
                ) from error
            log.warning(
                "%s failed (%s: %s); try %d of %d in %.1f s", what, type(error).__name__, error, attempt + 2,
                retries + 1, wait,
            )  # fmt: skip
            time.sleep(wait)
            wait = min(2 * wait, MAX_WAIT_S)
    raise AssertionError("unreachable")


class InjectedReadErrors:
    """The READ_ERROR_ENV test hook of one process: `check()` raises EIO for the first COUNT reads."""

    def __init__(self) -> None:
        from trainer.resilience.fault_injection import allocation

        rank, count, *only_in = (os.environ.get(READ_ERROR_ENV) or "0:0").split(":")
        chosen = int(rank) == int(os.environ.get("RANK", "0")) and (
            not only_in or int(only_in[0]) == allocation()
        )
        self.left = int(count) if chosen else 0

    def check(self) -> None:
        if self.left > 0:
            self.left -= 1
            raise OSError(errno.EIO, "test hook: injected read error")
