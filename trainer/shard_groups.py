"""The `parallel.shard` rule: how many ranks one copy of the model state is sharded over.

Free of torch, so that `llm-train plan` on a login node applies the same rule the ranks apply when they
build their device mesh (trainer/parallel/sharding.py).
"""

from __future__ import annotations

from trainer.errors import UserError

FITS_ONE_NODE = 0.5
"""`auto` shards within nodes when the model state takes at most this share of a node's device memory."""


def group_size(setting: str, world: int, per_node: int, state_bytes: int, node_memory: float | None) -> int:
    """Ranks per shard group for `parallel.shard` (full | node | auto | N) in a job of `world` ranks.

    auto: `node` when the job spans more than one node and the model state (`state_bytes`: weights,
    gradients and optimizer state) fits one node's devices (`node_memory` bytes in all); otherwise
    `full`. Without device memory to fit (`node_memory` None: no GPU), auto is full.
    """
    if setting == "full":
        return world
    if setting == "node":
        size = per_node
    elif setting == "auto":
        fits = node_memory is not None and state_bytes <= FITS_ONE_NODE * node_memory
        size = per_node if world > per_node and fits else world
    else:
        size = int(setting)
    if size < 1 or world % size:
        raise UserError(
            f"parallel.shard={setting} makes groups of {size} ranks, which do not divide the job's {world} ranks; "
            f"use full, node or a divisor of {world}"
        )
    return size
