"""FSDP2: `fully_shard` per transformer block and on the root, MixedPrecisionPolicy for bf16."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainer.atomic import atomic_write_text
from trainer.config import BatchPlan, Config
from trainer.distributed import DistEnv
from trainer.models.build import check_tied, compile_blocks, decoder_layers
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.inputs import model_inputs
from trainer.parallel.model_source import ModelSource
from trainer.parallel.sharding import shard_group_size, state_bytes


def parallelize(
    model: nn.Module, precision: str, env: DistEnv, compile_model: bool, shard_size: int | None = None
) -> FSDPModule:
    """`fully_shard` over all ranks, or (`shard_size` < world size) over groups of `shard_size` ranks and
    replicated across the groups: a 2-D (replicate, shard) mesh, FSDP2's hybrid sharding."""
    shard_size = shard_size or env.world_size
    if shard_size < env.world_size:
        shape, names = (env.world_size // shard_size, shard_size), ("replicate", "shard")
        mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=names)
    else:
        mesh = init_device_mesh(env.device.type, (env.world_size,))
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


def materialize(module: FSDPModule, source: ModelSource, device: torch.device) -> None:
    """Give a model sharded on the meta device its memory and rank 0's weights (torchtitan's meta init).

    Each rank allocates only its shards; rank 0 sends one full tensor at a time and every rank copies its
    slice, so no rank but 0 ever holds more than its shards and one parameter in full.
    """
    module.to_empty(device=device)
    source.share_buffers(module)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(module, source.take_full_state(), options=options)
    check_tied(module)


class FSDPBackend:
    """Checkpoints are DCP folders, which reshard on load: any world size can resume any other's."""

    name = "fsdp"
    supports_async = True

    def __init__(self, config: Config, source: ModelSource, plan: BatchPlan, env: DistEnv) -> None:
        meta = source.meta()
        self.shard_size = shard_group_size(config.parallel.shard, env, state_bytes(meta))
        self.module = parallelize(meta, config.train.precision, env, config.train.compile, self.shard_size)
        materialize(self.module, source, env.device)
        self.optimizer = build_optimizer(self.module, config.train)
        self.scheduler = build_scheduler(self.optimizer, config.train)
        self.grad_clip = config.train.grad_clip
        self.grad_accum = plan.grad_accum

    def forward_backward(
        self, batch: dict[str, torch.Tensor], last_micro_batch: bool, num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Reduce-scatter gradients only once per optimizer step, on the last micro batch.
        self.module.set_requires_gradient_sync(last_micro_batch)
        loss = self.module(**model_inputs(batch, num_items)).loss
        (loss / self.grad_accum).backward()
        return loss.detach()

    def step(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if torch.isfinite(norm):  # like DeepSpeed: no update (and no schedule step) from NaN/inf gradients
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def eval_loss(
        self, batch: dict[str, torch.Tensor], num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.module(**model_inputs(batch, num_items)).loss.detach()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _dcp_state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, step_dir: Path, async_group: Any = None) -> Future | None:
        """Write model + optimizer shards; with `async_group`, in the background (returns the future)."""
        if dist.get_rank() == 0:
            atomic_write_text(step_dir / "scheduler.json", json.dumps(self.scheduler.state_dict()))
        state = self._dcp_state()
        if async_group is not None:
            return dcp.async_save(state, checkpoint_id=step_dir / "model", process_group=async_group)
        dcp.save(state, checkpoint_id=step_dir / "model")
        return None

    def load(self, step_dir: Path, saved_world_size: int) -> None:
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=step_dir / "model")
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self.scheduler.load_state_dict(json.loads((step_dir / "scheduler.json").read_text()))
