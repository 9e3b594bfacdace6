"""Free the shared memory that killed runs left behind on this host, and only that.

Each `StreamingDataset` registers a numbered group of segments in /dev/shm (`000007_locals`,
`000007_barrier`, ...). A run killed with SIGKILL leaves its group behind, and a stale group that
names the same local cache as a new run's remote stream makes streaming refuse to start
("Reused local directory"). Streaming's own `clean_stale_shared_memory` unlinks every group on
the host, live ones included: a second training, or an `llm-train eval`, starting on a shared
node would pull the memory from under a running job, whose DataLoader workers attach to their
group by name at every epoch. Here a group is unlinked only when no process maps any of its
segments (Linux: /proc/PID/maps); everywhere else nothing is removed.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_SEGMENT = re.compile(r"^(\d{6})_(" + "|".join(map(re.escape, SHM_TO_CLEAN)) + r")$")


def mapped_shm_names() -> set[str]:
    """Names of the /dev/shm files that a process this user can inspect has mapped."""
    names: set[str] = set()
    uid = os.getuid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if uid != 0 and proc.stat().st_uid != uid:
                continue  # its maps are unreadable, and it cannot open this user's segments (mode 0600)
            maps = (proc / "maps").read_text()
        except OSError:  # gone meanwhile, or not ours
            continue
        for line in maps.splitlines():
            start = line.find(str(SHM_DIR) + "/")
            if start != -1:
                names.add(line[start + len(str(SHM_DIR)) + 1 :].removesuffix(" (deleted)"))
    return names


def streaming_groups() -> dict[str, list[str]]:
    """Streaming's segments in /dev/shm by their group prefix ("000007")."""
    groups: dict[str, list[str]] = defaultdict(list)
    for entry in os.listdir(SHM_DIR):
        match = _SEGMENT.match(entry)
        if match:
            groups[match.group(1)].append(entry)
    return dict(groups)


def clean_stale_streaming_shm() -> list[str]:
    """Unlink each streaming group (and its lock files) that no process maps; returns the prefixes freed."""
    if not SHM_DIR.is_dir() or not Path("/proc/self/maps").is_file():
        return []
    groups = streaming_groups()
    if not groups:
        return []
    mapped = mapped_shm_names()
    freed = []
    for prefix, segments in sorted(groups.items()):
        if any(name in mapped for name in segments):
            continue
        for name in [*segments, *(f"{prefix}_{lock}" for lock in (BARRIER_FILELOCK, CACHE_FILELOCK))]:
            folder = SHM_DIR if name in segments else Path(tempfile.gettempdir())
            try:
                (folder / name).unlink(missing_ok=True)
            except OSError:  # another user's, or removed by another process meanwhile
                continue
        freed.append(prefix)
    if freed:
        log.info("freed the shared memory of %d stopped data loaders (%s)", len(freed), ", ".join(freed))
    return freed
