"""Distributed initialisation in one place: who am I, who are the others, and a clean teardown.

Rank, world size and master address come from torchrun-style variables when present, else from
SLURM's, else a single process. Whatever the source, the torchrun variables are exported so that
torch.distributed and mosaicml-streaming (which reads RANK/WORLD_SIZE/LOCAL_*) agree.

GPU binding. Sites give a task either every GPU of its node (it uses `cuda:LOCAL_RANK`) or only its
own (`--gpus-per-task=1`, `--gpu-bind=single:1`, per-task cgroups: every task sees its GPU as
`cuda:0`). `choose_device` maps a rank to `local_rank % visible devices`, which is right in both
cases, and refuses a layout where two ranks of a node would share a GPU (see its docstring for the rule).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
"""Without SLURM (torchrun's default); under SLURM the port comes from the job id (`slurm_port`)."""
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000
PORT_STRIDE = 1009  # a prime: attempt k of job j and attempt 0 of job j + k do not meet
"""Ports 20000-29999: below Linux's ephemeral range (32768-60999), where an outgoing connection of any
process may hold the port, and above the privileged ones; two jobs sharing a node collide only when
their ids are equal modulo 10000."""


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
        """This rank's device (`choose_device`); a UserError when the node's ranks would share a GPU."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return choose_device(self.local_rank, self.local_world_size, count, os.environ)


def _id_count(value: str | None) -> int | None:
    """How many GPU ids a SLURM list such as '0,1,2,3' names; None when unset or empty."""
    ids = [item for item in (value or "").split(",") if item.strip()]
    return len(ids) or None


def node_gpu_count(device_count: int, environ: Mapping[str, str]) -> int | None:
    """How many GPUs the ranks of this node have among them, when the environment tells; else None.

    - SLURM_JOB_GPUS: the job's GPUs on the node, as global ids, never narrowed to one task.
    - SLURM_STEP_GPUS: the step's, but under per-task binding it may list only this task's GPUs:
      it counts only when it names more GPUs than this process sees.
    - torchrun (TORCHELASTIC_RUN_ID) gives every worker of a node the same environment, and without
      CUDA_VISIBLE_DEVICES no binding narrowed what this process sees: in both cases the node's ranks
      see the same `device_count` GPUs.
    """
    job_gpus = _id_count(environ.get("SLURM_JOB_GPUS"))
    if job_gpus is not None:
        return job_gpus
    step_gpus = _id_count(environ.get("SLURM_STEP_GPUS"))
    if step_gpus is not None and step_gpus > device_count:
        return step_gpus
    if "TORCHELASTIC_RUN_ID" in environ or "CUDA_VISIBLE_DEVICES" not in environ:
        return device_count
    return None


def choose_device(
    local_rank: int, local_world_size: int, device_count: int, environ: Mapping[str, str]
) -> torch.device:
    """The device of local rank `local_rank`: `cuda:(local_rank % device_count)`, or the CPU without GPUs.

    `device_count` is what this process sees. When it is at least the node's rank count, every
    rank has a GPU of its own. When it is smaller, the ranks have a GPU each only if every task sees
    a different subset (per-task binding), which one process cannot see; the rule:
    - the node's GPU count is known (`node_gpu_count`): fine when it is at least the rank count;
    - it is not: fine when the process sees exactly one GPU (the per-task binding pattern; if two
      tasks were in fact given the same GPU, NCCL reports "Duplicate GPU detected" at start-up),
      shared when it sees several (several tasks see the same set).
    A shared GPU is a UserError, raised by every rank of the node alike.
    """
    if device_count <= 0:
        return torch.device("cpu")
    if local_world_size > device_count:
        node_gpus = node_gpu_count(device_count, environ)
        shared = node_gpus < local_world_size if node_gpus is not None else device_count > 1
        if shared:
            raise UserError(
                _shared_gpu_message(local_rank, local_world_size, device_count, node_gpus, environ)
            )
    return torch.device("cuda", local_rank % device_count)


def _shared_gpu_message(
    local_rank: int,
    local_world_size: int,
    device_count: int,
    node_gpus: int | None,
    environ: Mapping[str, str],
) -> str:
    found = ", ".join(
        f"{name}={environ.get(name, 'unset')}"
        for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
    )
    return (
        f"the {local_world_size} ranks of this node (local ranks 0-{local_world_size - 1}) would share "
        f"{node_gpus if node_gpus is not None else device_count} GPU(s): local rank {local_rank} sees "
        f"{device_count} device(s) ({found}); give every rank its own GPU: set --ntasks-per-node equal to "
        "--gpus-per-node (every task sees all the node's GPUs) or use --gpus-per-task=1"
    )


def _top_level_items(nodelist: str) -> list[str]:
    """'a[1,3-5],b7' -> ['a[1,3-5]', 'b7']: split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(nodelist[start:index])
            start = index + 1
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list, without scontrol.

    'gpu[003-005,9],cpu1' -> 'gpu003', 'rack[1-2]-gpu[01-08]' -> 'rack1-gpu01', 'a[1,3-5],b7' -> 'a1':
    each bracket group contributes the first number of its first range, zero padding as written.
    """
    items = _top_level_items(nodelist.strip())
    if not items or not re.fullmatch(r"(?:[^\[\],]+|\[[^\[\]]+\])+", items[0]):
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\]]+)\]", lambda group: group.group(1).split(",")[0].split("-")[0].strip(), items[0])


@functools.cache
def master_host(nodelist: str) -> str:
    """First host of the job: `scontrol show hostnames` when scontrol is installed, else `first_host`.

    scontrol expands every syntax SLURM writes; the parser covers what sites use (several bracket
    groups, zero padding, lists) for nodes without the SLURM client tools.
    """
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            result = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            hosts = result.stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError) as error:
            log.warning(
                "scontrol show hostnames %s failed (%s); parsing the node list instead", nodelist, error
            )
    return first_host(nodelist)


def slurm_port(job_id: int, restart: int = 0) -> int:
    """The master port of attempt `restart` of SLURM job `job_id`: 20000-29999, outside the ephemeral range for
    any id, and another one for each attempt (something of a killed attempt may still hold its port)."""
    return SLURM_PORT_BASE + (job_id + PORT_STRIDE * restart) % SLURM_PORT_SPAN


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
            master_addr=env.get("MASTER_ADDR") or master_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            master_port=int(
                env.get("MASTER_PORT", slurm_port(job_id, int(env.get("SLURM_RESTART_COUNT") or 0)))
            ),
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
    device = env.device  # a UserError here, before any collective, when the node's ranks would share a GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    log.info(
        "rank %d/%d (local %d/%d) on %s, CUDA_VISIBLE_DEVICES=%s, backend %s, master %s:%d",
        env.rank, env.world_size, env.local_rank, env.local_world_size, device,
        os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), backend, env.master_addr, env.master_port,
    )  # fmt: skip
    # Under torchrun its agent already holds the rendezvous store on MASTER_PORT and the ranks join it.
    if env.rank == 0 and env.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        check_port_free(env.master_port)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return env


def check_port_free(port: int) -> None:
    """Rank 0 hosts the rendezvous: a port already taken is named here, not as gloo's or NCCL's EADDRINUSE."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds it
        try:
            probe.bind(("", port))
        except OSError as error:
            raise RuntimeError(
                f"the rendezvous port {port} on {socket.gethostname()} is taken ({error.strerror}): another job "
                "or a leftover process holds it; set MASTER_PORT, or let the requeued attempt take another"
            ) from error


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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in float64 (a no-op in a single process), on the tensor's device."""
    total = tensor.detach().double().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        needs = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        if total.device.type == needs.type:
            dist.all_reduce(total)  # in place, on the tensor's device: no copy, no wait for the host
        else:
            reduced = total.to(needs)
            dist.all_reduce(reduced)
            total = reduced.to(tensor.device)
    return total


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Average a scalar over ranks (float64, so the result does not depend on the device)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return float((all_reduce_scalar(value, torch.float64) / world_size).item())
