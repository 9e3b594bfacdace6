"""Preemption and time limits: a signal becomes "finish this step, save, requeue, exit" on every rank.

SLURM sends SIGUSR2 a lead time before the time limit (`--signal=USR2@LEAD`) and SIGTERM on
preemption. Handlers only set a flag; the loop checks it between steps, and all ranks agree with one
all-reduce, so every rank stops after the same step and a save is never interrupted by the signal.
Rank 0 then requeues the SLURM job (`scontrol requeue`), at most `slurm.max_requeues` times, counting
the requeues in RUN_DIR/requeues.json.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from trainer.atomic import atomic_write_text
from trainer.distributed import all_reduce_scalar

log = logging.getLogger(__name__)

REQUEUES_FILE = "requeues.json"
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(Exception):
    """Raised by the loop after the checkpoint of `step` is saved because a stop signal arrived."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.step = step
        self.signal_name = signal_name


class StopSignals:
    """Catches SIGUSR2/SIGTERM and tells every rank, at a step boundary, whether any rank got one."""

    def __init__(self) -> None:
        self.received: int = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            log.warning(
                "received %s: stopping after this step with a checkpoint", signal.Signals(signum).name
            )
        self.received = signum

    def agreed(self) -> str | None:
        """The signal's name if any rank received one (a collective: every rank calls it each step)."""
        value = int(all_reduce_scalar(self.received, torch.int64, op=dist.ReduceOp.MAX).item())
        return signal.Signals(value).name if value else None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_count(run_dir: Path) -> int:
    path = run_dir / REQUEUES_FILE
    return int(json.loads(path.read_text())["count"]) if path.is_file() else 0


def _claim(run_dir: Path, job_id: str) -> bool:
    """True for the first rank of this allocation to ask: after a failure every surviving rank may."""
    marker = run_dir / f".requeue-{job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def requeue(run_dir: Path, max_requeues: int, step: int, reason: str) -> tuple[bool, str]:
    """Requeue this SLURM job if requeues remain, once per allocation. Returns (requeued, why).

    `reason` is the signal's name after a preemption, or "failure" after a rank failed.
    """
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job_id and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job_id:
        return False, "not running under SLURM: resume by running the same command again"
    if not _claim(run_dir, job_id):
        return False, f"another rank requeues job {job_id}"
    count = requeue_count(run_dir)
    if count >= max_requeues:
        return False, f"slurm.max_requeues={max_requeues} reached: not requeueing; resubmit to continue"
    history_path = run_dir / REQUEUES_FILE
    history = json.loads(history_path.read_text()) if history_path.is_file() else {"count": 0, "events": []}
    before = json.dumps(history, indent=1)
    history["count"] = count + 1
    history["events"].append(
        {
            "job_id": job_id,
            "step": step,
            "signal": reason,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    atomic_write_text(history_path, json.dumps(history, indent=1))
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        atomic_write_text(history_path, before)
        return False, f"scontrol requeue {job_id} failed: {result.stderr.strip()}"
    return True, f"requeued job {job_id} ({count + 1} of at most {max_requeues})"
