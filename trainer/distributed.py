"""Distributed initialisation in one place: who am I, who are the others, and a clean teardown.

Rank, world size and master address come from torchrun-style variables when present, else from
SLURM's, else a single process. Whatever the source, the torchrun variables are exported so that
torch.distributed and mosaicml-streaming (which reads RANK/WORLD_SIZE/LOCAL_*) agree.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _tasks_on_first_node(value: str) -> int:
    """SLURM_TASKS_PER_NODE looks like '4(x2),3'; every node of our jobs runs the same count."""
    return int(value.split(",")[0].split("(")[0])


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        tasks_per_node = (
            env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or env["SLURM_NTASKS"]
        )
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=_tasks_on_first_node(tasks_per_node),
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT + job_id % 10000)),
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", DEFAULT_PORT)))


def export_env(env: DistEnv) -> None:
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def init_distributed(timeout_s: float) -> DistEnv:
    """Join the process group: nccl on CUDA, gloo on CPU, with a collective timeout.

    The timeout turns a lost or stalled rank into an error on the others instead of a hang.
    """
    env = detect_env()
    export_env(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=env.device if backend == "nccl" else None,
        )
    log.info(
        "rank %d/%d (local %d/%d) on %s, backend %s, master %s:%d",
        env.rank, env.world_size, env.local_rank, env.local_world_size, env.device, backend, env.master_addr, env.master_port,
    )  # fmt: skip
    return env


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(timeout_s: float) -> Iterator[DistEnv]:
    """Process group for the duration of the block, destroyed on success and on error."""
    env = init_distributed(timeout_s)
    try:
        yield env
    finally:
        teardown()


def all_reduce_scalar(
    value: float | torch.Tensor, dtype: torch.dtype, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Reduce a scalar over ranks (a no-op in a single process); nccl needs it on the GPU."""
    tensor = torch.as_tensor(value, dtype=dtype).detach().clone().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Average a scalar over ranks (float64, so the result does not depend on the device)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return float((all_reduce_scalar(value, torch.float64) / world_size).item())
