"""Free the shared memory that killed data loaders left behind on this host, and never a live one's.

Each `StreamingDataset` registers a numbered group of segments in /dev/shm (`000007_locals`,
`000007_barrier`, ...). A loader killed with SIGKILL leaves its group behind, and a stale group that
names the same local cache as a new run's remote stream makes streaming refuse to start
("Reused local directory"). Streaming's own `clean_stale_shared_memory` unlinks every group on the
host, live ones included: a second training, or an `llm-train eval`, starting on a shared node
would pull the memory from under a running job, whose DataLoader workers attach by name.

Who uses a group is not visible from /dev/shm: while streaming looks for a free number it attaches
to every existing group and keeps them mapped until it exits, so a live loader maps the groups of
dead ones too. So each of our loaders records itself (`register_owner`: pid, process start time,
and the identity of the group's `locals` segment), and a group is freed when all its recorded
owners are gone. Groups that nobody recorded (other programs') and other users' are left alone,
and so is everything when anything unexpected happens.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN

from trainer.atomic import atomic_write_text

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_SEGMENT = re.compile(r"^(\d{6})_(" + "|".join(map(re.escape, SHM_TO_CLEAN)) + r")$")


def owners_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"llm-training-shm-owners-{os.getuid()}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat.rpartition(b")")[2].split()[19].decode()  # field 22; fields after the name start at 3


def _locals_identity(prefix: str) -> str | None:
    try:
        status = (SHM_DIR / f"{prefix}_{LOCALS}").stat()
    except OSError:
        return None
    return f"{status.st_ino}:{status.st_ctime_ns}"


def register_owner(prefix_int: int) -> None:
    """Record this process as a user of streaming's group `prefix_int` (after the dataset is built)."""
    prefix, start = f"{prefix_int:06d}", _start_time(os.getpid())
    identity = _locals_identity(prefix)
    if start is None or identity is None:
        return
    try:
        owners_dir().mkdir(mode=0o700, exist_ok=True)
        atomic_write_text(owners_dir() / f"{prefix}-{os.getpid()}", f"{start} {identity}\n")
    except OSError as error:
        log.warning("could not record the data loader's shared memory in %s: %s", owners_dir(), error)


def streaming_groups() -> dict[str, list[str]]:
    """This user's streaming segments in /dev/shm by their group prefix ("000007")."""
    groups: dict[str, list[str]] = defaultdict(list)
    uid = os.getuid()
    for entry in os.listdir(SHM_DIR):
        match = _SEGMENT.match(entry)
        try:
            if match and (SHM_DIR / entry).stat().st_uid == uid:
                groups[match.group(1)].append(entry)
        except FileNotFoundError:
            continue
    return dict(groups)


def _recorded_owners() -> dict[str, list[tuple[Path, int, str, str]]]:
    """prefix -> [(record file, pid, start time, locals identity)]."""
    owners: dict[str, list[tuple[Path, int, str, str]]] = defaultdict(list)
    if not owners_dir().is_dir():
        return owners
    for record in owners_dir().iterdir():
        prefix, _, pid = record.name.partition("-")
        try:
            start, identity = record.read_text().split()
            owners[prefix].append((record, int(pid), start, identity))
        except (OSError, ValueError):
            continue
    return owners


def _unlink_group(prefix: str, segments: list[str]) -> bool:
    """Lock files, then the segments, `locals` last.

    Streaming picks a new group's number as the largest of the first free number of each segment
    name, taking a number whose `locals` exists as used. While `locals` stays until the end, a loader
    that starts meanwhile cannot pick a number whose `locals` another loader holds.
    """
    for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
        (Path(tempfile.gettempdir()) / f"{prefix}_{lock}").unlink(missing_ok=True)
    removed = False
    for name in sorted(segments, key=lambda name: name.endswith(f"_{LOCALS}")):
        try:
            (SHM_DIR / name).unlink()
            removed = True
        except FileNotFoundError:
            continue
    return removed


def _clean() -> list[str]:
    if not SHM_DIR.is_dir() or not Path("/proc/self/stat").is_file():
        return []
    groups, owners = streaming_groups(), _recorded_owners()
    identities = {prefix: _locals_identity(prefix) for prefix in groups}
    freed = []
    for prefix, segments in sorted(groups.items()):
        records = [r for r in owners.get(prefix, []) if r[3] == identities[prefix]]  # others: an older group
        if not records or any(_start_time(pid) == start for _, pid, start, _ in records):
            continue
        if _unlink_group(prefix, segments):
            freed.append(prefix)
    for prefix, records in owners.items():  # records of groups that are gone, or of dead owners
        for record, pid, start, identity in records:
            if prefix in freed or identity != identities.get(prefix) or _start_time(pid) != start:
                record.unlink(missing_ok=True)
    if freed:
        log.info("freed the shared memory of %d stopped data loaders (%s)", len(freed), ", ".join(freed))
    return freed


@contextmanager
def _one_cleaner_at_a_time() -> Iterator[None]:
    """Hold this user's host-wide clean-up lock (released by the kernel if the process dies).

    Jobs that start together clean together: without the lock a slow cleaner that listed a stale
    group could unlink it after a faster one freed it and a new loader registered the same number.
    """
    with open(Path(tempfile.gettempdir()) / f"llm-training-shm-clean-{os.getuid()}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def clean_stale_streaming_shm() -> list[str]:
    """Unlink each stale streaming group of this user, with its lock files; returns the prefixes freed."""
    try:
        with _one_cleaner_at_a_time():
            return _clean()
    except Exception as error:  # housekeeping must never stop a training
        log.warning("left /dev/shm as it is: checking it for stale data-loader memory failed (%s)", error)
        return []
