"""Which ranks share a node, as the ranks report it: shard groups stay within nodes whatever the numbering.

srun numbers ranks node by node by default (`--distribution=block`); with `--distribution=cyclic` (or `plane`, or
a launcher with an order of its own) consecutive ranks sit on different nodes, and groups of consecutive ranks
would send hybrid sharding's frequent collectives over the network. Each rank names its node (SLURM_NODEID,
torchrun's GROUP_RANK, else its rank divided by the ranks per node), and one all_gather at start-up gives every
rank the whole layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch.distributed as dist

from trainer.distributed import DistEnv


def node_of(env: DistEnv, environ: Mapping[str, str] = os.environ) -> int:
    """This rank's node index."""
    for variable in ("SLURM_NODEID", "GROUP_RANK"):
        if environ.get(variable, "").isdigit():
            return int(environ[variable])
    return env.rank // env.local_world_size


def node_major_order(env: DistEnv) -> list[int]:
    """Every rank, node by node (in rank order within a node); a collective: every rank must call it."""
    nodes: list[int] = [0] * env.world_size
    if dist.is_initialized() and env.world_size > 1:
        dist.all_gather_object(nodes, node_of(env))
    else:
        nodes = [node_of(env)]
    return sorted(range(env.world_size), key=lambda rank: (nodes[rank], rank))


def shard_groups(order: list[int], shard_size: int) -> list[list[int]]:
    """The shard groups: `shard_size` ranks at a time of the node-major order."""
    return [order[start : start + shard_size] for start in range(0, len(order), shard_size)]


def consecutive_layout_problem(order: list[int], setting: str) -> str | None:
    """Why groups of consecutive ranks would not be node-local (DeepSpeed's hierarchical partitioning can build
    no other), or None when the ranks are numbered node by node."""
    if order == sorted(order):
        return None
    return (
        f"parallel.shard={setting} with parallel.backend=deepspeed needs ranks numbered node by node, and this "
        f"job's are not (node by node they are {order}); launch with srun's default --distribution=block, "
        "or use parallel.shard=full, or parallel.backend=fsdp (which builds its groups from each rank's node)"
    )
