"""The run's initial model on its way to the backends: built once per job, on rank 0."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from trainer.distributed import DistEnv
from trainer.errors import UserError
from trainer.models.build import ModelRecipe


class ModelSource:
    """The run's initial model as the backends receive it: its shape on every rank, its weights on rank 0.

    A backend builds `empty()` under its own device context (meta for FSDP, `zero.Init` for DeepSpeed),
    shards it, and fills the shards from `take_full_state()`, which rank 0 sends. So a job holds one full
    copy of the model at start-up (rank 0's, on the CPU) instead of one per rank, and the initial weights
    are rank 0's whatever the world size or backend.
    """

    def __init__(
        self, recipe: ModelRecipe, hf_config: PretrainedConfig, full: PreTrainedModel | None
    ) -> None:
        self.recipe = recipe
        self.hf_config = hf_config
        self._full = full

    def empty(self) -> PreTrainedModel:
        """The model's modules with meaningless weights, under the caller's device context; touches no RNG,
        so every rank's random streams stay where the full build left rank 0's."""
        with torch.random.fork_rng(devices=_cuda_devices()):
            return self.recipe.empty(self.hf_config)

    def meta(self) -> PreTrainedModel:
        """The model on the meta device: its shape and parameter count, no memory."""
        with torch.device("meta"):
            return self.empty()

    @torch.no_grad()
    def share_buffers(self, module: nn.Module) -> None:
        """Give `module` (the model built empty, on its device) the full model's non-persistent buffers.

        No state dict carries them (GPT-2's causal masks, rotary frequencies), and a model built on the
        meta device has only uninitialised memory for them: rank 0 copies its full model's and every
        rank receives them from rank 0, whatever the family computes in its constructors.
        """
        buffers = dict(non_persistent_buffers(module))
        if self._full is not None:
            theirs = dict(self._full.named_buffers(remove_duplicate=False))
            for name, buffer in buffers.items():
                buffer.copy_(theirs[name])
        if dist.is_initialized() and dist.get_world_size() > 1:
            for buffer in buffers.values():
                dist.broadcast(buffer, src=0)

    def take_full_state(self) -> dict[str, torch.Tensor]:
        """Rank 0: the full model's state dict, handed over once (the source lets go of the model, so its
        memory goes when the caller drops the dict); the other ranks: {}."""
        full, self._full = self._full, None
        return full.state_dict() if full is not None else {}


def non_persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of every buffer that a state dict leaves out, in a fixed order."""
    return [
        (f"{prefix}.{name}" if prefix else name, buffer)
        for prefix, owner in module.named_modules()
        for name, buffer in owner.named_buffers(recurse=False)
        if name in owner._non_persistent_buffers_set
    ]


def model_source(recipe: ModelRecipe, env: DistEnv) -> ModelSource:
    """Rank 0 builds the full model (seeded, or read from `init_from`, once per job); the others get its
    config and rank 0's RNG state after the build, as if each had built it (as all ranks did before).

    A failure on rank 0 (a bad init_from) reaches every rank, so all of them stop with the same error
    instead of waiting on rank 0 in the next collective.
    """
    full, payload = None, None
    if env.rank != 0:
        recipe.import_model_code()  # rank 0's config may be of a class from the model's own code
    if env.rank == 0:
        try:
            full = recipe.full()
            payload = (full.config, torch.get_rng_state(), None)
        except Exception as error:
            if env.world_size > 1:
                shared = error if isinstance(error, UserError) else RuntimeError(f"rank 0: {error!r}")
                _broadcast_from_rank0((None, None, shared))
            raise
    if env.world_size > 1:
        payload = _broadcast_from_rank0(payload)
    hf_config, rng, error = payload
    if error is not None:
        raise error
    torch.set_rng_state(rng)
    return ModelSource(recipe, hf_config, full)


def _broadcast_from_rank0(payload: Any) -> Any:
    objects = [payload]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def _cuda_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []
