"""Writing a model's tensors as safetensors shards as they come, the way `save_pretrained` lays them out.

The tensors' names, shapes and dtypes are known before any is read (the model on the meta device), so each
shard's header is written first and each tensor's bytes are appended as it arrives: the memory held is the one
tensor in hand, and each file's SHA-256 is computed on the way out, not by reading it back. A tensor joins the
current shard unless that would take it past the limit; the shards are named `model-0000i-of-0000n.safetensors`
with `model.safetensors.index.json` when there are several, `model.safetensors` when there is one: what
`from_pretrained`, vLLM and llama.cpp's converter read.

The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range; `__metadata__`), padded with spaces to 8 bytes, then the tensors' bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Shard:
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)


class ShardWriter:
    """Takes the tensors of `plan`, in its order; `sha256` holds each finished file's digest."""

    def __init__(self, folder: Path, max_shard_bytes: int, plan: list[PlannedTensor]) -> None:
        self.folder = folder
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in plan:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        count = len(shards)
        names = (
            [SINGLE]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self._shards = [_Shard(name, tensors) for name, tensors in zip(names, shards, strict=True)]
        self._queue = [(shard, tensor) for shard in self._shards for tensor in shard.tensors]
        self._next = 0
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self.sha256: dict[str, str] = {}
        self.total_bytes = sum(tensor.nbytes for tensor in plan)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard, planned = self._queue[self._next]
        if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"expected {planned}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if planned is shard.tensors[0]:
            self._open(shard)
        self._write(tensor.detach().contiguous().view(torch.uint8).numpy().data if tensor.numel() else b"")
        self._next += 1
        if planned is shard.tensors[-1]:
            assert self._file is not None
            self._file.close()
            self.sha256[shard.name] = self._digest.hexdigest()

    def finish(self) -> list[str]:
        """The index (with several shards); the files written."""
        if self._next != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._next} planned tensors were never given")
        if len(self._shards) == 1:
            return [SINGLE]
        weight_map = {tensor.name: shard.name for shard in self._shards for tensor in shard.tensors}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [*(shard.name for shard in self._shards), INDEX]

    def _open(self, shard: _Shard) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in shard.tensors:
            header[tensor.name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}  # fmt: skip
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = (self.folder / shard.name).open("wb")
        self._digest = hashlib.sha256()
        self._write(struct.pack("<Q", len(encoded)) + encoded)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self._digest.update(data)
