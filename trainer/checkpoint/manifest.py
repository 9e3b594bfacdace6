"""manifest.json: the list of a step's files with sizes and checksums, written last.

A step folder counts as a checkpoint only when its manifest exists and every file it names has
the recorded size and checksum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "manifest.json"
_CHUNK = 16 * 2**20


def file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(step_dir: Path) -> list[str]:
    """Every file of a step folder, relative and sorted, except the manifest and derived data."""
    return sorted(
        str(path.relative_to(step_dir))
        for path in step_dir.rglob("*")
        if path.is_file()
        and path.name != MANIFEST
        and not path.relative_to(step_dir).parts[0].startswith(".")
    )


def describe_files(step_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        name: {"size": (step_dir / name).stat().st_size, "xxh3_128": file_checksum(step_dir / name)}
        for name in names
    }


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


def check_files(step_dir: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first problem with the named files, or None when sizes and checksums all match."""
    for name, expected in sorted(files.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if file_checksum(path) != expected["xxh3_128"]:
            return f"{name} does not match its checksum"
    return None
