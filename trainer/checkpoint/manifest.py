"""manifest.json: the list of a step's files with sizes and checksums, written last.

A step folder counts as a checkpoint only when its manifest exists and every file it names has
the recorded size and checksum.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

from trainer.atomic import fsync_path

MANIFEST = "manifest.json"
_CHUNK = 16 * 2**20


def file_checksum(path: Path) -> str:
    return _read_checksum(path, durable=False)[1]


def _read_checksum(path: Path, durable: bool) -> tuple[int, str]:
    """(bytes read, xxh3-128 of them) through one reused buffer; with `durable`, the file is fsynced too."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
            size += count
        if durable:
            # Data written through another descriptor (torch.save, DCP's writer) is flushed too: fsync
            # acts on the file, whatever descriptor names it.
            os.fsync(file.fileno())
    return size, digest.hexdigest()


def list_files(step_dir: Path) -> list[str]:
    """Every file of a step folder, relative and sorted, except the manifest and derived data."""
    return sorted(
        str(path.relative_to(step_dir))
        for path in step_dir.rglob("*")
        if path.is_file()
        and path.name != MANIFEST
        and not path.relative_to(step_dir).parts[0].startswith(".")
    )


def describe_files(step_dir: Path, names: list[str], durable: bool = False) -> dict[str, dict[str, Any]]:
    """Size and checksum of each named file (relative to `step_dir`), read back once.

    With `durable`, each file is also fsynced, and then every folder that holds one of them, from the
    deepest up to `step_dir`: the rank that wrote the files makes them (and their names) durable before
    it reports them for the manifest, so a manifest never names a file that a crash could still lose.
    """
    described = {}
    folders: set[Path] = set()
    for name in names:
        size, checksum = _read_checksum(step_dir / name, durable)
        described[name] = {"size": size, "xxh3_128": checksum}
        folders.update((step_dir / name).parents[: len(Path(name).parts)])
    if durable:
        for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
            fsync_path(folder)
    return described


def read_manifest(step_dir: Path) -> dict[str, Any]:
    """The manifest, or ValueError saying why it cannot be used."""
    path = step_dir / MANIFEST
    if not path.is_file():
        raise ValueError("no manifest.json (the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"manifest.json is unreadable ({error})") from error
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("files"), dict)
        or "step" not in manifest
    ):
        raise ValueError("manifest.json lacks 'files' or 'step'")
    return manifest


def check_sizes(step_dir: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first named file that is missing or of another size than the manifest says; reads no data."""
    for name, expected in sorted(files.items()):
        try:
            size = (step_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
    return None


def check_files(step_dir: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first problem with the named files, or None when sizes and checksums all match."""
    problem = check_sizes(step_dir, files)
    if problem is not None:
        return problem
    for name, expected in sorted(files.items()):
        if file_checksum(step_dir / name) != expected["xxh3_128"]:
            return f"{name} does not match its checksum"
    return None
