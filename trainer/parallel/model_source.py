"""The run's initial model on its way to the backends, one tensor at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from trainer.distributed import DistEnv
from trainer.errors import UserError
from trainer.models.build import ModelRecipe
from trainer.models.deferred_init import NotRecordable, Recording, replay, state_refs
from trainer.models.weight_files import WeightFiles, read_checked
from trainer.parallel.saved_weights import saved_weights, verified_init_step

log = logging.getLogger(__name__)

StateGroup = list[tuple[str, torch.Tensor]]
"""One tensor of the initial model under each of its names (a tied weight has two)."""


class ModelSource:
    """The run's initial model as the backends receive it: its shape on every rank, its weights as a stream.

    A backend builds `empty()` under its own device context (meta for FSDP, `zero.Init` for DeepSpeed),
    shards it, and fills its shards from `state()`, which yields every parameter and buffer in full, one at
    a time, the same on every rank:
    - a seeded model is recorded on the meta device and replayed on every rank (trainer/models/
      deferred_init.py): no rank holds more than its shards and one tensor in transit, nothing is sent, and
      the weights are bit for bit those of the model built in full from the seed;
    - a model from `init_from` (a checkpoint of llm-train's, of either backend; a Hugging Face folder of
      safetensors) is recorded the same way for its shape and buffers, and each of its saved tensors is read by
      one rank (the ranks take turns) and sent to the others: the folder is read once in all, never by rank 0
      alone (trainer/parallel/saved_weights.py);
    - any other (`.bin` weights, a model name; a model whose construction cannot be recorded) is built in full
      on rank 0, which sends one tensor at a time.
    The initial weights are the same whatever the world size or backend.
    """

    def __init__(
        self,
        recipe: ModelRecipe,
        hf_config: PretrainedConfig,
        full: PreTrainedModel | None = None,
        recorded: tuple[nn.Module, Recording] | None = None,
        files: WeightFiles | None = None,
    ) -> None:
        self.recipe = recipe
        self.hf_config = hf_config
        self._full = full
        self._recorded = recorded
        self._files = files

    def empty(self) -> PreTrainedModel:
        """The model's modules with meaningless weights, under the caller's device context; touches no RNG,
        so every rank's random streams stay where the full build leaves them."""
        with torch.random.fork_rng(devices=_cuda_devices()):
            return self.recipe.empty(self.hf_config)

    def meta(self) -> PreTrainedModel:
        """The model on the meta device: its shape and parameter count, no memory."""
        with torch.device("meta"):
            return self.empty()

    def state(self, device: torch.device) -> Iterator[StateGroup]:
        """Every parameter and buffer of the initial model in full (buffers no state dict carries too: GPT-2's
        causal masks, rotary frequencies), one tensor at a time, in the same order on every rank; each is
        valid until the next is asked for. Once through, it is spent (the source lets go of its model). A
        replayed model leaves the random generator where the full build leaves it."""
        if self._recorded is None:
            yield from self._sent_from_rank0(device)
            return
        (model, recording), self._recorded = self._recorded, None
        if self._files is None:
            yield from replay(recording, state_refs(model))
        else:
            yield from self._read_in_turns(model, recording, self._files, device)

    @torch.no_grad()
    def _read_in_turns(
        self, model: nn.Module, recording: Recording, files: WeightFiles, device: torch.device
    ) -> Iterator[StateGroup]:
        """Each saved tensor read by one rank (the k-th by rank k mod world size) and sent to the others; the
        tensors no file holds (non-persistent buffers) from the recording, as the constructor makes them."""
        groups = state_refs(model)
        saved = {key: files.find([name for name, _ in group]) for key, group in groups.items()}
        unsaved = {key: group for key, group in groups.items() if saved[key] is None}
        made = {group[0][0]: group[0][1].clone() for group in replay(recording, unsaved)}
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        turn = 0
        for key, group in groups.items():
            name, ref = group[0]
            if saved[key] is None:
                yield [(each, made[name]) for each, _ in group]
                continue
            owner, turn = turn % world, turn + 1
            if rank == owner:
                tensor = read_checked(files, [each for each, _ in group], ref.size, "model.init_from")
                tensor = tensor.to(device=device, dtype=ref.dtype)
            else:
                tensor = torch.empty(ref.size, dtype=ref.dtype, device=device)
            if world > 1:
                dist.broadcast(tensor, src=owner)
            yield [(each, tensor) for each, _ in group]

    @torch.no_grad()
    def _sent_from_rank0(self, device: torch.device) -> Iterator[StateGroup]:
        full, self._full = self._full, None
        sharing = dist.is_initialized() and dist.get_world_size() > 1
        for group in state_refs(self.meta()).values():  # the same names, shapes and order on every rank
            name, ref = group[0]
            if full is not None:
                tensor = _named_tensor(full, name).to(device=device, dtype=ref.dtype)
            else:
                tensor = torch.empty(ref.size, dtype=ref.dtype, device=device)
            if sharing:
                dist.broadcast(tensor, src=0)
            yield [(each, tensor) for each, _ in group]


def fill_from(
    source: ModelSource, device: torch.device, names: Collection[str], fill: Callable[[StateGroup], None]
) -> None:
    """Hand each tensor of the source's state to `fill` (a backend keeping its part of it), and check that the
    source named exactly the backend's parameters and buffers (`names`)."""
    filled: set[str] = set()
    for group in source.state(device):
        fill(group)
        filled.update(name for name, _ in group)
    if filled != set(names):
        raise RuntimeError(f"the initial model and the backend's differ in {sorted(filled ^ set(names))}")


def _named_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute)


def non_persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of every buffer that a state dict leaves out, in a fixed order."""
    return [
        (f"{prefix}.{name}" if prefix else name, buffer)
        for prefix, owner in module.named_modules()
        for name, buffer in owner.named_buffers(recurse=False)
        if name in owner._non_persistent_buffers_set
    ]


def model_source(recipe: ModelRecipe, env: DistEnv) -> ModelSource:
    """A seeded model: recorded on the meta device by every rank (replayed by the backend). A model from
    `init_from`: its checkpoint checksummed by every rank, a share each; then recorded by every rank and read
    in turns, or else built by rank 0 (read once per job), the others getting its config and rank 0's RNG
    state after the build, as if each had built it.

    A failure on rank 0 (a bad init_from) reaches every rank, so all of them stop with the same error
    instead of waiting on rank 0 in the next collective.
    """
    try:
        if not recipe.loads_weights:
            model, recording = recipe.record()
            return ModelSource(recipe, model.config, recorded=(model, recording))
        recipe = verified_init_step(recipe, env)
        found = saved_weights(recipe)
        if found is not None:
            model, recording, files = found
            return ModelSource(recipe, model.config, recorded=(model, recording), files=files)
    except NotRecordable as why:  # the same on every rank: the same code and config
        log.warning("the model's construction cannot be replayed shard by shard (%s): rank 0 builds it", why)
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
    return ModelSource(recipe, hf_config, full=full)


def _broadcast_from_rank0(payload: Any) -> Any:
    objects = [payload]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def _cuda_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []
