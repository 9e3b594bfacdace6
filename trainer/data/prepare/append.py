"""`prepare --append-to DIR --out NEWDIR`: a new version of a prepared dataset, with more documents.

NEWDIR holds DIR's shards unchanged (hard links when on the same filesystem, else copies: the same
bytes either way, so their index.json entries, hashes included, are DIR's), then the shards of the
new documents, and one index.json per split that lists both, so streaming reads NEWDIR as one
dataset. No shard is ever written in place (by prepare or by training), so a hard link never
changes under DIR.

The new documents are cleaned and deduplicated as in any prepare, tokenized with DIR's tokenizer
(DIR/tokenizer, copied into NEWDIR), packed at DIR's seq_len and column dtype, and split by DIR's
`val_threshold`: a document goes to the split it would have gone to in DIR. Dedupe covers the new
documents only: prepare keeps no record of DIR's documents, so one that DIR already holds is kept
again (in the same split, by the rule above).

NEWDIR/prepare.json holds DIR's counts plus the new documents' (`files` ... `val_samples`),
`parent` (DIR), `version` (DIR's plus one; a dataset without one is version 1) and `appended` (the
new documents' own stats, as a plain prepare writes them); the other keys are DIR's. DIR is only
read. NEWDIR appears whole or not at all, like any prepare output (`output`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data.prepare.options import PrepareOptions
from trainer.data.prepare.tokenizer import TokenizerInfo
from trainer.errors import UserError

NEW_PART = "appended.tmp"  # the new documents' splits, inside the temporary folder, until merged
SPLITS = ("train", "val")
_CUMULATIVE = (
    "files",
    "documents",
    "dropped_short",
    "dropped_undecodable",
    "duplicates",
    "kept_documents",
    "train_documents",
    "val_documents",
    "tokens_tokenized",
    "tokens",
    "tokens_dropped_tail",
    "train_samples",
    "val_samples",
)
_REQUIRED = ("seq_len", "vocab_size", "eos_id", "train_samples", "val_samples")


@dataclass(frozen=True)
class Parent:
    """The dataset that `--append-to` names, checked before any work."""

    folder: Path
    stats: dict[str, Any]
    dtype: str  # of its `tokens` column

    @property
    def seq_len(self) -> int:
        return int(self.stats["seq_len"])

    @property
    def val_threshold(self) -> float:
        return float(self.stats.get("val_threshold", self.stats.get("val_fraction", 0.0)))

    def copy_tokenizer(self, temp: Path) -> TokenizerInfo:
        """DIR/tokenizer copied as it is into the new dataset, described for the tokenizer workers."""
        shutil.copytree(self.folder / "tokenizer", temp / "tokenizer")
        return TokenizerInfo(
            folder=temp / "tokenizer",
            eos_id=int(self.stats["eos_id"]),
            vocab_size=int(self.stats["vocab_size"]),
            dtype=self.dtype,
        )


def read_parent(folder: str | Path) -> Parent:
    """Check that `folder` is a complete dataset made by `llm-train prepare`; describe it."""
    from trainer.data.dataset_info import check_shards  # streaming: only once a prepare really runs

    folder = Path(os.path.abspath(os.path.expanduser(str(folder))))
    name = f"--append-to {folder}"
    if not (folder / "prepare.json").is_file() or not (folder / "train" / "index.json").is_file():
        raise UserError(
            f"{name}: not a dataset made by `llm-train prepare` (no prepare.json or train/index.json)"
        )
    try:
        stats = json.loads((folder / "prepare.json").read_text())
        for key in _REQUIRED:
            int(stats[key])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{name}: prepare.json is unreadable or lacks {', '.join(_REQUIRED)} ({error})"
        ) from None
    if not (folder / "tokenizer" / "tokenizer.json").is_file():
        raise UserError(f"{name}: has no tokenizer/tokenizer.json to tokenize the new documents with")
    for split in SPLITS:
        if (folder / split / "index.json").is_file():
            check_shards(folder / split)  # a damaged parent is named now, not copied into a new version
    shards = json.loads((folder / "train" / "index.json").read_text())["shards"]
    if not shards:
        raise UserError(f"{name}: its train split is empty; prepare it again with more text")
    encodings = dict(zip(shards[0]["column_names"], shards[0]["column_encodings"], strict=True))
    encoding = encodings.get("tokens", "")
    if encoding not in ("ndarray:uint16", "ndarray:uint32"):
        raise UserError(f"{name}: its tokens column is {encoding or 'missing'}, not one prepare writes")
    return Parent(folder=folder, stats=stats, dtype=encoding.partition(":")[2])


def options_for(options: PrepareOptions, parent: Parent) -> PrepareOptions:
    """`options` with the parent's tokenizer, seq_len and compression; a conflicting option is a UserError."""
    if options.tokenizer is not None:
        raise UserError(
            f"--tokenizer {options.tokenizer}: --append-to tokenizes with {parent.folder / 'tokenizer'}; "
            "leave --tokenizer out"
        )
    if options.seq_len is not None and options.seq_len != parent.seq_len:
        raise UserError(
            f"--seq-len {options.seq_len}: --append-to {parent.folder} has seq_len {parent.seq_len}; "
            "leave --seq-len out"
        )
    if options.val_fraction is not None:
        raise UserError(
            f"--val-fraction {options.val_fraction}: --append-to splits new documents by {parent.folder}'s "
            f"rule (val_threshold {parent.val_threshold:.6g}); leave --val-fraction out"
        )
    out = Path(os.path.abspath(os.path.expanduser(str(options.out))))
    if out.is_relative_to(parent.folder) or parent.folder.is_relative_to(out):
        raise UserError(
            f"--out {out}: must be a new folder outside --append-to {parent.folder}, which is never modified"
        )
    return dataclasses.replace(
        options,
        tokenizer=str(parent.folder / "tokenizer"),
        seq_len=parent.seq_len,
        val_fraction=float(parent.stats.get("val_fraction", 0.0)),
        compression=options.compression or parent.stats.get("compression"),
    )


