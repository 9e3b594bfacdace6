"""The output folder appears whole or not at all.

Everything is written into `DIR.tmp-<pid>` beside `DIR`, `prepare.json` last, and the folder is
renamed to `DIR` at the end. A prepare that fails removes its temporary folder; one that is killed
leaves only `DIR.tmp-<pid>` (never `DIR`), which training does not look at and which can be deleted.
With `--overwrite`, an existing dataset is moved aside, the new one renamed into place, and only
then is the old one deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from trainer.errors import UserError

log = logging.getLogger(__name__)


def common_stats(opts: Any, info: Any, train_samples: int, val_samples: int) -> dict[str, Any]:
    """What every prepare.json says, whatever the format: the samples, their shape and where they came from."""
    return {
        "tokens": (train_samples + val_samples) * opts.seq_len,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "seq_len": opts.seq_len,
        "vocab_size": info.vocab_size,
        "eos_id": info.eos_id,
        "dtype": info.dtype,
        "tokenizer": opts.tokenizer,
        "inputs": opts.inputs,
        "hf_dataset": opts.hf_dataset,
        "split": opts.split if opts.hf_dataset else None,
    }


def holds_dataset(folder: Path) -> bool:
    return (folder / "prepare.json").exists() or (folder / "train").exists()


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an `--out` that would lose data: a file, a dataset (without --overwrite), or any
    other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; give a folder path for the dataset")
    if out.is_dir():
        if holds_dataset(out):
            if not overwrite:
                raise UserError(
                    f"--out {out}: already holds a dataset; pass --overwrite to replace it or choose another --out"
                )
        elif any(out.iterdir()):
            raise UserError(
                f"--out {out}: is a non-empty folder that holds no dataset; give a new or empty folder"
            )
    for stale in sorted(out.parent.glob(f"{out.name}.tmp-*")):
        log.warning(
            "found %s, left by an interrupted (or still running) prepare; delete it when unused", stale
        )


def make_temp_dir(out: Path) -> Path:
    temp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    try:
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir(parents=True)
    except OSError as error:
        raise UserError(
            f"--out {out}: cannot create {temp} ({error.strerror}); check the permissions"
        ) from None
    return temp


def commit(temp: Path, out: Path, overwrite: bool) -> None:
    """Rename `temp` to `out`, replacing an existing dataset only with `overwrite`."""
    old = None
    if out.is_dir() and holds_dataset(out):
        if not overwrite:
            raise UserError(
                f"--out {out}: a dataset appeared there while preparing; pass --overwrite or choose another --out"
            )
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(temp, out)  # also replaces an empty folder
    except OSError as error:
        if old is not None:
            os.rename(old, out)
        raise UserError(
            f"--out {out}: cannot move the new dataset into place ({error.strerror}); nothing was changed"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
