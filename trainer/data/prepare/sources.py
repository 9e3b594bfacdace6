"""Where documents come from: local files (globs, paths, folders) or a Hugging Face dataset.

What one document is:
- a `.jsonl` / `.ndjson` line (its text field); blank lines are not documents;
- any other file (`.txt`, `.py`, ...) as a whole; an empty file is a document that `clean` drops as short;
- a row of a Hugging Face dataset (its text field; a null value counts as an empty document).
A `.gz` suffix is decompressed first and the name without it decides the above.

A document that is not valid UTF-8 (a whole file, or one jsonl line) is counted in
`dropped_undecodable` and skipped; a malformed jsonl line is a `UserError` naming file:line.
Files are read in sorted path order so that the document order never depends on the shell or the
file system.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data.prepare.clean import Counts
from trainer.errors import UserError, offline_hint

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
_GLOB_MAGIC = frozenset("*?[")
_HF_BATCH = 1000


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand globs (`**` recursive), plain paths and folders (all files below, hidden ones skipped)
    into one sorted list of distinct files."""
    files: set[str] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if not _GLOB_MAGIC.intersection(expanded):
            if not os.path.exists(expanded):
                raise UserError(f"--input {pattern}: no such file or folder; check the path")
            if os.path.isdir(expanded):
                found = _files_below(expanded)
                if not found:
                    raise UserError(
                        f"--input {pattern}: the folder holds no files; point it at your text files"
                    )
                files.update(found)
            else:
                files.add(os.path.abspath(expanded))
            continue
        matches = [os.path.abspath(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise UserError(
                f"--input {pattern!r}: the glob matched no files; check the pattern "
                "(quote it so that the shell does not expand it, use ** for subfolders)"
            )
        files.update(matches)
    return [Path(p) for p in sorted(files)]


def _files_below(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.abspath(os.path.join(root, n)) for n in names if not n.startswith("."))
    return found


@dataclass
class FileSource:
    """Local files; `iter_raw` yields each document's text, or None for an undecodable one."""

    files: list[Path]
    text_field: str

    @property
    def known_documents(self) -> int | None:
        """The number of documents when it is known before reading (no jsonl files)."""
        if any(_logical_name(p).endswith(JSONL_SUFFIXES) for p in self.files):
            return None
        return len(self.files)

    def iter_raw(self, counts: Counts) -> Iterator[str | None]:
        counts.files = len(self.files)
        for path in self.files:
            if _logical_name(path).endswith(JSONL_SUFFIXES):
                yield from self._jsonl_documents(path)
            else:
                yield self._file_document(path)

    def _file_document(self, path: Path) -> str | None:
        data = _read_bytes(path)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            log.warning("skipping %s: not UTF-8 (byte %d)", path, error.start)
            return None

    def _jsonl_documents(self, path: Path) -> Iterator[str | None]:
        data = _read_bytes(path)
        if data is None:
            yield None
            return
        if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
            data = data[3:]
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("skipping %s:%d: not UTF-8", path, lineno)
                yield None
                continue
            yield _jsonl_text(text, path, lineno, self.text_field)


def _logical_name(path: Path) -> str:
    name = path.name.lower()
    return name[: -len(".gz")] if name.endswith(".gz") else name


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes (decompressed for .gz); None for a corrupt .gz, counted as undecodable."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"--input {path}: cannot read it ({error.strerror}); check its permissions") from None
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            log.warning("skipping %s: not a valid gzip file", path)
            return None
    return data


def _jsonl_text(line: str, path: Path, lineno: int, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path}:{lineno}: not valid JSON ({error.msg}); each line of a .jsonl file must be one JSON "
            "object (rename the file to .txt to read it as plain text)"
        ) from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"{path}:{lineno}: no field {field!r} (found: {keys}); pass --text-field NAME to pick the text field"
        )
    return _as_text(record[field], f"{path}:{lineno}", field)


def _as_text(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field {field!r} holds {type(value).__name__}, not text; "
            "pass --text-field NAME to pick the text field"
        )
    return value


@dataclass
class HFSource:
    """One split of a Hugging Face dataset, loaded by name (hub or local HF cache) or from a
    folder written by `save_to_disk` (a saved `DatasetDict` is indexed by --split; a single saved
    `Dataset` is used as it is)."""

    spec: str
    split: str
    text_field: str
    dataset: Any

    @property
    def known_documents(self) -> int | None:
        return len(self.dataset)

    def iter_raw(self, counts: Counts) -> Iterator[str | None]:
        counts.files = 0
        column = self.dataset.select_columns([self.text_field])
        for batch in column.iter(batch_size=_HF_BATCH):
            for value in batch[self.text_field]:
                yield _as_text(value, f"--hf-dataset {self.spec}", self.text_field)


def open_hf_dataset(spec: str, split: str, text_field: str) -> HFSource:
    """Load `NAME[:CONFIG]` (or a `save_to_disk` folder) and check that the split and field exist."""
    import datasets

    name, _, config = spec.partition(":")
    local = Path(os.path.expanduser(spec))
    try:
        if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise UserError(
                        f"--hf-dataset {spec}: no split {split!r} (found: {', '.join(dataset)}); pass --split NAME"
                    )
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, config or None, split=split)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any loader failure is the user's dataset name/cache/network
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--hf-dataset {spec} (split {split!r}): cannot load it ({reason}); check the split; "
            f"{offline_hint()}"
        ) from None
    if not isinstance(dataset, datasets.Dataset):
        raise UserError(f"--hf-dataset {spec}: split {split!r} is not a map-style dataset; pass --split NAME")
    if text_field not in dataset.column_names:
        raise UserError(
            f"--hf-dataset {spec}: no column {text_field!r} (found: {', '.join(dataset.column_names)}); "
            "pass --text-field NAME"
        )
    return HFSource(spec=spec, split=split, text_field=text_field, dataset=dataset)
