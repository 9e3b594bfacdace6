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
    from launcher.profiles import ClusterProfile
    from trainer.config import Config
    from trainer.data.loader import DatasetInfo

BYTES_PER_PARAM = 16
DEFAULT_VOCAB_SIZE = 50257  # GPT-2's tokenizer
DEFAULT_SEQ_LEN = 1024  # GPT-2's n_positions


def check_data(config: Config) -> Check:
    """The dataset reads as training reads it: index, prepare.json, and every local shard present at its size."""
    from trainer.data.loader import read_dataset_info
    from trainer.data.mixture import check_mixture

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


def check_batch(config: Config, info: DatasetInfo | None, profile: ClusterProfile | None = None) -> Check:
    """The batch arithmetic for the job's world size (`--cluster`), else for the devices of this machine."""
    from trainer.config import batch_plan

    if profile is not None:
        world_size, where = profile.world_size, f"the job's {describe_layout(profile)}"
    else:
        world_size = max(len(visible_gpus()), 1)
        where = f"this machine's {world_size} device(s) (--cluster PROFILE checks the job's layout)"
    try:
        plan = batch_plan(config.train, world_size, info.seq_len if info else None)
    except UserError as error:
        return Check("batch", "fail" if profile is not None else "warn", f"on {where}: {error}")
    return Check("batch", "ok", f"on {where}: {plan.describe()}")


def describe_layout(profile: ClusterProfile) -> str:
    per_node = f"{profile.gpus_per_node} GPUs" if profile.gpus_per_node else "1 task (CPU)"
    return f"{profile.nodes} node(s) x {per_node} = world size {profile.world_size}"


def check_memory(config: Config, info: DatasetInfo | None, profile: ClusterProfile | None) -> Check:
    """Model and optimizer state per device when sharded over the job (activations come on top)."""
    n_params, assumed = count_params(config, info)
    world_size = profile.world_size if profile is not None else max(len(visible_gpus()), 1)
    per_rank = checkpoint_bytes(n_params) // world_size
    found = (
        f"{_count(n_params)} parameters{assumed}: weights, gradients and AdamW state take ~{_size(per_rank)} "
        f"per device sharded over {world_size} rank(s), activations excluded"
    )
    memory = device_memory()
    if memory is not None and per_rank > memory:
        return Check("memory", "fail", f"{found}; a device here has {_size(memory)}: use more nodes")
    return Check("memory", "ok", found)


def device_memory() -> int | None:
    """The smallest visible GPU's memory in bytes (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def dataset_info(config: Config) -> DatasetInfo | None:
    """The dataset's shape for the estimates of other checks; None when unreadable (check_data says why)."""
    from trainer.data.loader import read_dataset_info

    try:
        return read_dataset_info(config.data.path, config.data.remote)
    except Exception:
        return None


def assumed_vocab(config: Config) -> int:
    """The vocabulary taken when neither the config nor its data says: an `hf` model's config's own, else the
    family's published tokenizer's."""
    from trainer.models.families import FAMILIES

    source = config.model.hf_config or config.model.init_from
    if config.model.arch == "hf" and source:
        from trainer.models.families.hf import load_hf_config

        try:
            return int(
                load_hf_config(str(source), config.model.trust_remote_code, "model.hf_config").vocab_size
            )
        except Exception:  # an unreadable folder is check_model's to report
            pass
    return FAMILIES[config.model.arch].tokenizer_vocab or DEFAULT_VOCAB_SIZE


def count_params(config: Config, info: DatasetInfo | None) -> tuple[int, str]:
    """The model's parameter count, from the real model built on the meta device (no memory, no init), with a
    note when the vocabulary or context length had to be assumed because the data could not be read."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.models.build import model_config

    vocab = config.model.vocab_size or (info.vocab_size if info else None)
    seq_len = config.model.seq_len or (info.seq_len if info else None)
    assumed = "" if vocab else f" (vocab {assumed_vocab(config)} assumed: the data did not load)"
    with torch.device("meta"):
        hf_config = model_config(config.model, vocab or assumed_vocab(config), seq_len or DEFAULT_SEQ_LEN)
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.model.trust_remote_code)
    return sum(p.numel() for p in model.parameters()), assumed


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
    n_params, _ = count_params(config, info)
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
