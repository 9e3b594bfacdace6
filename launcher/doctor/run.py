"""Checks of a config's run: its data, its batch arithmetic here, and room in its run folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.doctor.machine import visible_gpus
from launcher.doctor.report import Check
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.data import DatasetInfo

BYTES_PER_PARAM = 16
DEFAULT_VOCAB_SIZE = 50257  # GPT-2's tokenizer
DEFAULT_SEQ_LEN = 1024  # GPT-2's n_positions


def check_data(config: Config) -> Check:
    """The dataset reads as training reads it: index, prepare.json, and every local shard present at its size."""
    from trainer.data import read_dataset_info
    from trainer.mixture import check_mixture

    try:
        info = read_dataset_info(config.data.path, config.data.remote)
        streams = check_mixture(config.data, info)
    except UserError as error:
        return Check("data", "fail", str(error))
    found = f"'{info.source}': {info.train_samples} train / {info.val_samples} val samples of {info.seq_len} tokens"
    if streams:
        found += (
            f"; training mixes {len(streams)} data.streams ({sum(s.train_samples for s in streams)} samples)"
        )
    if "://" in info.source:
        return Check("data", "ok", f"{found}; remote shards are checked when streamed")
    return Check("data", "ok", f"{found}; every shard present with its recorded size")


def check_batch(config: Config, info: DatasetInfo | None) -> Check:
    """The batch arithmetic for the devices of this machine (a cluster job's world size is checked by submit)."""
    from trainer.config import batch_plan

    world_size = max(len(visible_gpus()), 1)
    try:
        plan = batch_plan(config.train, world_size, info.seq_len if info else None)
    except UserError as error:
        return Check("batch", "warn", f"on this machine's {world_size} device(s): {error}")
    return Check("batch", "ok", plan.describe())


def dataset_info(config: Config) -> DatasetInfo | None:
    """The dataset's shape for the estimates of other checks; None when unreadable (check_data says why)."""
    from trainer.data import read_dataset_info

    try:
        return read_dataset_info(config.data.path, config.data.remote)
    except Exception:
        return None


def estimate_params(config: Config, info: DatasetInfo | None) -> int:
    """GPT-2's parameter count from its shape, without building it (tied embeddings counted once).

    Per block: attention 4d^2 + 4d, MLP 8d^2 + 5d, two layer norms 4d; plus token and position
    embeddings and the final layer norm.
    """
    from trainer.config import model_shape

    shape = model_shape(config.model)
    d, layers = shape["n_embd"], shape["n_layer"]
    vocab = config.model.vocab_size or (info.vocab_size if info else None) or DEFAULT_VOCAB_SIZE
    seq_len = config.model.seq_len or (info.seq_len if info else None) or DEFAULT_SEQ_LEN
    return (vocab + seq_len) * d + layers * (12 * d * d + 13 * d) + 2 * d


def checkpoint_bytes(n_params: int) -> int:
    """A checkpoint's size estimate: fp32 weights (4 bytes a parameter) and AdamW's two fp32 moments (8),
    plus 4 bytes of margin for RNG, data-loader state and the backend's own bookkeeping: 16 bytes a parameter."""
    return n_params * BYTES_PER_PARAM


def check_run_folder(config: Config, info: DatasetInfo | None) -> Check:
    """run.dir (or its nearest existing parent) takes a new file and has room for keep_last + 1 checkpoints.

    keep_last + 1: the next checkpoint is written before the oldest one is deleted.
    """
    run_dir = Path(config.run.dir).expanduser()
    existing = next(parent for parent in (run_dir, *run_dir.absolute().parents) if parent.exists())
    where = f"run.dir='{run_dir}'" + (
        "" if existing == run_dir else f" (nearest existing folder '{existing}')"
    )
    if not existing.is_dir():
        return Check("run-folder", "fail", f"{where}: '{existing}' is not a folder; choose another run.dir")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".llm-train-doctor-"):
            pass
    except OSError as error:
        return Check(
            "run-folder", "fail", f"{where} is not writable ({error.strerror}); choose another run.dir"
        )
    n_params = estimate_params(config, info)
    count = config.checkpoint.keep_last + 1
    needed = count * checkpoint_bytes(n_params)
    free = shutil.disk_usage(existing).free
    found = (
        f"{where}: {_size(free)} free, {count} checkpoints (checkpoint.keep_last + 1) of "
        f"{_count(n_params)} parameters need ~{_size(needed)}"
    )
    if free < needed:
        return Check("run-folder", "fail", f"{found}; free space or lower checkpoint.keep_last")
    if free < 2 * needed:
        return Check("run-folder", "warn", f"{found}; less than twice that is free")
    return Check("run-folder", "ok", found)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale / 10:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
