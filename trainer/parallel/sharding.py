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
from trainer.shard_groups import group_size


def shard_group_size(setting: str, env: DistEnv, state_bytes: int) -> int:
    """Ranks per shard group for `parallel.shard` in this job (the rule: trainer/shard_groups.py); the
    memory `auto` fits the state into is that of this node's GPUs."""
    node_memory = None
    if env.device.type == "cuda":
        node_memory = torch.cuda.get_device_properties(env.device).total_memory * env.local_world_size
    return group_size(setting, env.world_size, env.local_world_size, state_bytes, node_memory)


def state_bytes(model: torch.nn.Module) -> int:
    """Weights, gradients and AdamW's two moments, in fp32: 16 bytes a parameter (the meta model costs nothing)."""
    return 16 * sum(param.numel() for param in model.parameters())
