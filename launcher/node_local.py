"""Paths a compute node cannot see: a job given one fails on its nodes, its reason buried in a task log.

Per-job private `/tmp` and `/dev/shm` (SLURM's job_container/tmpfs, common on shared clusters) and memory
filesystems are each node's own: what the login node wrote there, a compute node does not have, and what a
job writes there vanishes with it. A remote dataset's cache (data.path with data.remote set) is the one place
a node-local path is right: every node fills its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trainer.config import Config

NODE_LOCAL_ROOTS = ("/tmp", "/dev/shm", "/run", "/var/run")
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this machine, longest mount point first."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    mounts = [(fields[1], fields[2]) for fields in (line.split() for line in lines) if len(fields) > 2]
    return sorted(mounts, key=lambda mount: len(mount[0]), reverse=True)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def node_local_reason(path: str) -> str | None:
    """Why `path` exists on this node only (None when it may be shared); a URL is never node-local."""
    if "://" in path:
        return None
    absolute = os.path.abspath(os.path.expanduser(path))
    for root in NODE_LOCAL_ROOTS:
        if _under(absolute, root):
            return f"under {root}, which each node has to itself"
    for mount_point, kind in _mounts():
        if _under(absolute, mount_point):
            return (
                f"on a {kind} (memory) filesystem mounted at {mount_point}"
                if kind in MEMORY_FILESYSTEMS
                else None
            )
    return None


def node_local_paths(config: Config) -> list[tuple[str, str, str]]:
    """(config key, path, reason) for each path of `config` that the job's nodes could not see."""
    data, model = config.data, config.model
    paths = [("run.dir", config.run.dir)]
    if not data.remote:
        paths.append(("data.path", data.path))
    paths.append(("data.remote", data.remote))
    for index, stream in enumerate(data.streams):
        if not stream.remote:
            paths.append((f"data.streams[{index}].path", stream.path))
        paths.append((f"data.streams[{index}].remote", stream.remote))
    if config.checkpoint.resume not in ("auto", "none"):
        paths.append(("checkpoint.resume", config.checkpoint.resume))
    for key, value in (("model.init_from", model.init_from), ("model.hf_config", model.hf_config)):
        if value and Path(value).expanduser().exists():  # else a Hugging Face model id
            paths.append((key, value))
    paths.append(("the Python that runs the job", sys.executable))  # its virtual environment
    return [(key, path, reason) for key, path in paths if path and (reason := node_local_reason(path))]
