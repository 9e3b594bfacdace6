"""The run's initial model on its way to the backends: built once per job, on rank 0."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

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

    def __init__(self, recipe: ModelRecipe, hf_config: GPT2Config, full: GPT2LMHeadModel | None) -> None:
        self.recipe = recipe
        self.hf_config = hf_config
        self._full = full

    def empty(self) -> GPT2LMHeadModel:
        """The model's modules with meaningless weights, under the caller's device context; touches no RNG,
        so every rank's random streams stay where the full build left rank 0's."""
        with torch.random.fork_rng(devices=_cuda_devices()):
            return self.recipe.empty(self.hf_config)

    def meta(self) -> GPT2LMHeadModel:
        """The model on the meta device: its shape and parameter count, no memory."""
        with torch.device("meta"):
            return self.empty()

    def take_full_state(self) -> dict[str, torch.Tensor]:
        """Rank 0: the full model's state dict, handed over once (the source lets go of the model, so its
        memory goes when the caller drops the dict); the other ranks: {}."""
        full, self._full = self._full, None
        return full.state_dict() if full is not None else {}


def model_source(recipe: ModelRecipe, env: DistEnv) -> ModelSource:
    """Rank 0 builds the full model (seeded, or read from `init_from`, once per job); the others get its
    config and rank 0's RNG state after the build, as if each had built it (as all ranks did before).

    A failure on rank 0 (a bad init_from) reaches every rank, so all of them stop with the same error
    instead of waiting on rank 0 in the next collective.
    """
    full, payload = None, None
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
