"""FSDP2: `fully_shard` per transformer block and on the root, MixedPrecisionPolicy for bf16.

In a world of one process nothing is sharded, so the model is not wrapped at all (torchtitan does the
same): FSDP2's hooks and DTensor parameters would cost a few percent of a small model's step for
nothing. bf16 then runs under `torch.autocast`. The checkpoints are the same DCP folders either way, so
a run resumes on any world size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from trainer.atomic import atomic_write_text
from trainer.config import BatchPlan, Config
from trainer.distributed import DistEnv
from trainer.models.build import check_tied, compile_blocks, decoder_layers
from trainer.models.pretrained import tied_names
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.inputs import model_inputs, prepare_attention
from trainer.parallel.model_source import ModelSource, StateGroup, fill_from
from trainer.parallel.node_layout import node_major_order, shard_groups
from trainer.parallel.sharding import shard_group_size, state_bytes

log = logging.getLogger(__name__)


def parallelize(
    model: nn.Module, precision: str, env: DistEnv, compile_model: bool, shard_size: int | None = None
) -> FSDPModule:
    """`fully_shard` over all ranks, or (`shard_size` < world size) over groups of `shard_size` ranks and
    replicated across the groups: a 2-D (replicate, shard) mesh, FSDP2's hybrid sharding."""
    mesh = device_mesh(env, shard_size or env.world_size)
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    if compile_model:
        compile_blocks(model)
    blocks = list(decoder_layers(model))
    for index, block in enumerate(blocks):
        # Resharding after forward frees a block's gathered weights until its backward gathers them
        # again. The last block's backward comes right away; in a world of one the gathered weights
        # are a second copy of the local shard, and gathering it twice a step costs more than it saves
        # (kept, they cost one compute-dtype copy of the weights: about 3 GB in bf16 for gpt2-1.5b).
        reshard = env.world_size > 1 and index < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # The root unit holds the embeddings and the output layer, so tied ones stay one tensor.
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model  # type: ignore[return-value]


def device_mesh(env: DistEnv, shard_size: int) -> DeviceMesh:
    """All ranks in one dimension, or (replicate, shard) groups of `shard_size` ranks within nodes. The
    rank layout is real data even when the model is built on fake tensors (`plan --measure`)."""
    with unset_fake_temporarily():
        if shard_size == env.world_size:
            return init_device_mesh(env.device.type, (env.world_size,))
        order = node_major_order(env)  # groups within nodes, however the ranks are numbered
        if order != list(range(env.world_size)):
            log.info("ranks are not numbered node by node: shard groups %s", shard_groups(order, shard_size))
        layout = torch.tensor(order).reshape(env.world_size // shard_size, shard_size)
        return DeviceMesh(env.device.type, layout, mesh_dim_names=("replicate", "shard"))


@torch.no_grad()
def materialize(module: FSDPModule, source: ModelSource, device: torch.device) -> None:
    """Give a model sharded on the meta device its memory and the initial weights (torchtitan's meta init).

    Each rank allocates only its shards and copies its slice of each tensor the source yields in full, one at
    a time, so no rank ever holds more than its shards and one tensor in full.
    """
    module.to_empty(device=device)
    if not isinstance(module, FSDPModule):
        module.tie_weights()  # `to_empty` gives each module its own tensor; FSDP's root unit keeps them one
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))

    def keep_shard(group: StateGroup) -> None:
        for name, full in group:
            _copy_shard(tensors[name], full)

    fill_from(source, device, tensors, keep_shard)
    check_tied(module)


def _copy_shard(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `tensor` (a DTensor's local shard, or a plain tensor whole)."""
    if not isinstance(tensor, DTensor):
        tensor.copy_(full)
        return
    shape, offset = compute_local_shape_and_global_offset(full.shape, tensor.device_mesh, tensor.placements)
    tensor.to_local().copy_(
        full[tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))]
    )


WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")
"""Name segments of activation checkpointing's and torch.compile's wrappers, absent from state dict names."""


def tied_aliases(module: nn.Module, state_names: Iterable[str]) -> set[str]:
    """The state-dict names under which a parameter appears a second time (tied weights), from the
    module's structure, so every rank finds the same names whatever its shard of each tensor holds."""
    aliases = set()
    for name in tied_names(module):
        for segment in WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        aliases.add(name)
    missing = aliases - set(state_names)
    if missing:  # a wrapper that renames parameters: store every name, as before, rather than guess
        log.warning("tied parameters %s are not named so in the state dict: checkpoints store them twice",
                    sorted(missing))  # fmt: skip
        return set()
    return aliases