def merge(parent: Parent, temp: Path, new_stats: dict[str, Any]) -> dict[str, Any]:
    """Make `temp` the new version: the parent's shards, then those in `temp/NEW_PART`; its prepare.json stats."""
    for split in SPLITS:
        _merge_split(parent.folder / split, temp / NEW_PART / split, temp / split)
    shutil.rmtree(temp / NEW_PART)
    stats = {key: value for key, value in parent.stats.items() if key != "appended"}
    for key in _CUMULATIVE:
        stats[key] = int(parent.stats.get(key, 0)) + int(new_stats[key])
    stats.update(
        parent=str(parent.folder), version=int(parent.stats.get("version", 1)) + 1, appended=new_stats
    )
    return stats


def _merge_split(old: Path, new: Path, target: Path) -> None:
    """`target/index.json`: the shards of `old` (linked or copied) followed by those of `new` (moved, renamed)."""
    target.mkdir()
    old_index = json.loads((old / "index.json").read_text()) if (old / "index.json").is_file() else None
    new_index = json.loads((new / "index.json").read_text())
    shards = old_index["shards"] if old_index else []
    for shard in shards:
        for part in _files(shard):
            if (old / part["basename"]).is_file():  # a compressed shard may lack its raw file, or the reverse
                _link_or_copy(old / part["basename"], target / part["basename"])
    used = {part["basename"] for shard in shards for part in _files(shard)}
    number = len(shards)
    for shard in new_index["shards"]:
        while f"shard.{number:05d}.mds" in used:
            number += 1
        raw_name, written_name = f"shard.{number:05d}.mds", shard["raw_data"]["basename"]
        for part in _files(shard):
            renamed = raw_name + part["basename"].removeprefix(written_name)  # keeps a .zstd suffix
            if (new / part["basename"]).is_file():
                os.rename(new / part["basename"], target / renamed)
            part["basename"] = renamed
            used.add(renamed)
    merged = {**(old_index or new_index), "shards": shards + new_index["shards"]}
    (target / "index.json").write_text(json.dumps(merged, sort_keys=True))  # as streaming's writer does


def _files(shard: dict[str, Any]) -> list[dict[str, Any]]:
    """The index entries of a shard's files: its raw file, and its compressed one if any."""
    return [shard["raw_data"]] + ([shard["zip_data"]] if shard.get("zip_data") else [])


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link on the same filesystem (no space, no time), else a copy; the same bytes either way."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
