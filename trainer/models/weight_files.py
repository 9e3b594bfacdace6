"""Reading one tensor of a model's saved weights at a time: llm-train's own checkpoints of either backend and
Hugging Face folders of safetensors files.

A run that starts from saved weights (`model.init_from`) reads each tensor once in all, on the rank that owns
it, which sends it to the others (trainer/parallel/model_source.py), and `export` writes each tensor as it is
read (trainer/models/export.py): no process reads or holds the whole model.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from trainer.checkpoint.dcp_read import MODEL_PREFIX, read_entries, read_metadata
from trainer.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"


class WeightFiles(Protocol):
    def find(self, names: Collection[str]) -> str | None:
        """The saved name of a tensor known to the model under `names` (a tied one has several), or None."""

    def read(self, saved_name: str) -> torch.Tensor:
        """The whole tensor, on the CPU, as saved."""


class DcpWeights:
    """The `model.*` entries of a step's DCP folder (FSDP checkpoints), each read on its own: only that
    entry's byte ranges, in this process, without a process group or code from the folder (dcp_read.py)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._metadata = read_metadata(folder)
        self._entries = {
            key[len(MODEL_PREFIX) :]: entry
            for key, entry in self._metadata.state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)
        }

    def find(self, names: Collection[str]) -> str | None:
        return next((name for name in names if name in self._entries), None)

    def read(self, saved_name: str) -> torch.Tensor:
        entry = self._entries[saved_name]
        template = {MODEL_PREFIX + saved_name: torch.empty(entry.size, dtype=entry.properties.dtype)}
        read_entries(self.folder, template, self._metadata)
        return template[MODEL_PREFIX + saved_name]


class DeepSpeedWeights:
    """A ZeRO-3 checkpoint's fp32 weights, which live in the optimizer partitions (`*optim_states.pt`, one per
    rank of the run that wrote it). DeepSpeed's own reader (`zero_to_fp32`, lazy mode) maps the partition files
    into memory and joins one tensor's pieces when it is asked for, so only that tensor's bytes are read.

    It unpickles DeepSpeed's files (`torch.load(weights_only=False)` inside, with no argument to change it): load
    DeepSpeed checkpoints from trusted sources only (docs/checkpoints.md, "What loading trusts")."""

    def __init__(self, step_dir: Path) -> None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):  # progress bars
            self._lazy = get_fp32_state_dict_from_zero_checkpoint(
                str(step_dir), tag="deepspeed", lazy_mode=True
            )

    def find(self, names: Collection[str]) -> str | None:
        return next((name for name in names if name in self._lazy), None)

    def read(self, saved_name: str) -> torch.Tensor:
        value = self._lazy[saved_name]
        return value if isinstance(value, torch.Tensor) else value.contiguous()


class SafetensorsWeights:
    """A Hugging Face folder's `*.safetensors` (one file, or shards listed in model.safetensors.index.json).
    A name the model knows is looked up as it is, then without or with the model's base prefix (`model.`),
    as `from_pretrained` does for a checkpoint of the base model or of the head model."""

    def __init__(self, folder: Path, base_prefix: str) -> None:
        from safetensors import safe_open

        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            files = {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    files.update(dict.fromkeys(handle.keys(), path))
        self._files = files
        self._prefix = f"{base_prefix}." if base_prefix else ""

    def find(self, names: Collection[str]) -> str | None:
        for name in names:
            candidates = [name]
            if self._prefix and name.startswith(self._prefix):
                candidates.append(name[len(self._prefix) :])
            elif self._prefix:
                candidates.append(self._prefix + name)
            found = next((candidate for candidate in candidates if candidate in self._files), None)
            if found is not None:
                return found
        return None

    def read(self, saved_name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[saved_name]), framework="pt") as handle:
            return handle.get_tensor(saved_name)


def read_checked(files: WeightFiles, names: list[str], shape: tuple[int, ...], where: str) -> torch.Tensor:
    """The saved tensor the model knows under `names`, checked against the model's `shape`; a one-line error
    naming `where` the weights came from when it is missing or of another shape."""
    saved = files.find(names)
    if saved is None:
        raise UserError(f"{where} has no tensor {names[0]}; its weights do not fit its config")
    tensor = files.read(saved)
    if tuple(tensor.shape) != tuple(shape):
        raise UserError(
            f"{where}: {saved} has shape {tuple(tensor.shape)}, the model's {names[0]} {tuple(shape)}; its weights "
            "do not fit its config"
        )
    return tensor


def has_safetensors(folder: Path) -> bool:
    return (folder / SAFETENSORS_INDEX).is_file() or any(folder.glob("*.safetensors"))


def checkpoint_weights(step_dir: Path) -> WeightFiles:
    """A checkpoint step's weights, of either backend, tensor by tensor."""
    backend = json.loads((step_dir / "manifest.json").read_text())["backend"]
    return DeepSpeedWeights(step_dir) if backend == "deepspeed" else DcpWeights(step_dir / "model")