class FSDPBackend:
    """Checkpoints are DCP folders, which reshard on load: any world size can resume any other's."""

    name = "fsdp"
    supports_async = True

    def __init__(
        self, config: Config, source: ModelSource, plan: BatchPlan, env: DistEnv, weights: bool = True
    ) -> None:
        """`weights=False`: the shards get memory but not the source's values (`plan --measure`, on fake
        tensors, where only their sizes matter; one rank's model is then built on its device directly, as
        fake tensors cannot replace a meta model's tied parameters)."""
        meta = source.meta()
        self.shard_size = shard_group_size(config.parallel.shard, env, state_bytes(meta))
        self.sharded = env.world_size > 1
        self.world_size = env.world_size
        if self.sharded:
            self.module = parallelize(
                meta, config.train.precision, env, config.train.compile, self.shard_size
            )
        else:
            if not weights:
                with torch.device(env.device):
                    meta = source.empty()
            self.module = meta
            if config.train.compile:
                compile_blocks(meta)
        if weights:
            materialize(self.module, source, env.device)
        elif self.sharded:
            self.module.to_empty(device=env.device)
        self.optimizer = build_optimizer(self.module, config.train)
        self.scheduler = build_scheduler(self.optimizer, config.train)
        self.grad_clip = config.train.grad_clip
        self.grad_accum = plan.grad_accum
        autocast = config.train.precision == "bf16" and not self.sharded
        self._autocast = {"device_type": env.device.type, "dtype": torch.bfloat16, "enabled": autocast}
        self.module_device = env.device
        self.attention = prepare_attention(self.module)
        self.async_writer = AsyncCheckpointerType.THREAD
        """Who writes a background save's shards; a thread stalls training least (docs/checkpoints.md)."""
        self._stager: DefaultStager | None = None
        self._stager_shares = False
        self._aliases: set[str] | None = None
        """Tied parameters' second names (`_written_state`), found at the first save or load."""

    def forward_backward(
        self, batch: dict[str, torch.Tensor], last_micro_batch: bool, num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.sharded and self.shard_size < self.world_size:
            # Gradients are reduce-scattered after every micro batch, so that what a rank holds between them is
            # its gradient shard: skipping that sync would keep a full fp32 gradient of every parameter on
            # every rank until the last micro batch (FSDP2's unsharded_accumulated_grad, +4 bytes per
            # parameter, which `plan` does not budget). Only the all-reduce across hybrid-sharding replicas
            # (a slower, inter-node collective) waits for the last micro batch.
            self.module.set_requires_all_reduce(last_micro_batch)
        with torch.autocast(**self._autocast):
            loss = self.module(**model_inputs(batch, num_items, self.attention)).loss
        (loss / self.grad_accum).backward()
        return loss.detach()

    def step(self) -> torch.Tensor:
        """Like DeepSpeed, no update from NaN/inf gradients, decided on the device: the fused AdamW skips
        every parameter's update (and keeps its step count) when `found_inf` is set, so the host never
        has to read the norm before the next step."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def advance_schedule(self) -> None:
        self.scheduler.step()

    @torch.no_grad()
    def eval_loss(
        self, batch: dict[str, torch.Tensor], num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.autocast(**self._autocast):
            return self.module(**model_inputs(batch, num_items, self.attention)).loss.detach()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _dcp_state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def _written_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` with each tied parameter under one name: the first of its names, its moments once.

        `get_state_dict` lists a tied parameter under every name (`transformer.wte.weight` and
        `lm_head.weight`), and its AdamW moments under both too: a third of gpt2-124m's checkpoint would
        be copies. The tensors left out are the same storage as the one kept, so a load fills them as
        well; a checkpoint written with the copies still loads (DCP reads only the names asked for).
        """
        if self._aliases is None:
            self._aliases = tied_aliases(self.module, state["model"])
        aliases = self._aliases
        if not aliases:
            return state
        optim = dict(state["optim"])
        optim["state"] = {name: value for name, value in optim["state"].items() if name not in aliases}
        return {"model": {k: v for k, v in state["model"].items() if k not in aliases}, "optim": optim}

    def save(self, step_dir: Path, async_group: Any = None) -> AsyncSaveResponse | None:
        """Write model + optimizer shards; with `async_group`, in the background.

        In the background, the shards are first copied (staged) into host buffers by the stager's own thread,
        then written by DCP's writer: the returned response's `staging_completion` says when the live
        weights may change again (CheckpointManager.before_update waits for it), `upload_completion` when
        the files are written.
        """
        if dist.get_rank() == 0:
            atomic_write_text(step_dir / "scheduler.json", json.dumps(self.scheduler.state_dict()))
        state = self._written_state(self._dcp_state())
        if async_group is None:
            dcp.save(state, checkpoint_id=step_dir / "model")
            return None
        response = dcp.async_save(
            state,
            checkpoint_id=step_dir / "model",
            process_group=async_group,
            async_checkpointer_type=self.async_writer,
            async_stager=self._async_stager(),
        )
        if not isinstance(response, AsyncSaveResponse):  # only a stager without a background thread does this
            raise TypeError(f"dcp.async_save returned {type(response).__name__}, not AsyncSaveResponse")
        return response

    def _async_stager(self) -> DefaultStager:
        """One stager for the backend's life: it keeps the host copy of every shard (pinned where CUDA is
        there) and refills the same buffers at each save, so only the first save allocates them."""
        to_process = self.async_writer == AsyncCheckpointerType.PROCESS
        if self._stager is not None and self._stager_shares != to_process:
            self.close()  # the writer kind changed (bench/checkpoint.py measures both)
        if self._stager is None:
            cuda = self.module_device.type == "cuda"
            options = StagingOptions(
                use_pinned_memory=cuda,  # pinning needs CUDA; on CPU the stager would ignore it with a warning
                use_shared_memory=to_process,  # a writer process then maps the buffers instead of a pickled copy
                use_async_staging=True,  # copied by the stager's thread while training computes
                use_non_blocking_copy=cuda,
            )
            self._stager, self._stager_shares = DefaultStager(options), to_process
        return self._stager

    def close(self) -> None:
        """Free the staging buffers and the stager's thread (after the last background save)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def load(self, step_dir: Path, saved_world_size: int) -> None:
        state = self._dcp_state()
        dcp.load(self._written_state(state), checkpoint_id=step_dir / "model")
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self.scheduler.load_state_dict(json.loads((step_dir / "scheduler.json").read_text()))
