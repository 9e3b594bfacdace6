"""Reading DCP folders (FSDP checkpoints) without running code from them, and without a process group.

torch.distributed.checkpoint unpickles two things with plain `pickle`: the `.metadata` index (with
`pickle.load`) and every non-tensor entry (optimizer hyper-parameters, with `torch.load(weights_only=
False)`). A checkpoint folder copied from elsewhere could so make every loading rank run code. Here:

- `read_metadata` unpickles the index with an allow-list of DCP's own index classes, torch dtypes and sizes;
- `check_plain_data` reads every non-tensor entry with `weights_only=True` (plain data only), so that a
  resume can refuse a folder before DCP itself unpickles it;
- `load_model_state` reads only the `model.*` tensors (never the optimizer's, two thirds of the bytes),
  straight into tensors shaped from the index, in this process: no `dcp_to_torch_save`, nothing under /tmp.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from trainer.errors import UserError

METADATA = ".metadata"
MODEL_PREFIX = "model."

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_METADATA_MODULE, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds pickled objects that are not plain data: it is refused, never unpickled."""


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's index classes and nothing else: any other global (a function to call) is refused."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path} refers to '{module}.{name}', which a DCP index never holds: the file was not written "
            "by torch.distributed.checkpoint, so it is not loaded; use a checkpoint from a trusted source"
        )


def read_metadata(folder: Path) -> Metadata:
    """The DCP index of `folder` (a step's model/ folder), unpickled with the allow-list."""
    path = folder / METADATA
    with open(path, "rb") as file:
        try:
            metadata = _IndexUnpickler(file, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # a truncated or foreign file: pickle raises many kinds
            raise UserError(
                f"{path} is not a readable DCP index ({error}); the checkpoint is damaged"
            ) from error
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(
            f"{path} holds a {type(metadata).__name__}, not a DCP index; it is not loaded"
        )
    return metadata


def data_files(metadata: Metadata) -> set[str]:
    """The data files (relative to the DCP folder) that the index points into."""
    return {info.relative_path for info in metadata.storage_data.values()}


def check_plain_data(folder: Path) -> None:
    """Raise UnsafeCheckpointError unless the index and every non-tensor entry are plain data.

    DCP's own load then unpickles the same bytes; checked first, nothing in them can run.
    """
    metadata = read_metadata(folder)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"{folder / info.relative_path} (entry '{index.fqn}')"
        if info.transform_descriptors:
            raise UnsafeCheckpointError(
                f"{where} is stored with transforms {list(info.transform_descriptors)}, which llm-train never "
                "writes; the checkpoint is not loaded"
            )
        with open(folder / info.relative_path, "rb") as file:
            file.seek(info.offset)
            data = file.read(info.length)
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"{where} holds pickled objects that are not plain data; it is not loaded "
                f"({str(error).strip().splitlines()[-1]})"
            ) from error


class _SafeReader(FileSystemReader):
    def __init__(self, path: Path, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._metadata if self._metadata is not None else read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainDataPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """DefaultLoadPlanner unpickles non-tensor entries with weights_only=False; these are plain data."""
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"entry '{read_item.dest_index.fqn}' holds pickled objects that are not plain data; not loaded"
            ) from error
        self.state_dict[read_item.dest_index.fqn] = loaded


def load_model_state(folder: Path, prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """The full (unsharded) `prefix*` entries of a DCP folder, keys without the prefix, on the CPU.

    Reads only those entries' byte ranges; works in any process, with or without a process group.
    """
    metadata = read_metadata(folder)
    template: dict[str, Any] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        if isinstance(entry, TensorStorageMetadata):
            template[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
        else:
            template[key] = None  # a non-tensor entry, read by _PlainDataPlanner.load_bytes
    if not template:
        raise UserError(f"{folder} holds no '{prefix}*' entries; it is not a model checkpoint of llm-train")
    read_entries(folder, template)
    return {key[len(prefix) :]: value for key, value in template.items()}


def read_entries(folder: Path, template: dict[str, Any], metadata: Metadata | None = None) -> None:
    """Fill `template` ({key: a tensor of the entry's shape and dtype, or None}) with those entries of the DCP
    folder, in this process: only their byte ranges are read, non-tensor entries as plain data only. A caller
    reading entry after entry passes the folder's index (`read_metadata`), read once."""
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(
            template,
            storage_reader=_SafeReader(folder, metadata),
            planner=_PlainDataPlanner(flatten_state_dict=False),
            no_dist=True,
        )
