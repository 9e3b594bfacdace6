"""Faults on demand, for tests of what the trainer does when things break. Inert unless the variable is set.

LLM_TRAIN_TEST_SLEEP_IN_SAVE="STEP:SECONDS"   sleep once step STEP's shards are written (or failed), before its manifest
LLM_TRAIN_TEST_NAN_AT_BATCH="K[,K...]"        the loss of global batch K (0-based draw order) becomes NaN
LLM_TRAIN_TEST_SPIKE_AT_BATCH="K:FACTOR"     the loss of global batch K is multiplied by FACTOR (a loss spike)
LLM_TRAIN_TEST_STALL="RANK:STEP:SECONDS"      rank RANK stalls before step STEP's optimizer update
LLM_TRAIN_TEST_ABORT="RANK:STEP[:ALLOCS]"     rank RANK calls os.abort() (SIGABRT, what NCCL's watchdog does) at
                                              step STEP, in the first ALLOCS SLURM allocations (default 1)
LLM_TRAIN_TEST_USER_ERROR="RANK:STEP"         rank RANK raises a UserError (exit 2) at step STEP
LLM_TRAIN_TEST_SLOW_RANK="RANK:SECONDS"       rank RANK sleeps SECONDS before every optimizer step (a straggler)
LLM_TRAIN_TEST_READ_ERROR="RANK:COUNT[:ALLOC]" the first COUNT sample reads of rank RANK fail with EIO (in
                                              trainer/data/read_retry.py, where reads are retried)
LLM_TRAIN_TEST_SCANCEL_AT_START="ALLOC"       rank 0 runs a plain `scancel` of its own job (SIGTERM to every
                                              process) during start-up, before the model is built
LLM_TRAIN_TEST_KILL_IN_SAVE="RANK:STEP:ALLOC" rank RANK is killed by SIGKILL in the middle of writing step
                                              STEP's checkpoint (its shards written, the manifest not yet)
LLM_TRAIN_TEST_DISK_FULL="STEP:ALLOC"         writing step STEP's checkpoint fails on rank 0 with ENOSPC

ALLOC (where given) is the SLURM allocation the fault happens in: SLURM_RESTART_COUNT, 0 for the first, and
0 outside SLURM. One run can so be dealt a different fault in each allocation.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from trainer.errors import UserError

log = logging.getLogger(__name__)

SLEEP_IN_SAVE_ENV = "LLM_TRAIN_TEST_SLEEP_IN_SAVE"
NAN_AT_BATCH_ENV = "LLM_TRAIN_TEST_NAN_AT_BATCH"
SPIKE_AT_BATCH_ENV = "LLM_TRAIN_TEST_SPIKE_AT_BATCH"
STALL_ENV = "LLM_TRAIN_TEST_STALL"
ABORT_ENV = "LLM_TRAIN_TEST_ABORT"
USER_ERROR_ENV = "LLM_TRAIN_TEST_USER_ERROR"
SLOW_RANK_ENV = "LLM_TRAIN_TEST_SLOW_RANK"  # RANK:SECONDS: that rank is this much slower at every step
SCANCEL_AT_START_ENV = "LLM_TRAIN_TEST_SCANCEL_AT_START"
KILL_IN_SAVE_ENV = "LLM_TRAIN_TEST_KILL_IN_SAVE"
DISK_FULL_ENV = "LLM_TRAIN_TEST_DISK_FULL"


@functools.cache  # read once per process: two of these hooks sit in every training step
def _numbers(variable: str) -> list[float] | None:
    value = os.environ.get(variable)
    return [float(part) for part in value.replace(",", ":").split(":")] if value else None


def allocation() -> int:
    """This SLURM allocation's number: 0 for the first, 1 after one requeue (0 outside SLURM)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(restarts) if restarts.isdigit() else 0


def start_faults(rank: int) -> None:
    """The scancel-at-start hook: rank 0 cancels its own job as a user or a site would, mid start-up."""
    hook = _numbers(SCANCEL_AT_START_ENV)
    job_id = os.environ.get("SLURM_JOB_ID")
    if hook and rank == 0 and job_id and int(hook[0]) == allocation():
        log.warning("test hook: scancel %s during start-up", job_id)
        subprocess.run(["scancel", job_id], check=False, timeout=60)


def save_faults(rank: int, step: int) -> OSError | None:
    """The hooks in the middle of a checkpoint write (shards written, manifest not yet): sleep, SIGKILL of a
    rank, or the full disk returned as the failure of this rank's write."""
    hook = _numbers(SLEEP_IN_SAVE_ENV)
    if hook and int(hook[0]) == step:
        time.sleep(hook[1])
    hook = _numbers(KILL_IN_SAVE_ENV)
    if hook and (int(hook[0]), int(hook[1]), int(hook[2])) == (rank, step, allocation()):
        log.warning("test hook: rank %d is killed by SIGKILL while writing checkpoint step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)
    hook = _numbers(DISK_FULL_ENV)
    if hook and rank == 0 and (int(hook[0]), int(hook[1])) == (step, allocation()):
        return OSError(errno.ENOSPC, f"No space left on device (test hook, checkpoint step {step})")
    return None


def step_faults(rank: int, step: int) -> None:
    """The slow-rank, stall, abort and user-error hooks, between a step's backward and its optimizer step."""
    hook = _numbers(SLOW_RANK_ENV)
    if hook and int(hook[0]) == rank:
        time.sleep(hook[1])
    hook = _numbers(STALL_ENV)
    if hook and int(hook[0]) == rank and int(hook[1]) == step:
        log.warning("test hook: rank %d stalls for %.0f s at step %d", rank, hook[2], step)
        time.sleep(hook[2])
    hook = _numbers(ABORT_ENV)
    if hook and int(hook[0]) == rank and int(hook[1]) == step and allocation() < (hook[2:] or [1])[0]:
        log.warning("test hook: rank %d aborts at step %d", rank, step)
        os.abort()
    hook = _numbers(USER_ERROR_ENV)
    if hook and int(hook[0]) == rank and int(hook[1]) == step:
        raise UserError(f"test hook: rank {rank} stops with a user error at step {step}")


def _loss_factor(batch_index: int) -> float | None:
    chosen = _numbers(NAN_AT_BATCH_ENV)
    if chosen and batch_index in {int(k) for k in chosen}:
        return float("nan")
    spike = _numbers(SPIKE_AT_BATCH_ENV)
    if spike and int(spike[0]) == batch_index:
        return spike[1]
    return None


@contextmanager
def scaled_loss_if_chosen(module: nn.Module, batch_index: int) -> Iterator[None]:
    """While active, the model's loss for this global batch (and so its gradients) is multiplied by NaN
    or by the spike factor, when one of the hooks above names the batch."""
    factor = _loss_factor(batch_index)
    if factor is None:
        yield
        return

    def scale(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        output.loss = output.loss * factor
        return output

    handle = module.register_forward_hook(scale)
    try:
        yield
    finally:
        handle.remove()
