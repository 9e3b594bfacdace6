"""Requeueing the SLURM job: once per allocation, at most `slurm.max_requeues` times, counted in RUN_DIR.

Used by rank 0 after a preemption's checkpoint and by each task's supervisor after a failure. No torch here:
the supervisor and the login-node commands import it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from trainer.atomic import atomic_write_text

REQUEUES_FILE = "requeues.json"
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
"""SLURM's time-limit warning (--signal=USR2@LEAD) and its preemption signal."""


def requeue_count(run_dir: Path) -> int:
    path = run_dir / REQUEUES_FILE
    return int(json.loads(path.read_text())["count"]) if path.is_file() else 0


def requeue_events(run_dir: Path) -> list[dict]:
    """requeues.json's events, oldest first ([] when there is none or it cannot be read)."""
    try:
        return list(json.loads((run_dir / REQUEUES_FILE).read_text())["events"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _job_id() -> str | None:
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job_id and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job_id


def _marker(run_dir: Path, job_id: str) -> Path:
    return run_dir / f".requeue-{job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def _claim(run_dir: Path, job_id: str, decision: str) -> bool:
    """True for the first task of this allocation to decide: after a failure every surviving task may.
    The marker appears with its decision in it (a hard link of a finished file), so a reader never sees it
    empty."""
    marker = _marker(run_dir, job_id)
    draft = marker.with_name(f"{marker.name}.{os.getpid()}.{os.uname().nodename}")
    draft.write_text(decision + "\n")
    try:
        os.link(draft, marker)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink(missing_ok=True)


def decided(run_dir: Path) -> bool:
    """Whether a task of this allocation has already decided about requeueing it."""
    job_id = _job_id()
    return job_id is not None and _marker(run_dir, job_id).exists()


def decision(run_dir: Path) -> str:
    """What a task of this allocation decided about requeueing it ('' when none has)."""
    job_id = _job_id()
    try:
        return _marker(run_dir, job_id).read_text().strip() if job_id else ""
    except OSError:
        return ""


def record_decision(run_dir: Path, decision: str) -> bool:
    """Claim this allocation's decision without requeueing (a user error): no other task requeues it."""
    job_id = _job_id()
    return job_id is not None and _claim(run_dir, job_id, decision)


def cancel_marker(run_dir: Path, job_id: str) -> Path:
    """Written by `llm-train cancel` before it signals the job: the stop that follows is for good."""
    return run_dir / f".cancel-{job_id}"


def cancelled(run_dir: Path) -> bool:
    """Whether `llm-train cancel` stopped this job (its SIGTERM is then not a preemption)."""
    job_id = _job_id()
    return job_id is not None and cancel_marker(run_dir, job_id).exists()


def _scontrol_requeue(job_id: str) -> str | None:
    """`scontrol requeue JOB`: None once the job is requeued, else what went wrong.

    The requeue ends this job's processes, and scontrol is one of them: it starts with the stop signals blocked
    (a blocked mask survives exec), and when it still dies before it could say so, the job's own record says
    whether the requeue happened (it is pending again, or its restart count went up)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if result.returncode == 0 or _was_requeued(job_id):
        return None
    return result.stderr.strip() or f"exit status {result.returncode}"


def _was_requeued(job_id: str) -> bool:
    """Whether SLURM has requeued this allocation's job (pending again, or restarted since it began)."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    fields = dict(field.split("=", 1) for field in shown.split() if "=" in field)
    restarts = fields.get("Restarts", "")
    before = os.environ.get("SLURM_RESTART_COUNT", "0") or "0"
    return fields.get("JobState") in ("PENDING", "REQUEUED", "REQUEUE_HOLD") or (
        restarts.isdigit() and before.isdigit() and int(restarts) > int(before)
    )


def requeue(
    run_dir: Path, max_requeues: int, step: int, reason: str, cause: str | None = None
) -> tuple[bool, str]:
    """Requeue this SLURM job if requeues remain, once per allocation. Returns (requeued, why).

    `reason` is the signal's name after a preemption, or "failure" after a rank failed (`cause` says how).
    A job stopped by `llm-train cancel` is never requeued.
    """
    job_id = _job_id()
    if not job_id:
        return False, "not running under SLURM: resume by running the same command again"
    if cancelled(run_dir):
        return False, f"job {job_id} was cancelled (llm-train cancel): not requeued"
    if not _claim(run_dir, job_id, f"requeue after {reason}"):
        return False, f"another task of job {job_id} has decided ({decision(run_dir) or '?'})"
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
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "step": step,
            "signal": reason,
            **({"cause": cause} if cause else {}),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    atomic_write_text(history_path, json.dumps(history, indent=1))
    problem = _scontrol_requeue(job_id)
    if problem is not None:
        atomic_write_text(history_path, before)
        return False, f"scontrol requeue {job_id} failed: {problem}"
    return True, f"requeued job {job_id} ({count + 1} of at most {max_requeues})"
