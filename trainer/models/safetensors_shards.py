"""Writing a model's tensors as safetensors shards as they come, the way `save_pretrained` lays them out.

Each tensor joins the current shard unless that would take it past the limit (then the shard is written and a
new one starts), so the memory held is at most one shard plus the tensor being added. The shards are named
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` when there are several, and
`model.safetensors` when there is one: `from_pretrained`, vLLM and llama.cpp's converter read either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardWriter:
    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names (and the index); the files written."""
        self._flush()
        count = len(self._written)
        if count == 1:
            path, _ = self._written[0]
            path.rename(self.folder / SINGLE)
            return [SINGLE]
        weight_map = {}
        for number, (path, names) in enumerate(self._written, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [*sorted(set(weight_map.values())), INDEX]

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.folder / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0
