"""How many ranks one copy of the model state is sharded over (`parallel.shard`).

Full sharding spreads parameters, gradients and optimizer state over every rank, so each all-gather and
reduce-scatter crosses the inter-node network. Hybrid sharding shards within a group of ranks (a node) and
replicates across groups: the frequent collectives stay on the fast intra-node links, and only the gradient
all-reduce between replicas crosses nodes, once per step (FSDP2 on a 2-D mesh; DeepSpeed's hierarchical
partitioning, ZeRO++ hpZ).
"""

from __future__ import annotations

import torch

from trainer.distributed import DistEnv
from trainer.errors import UserError

FITS_ONE_NODE = 0.5
"""`auto` shards within nodes when the model state takes at most this share of a node's device memory."""


def shard_group_size(setting: str, env: DistEnv, state_bytes: int) -> int:
    """Ranks per shard group for `parallel.shard` (full | node | auto | N) in this job.

    auto: `node` when the job spans more than one node and the model state (`state_bytes`: weights,
    gradients and optimizer state) fits one node's devices; otherwise `full`. Without a GPU there is no
    device memory to fit, and auto is full.
    """
    world, node = env.world_size, env.local_world_size
    if setting == "full":
        return world
    if setting == "node":
        size = node
    elif setting == "auto":
        size = node if world > node and _fits_one_node(state_bytes, env) else world
    else:
        size = int(setting)
    if size < 1 or world % size:
        raise UserError(
            f"parallel.shard={setting} makes groups of {size} ranks, which do not divide the job's {world} ranks; "
            f"use full, node or a divisor of {world}"
        )
    return size


def state_bytes(model: torch.nn.Module) -> int:
    """Weights, gradients and AdamW's two moments, in fp32: 16 bytes a parameter (the meta model costs nothing)."""
    return 16 * sum(param.numel() for param in model.parameters())


def _fits_one_node(state_bytes: int, env: DistEnv) -> bool:
    if env.device.type != "cuda":
        return False
    memory = torch.cuda.get_device_properties(env.device).total_memory * env.local_world_size
    return state_bytes <= FITS_ONE_NODE * memory
