"""Why an attempt failed, in one line, where `llm-train status` finds it: RUN_DIR/failures/rankNNNNN.json.

A failed job's reason is otherwise only in its task logs (submitit's *_log.err on some node). Each rank whose
training fails writes its one-line error here, tagged with the SLURM attempt ("JOB.RESTART", outside SLURM
"local"); the newest record of a rank replaces the older. No torch here: `status` reads it on the login node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_text
from trainer.resilience.heartbeat import current_attempt

FOLDER = "failures"


def record_failure(run_dir: Path, rank: int, error: str) -> None:
    """Record this rank's failure; never raises (the run is failing already)."""
    record = {"rank": rank, "error": error, "attempt": current_attempt() or "local", "time": time.time()}
    try:
        (run_dir / FOLDER).mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / FOLDER / f"rank{rank:05d}.json", json.dumps(record))
    except OSError:
        pass


def this_attempts_failure(run_dir: Path, rank: int) -> str | None:
    """The error rank `rank` recorded in this attempt (a one-rank run has no heartbeat to carry it)."""
    try:
        record = json.loads((run_dir / FOLDER / f"rank{rank:05d}.json").read_text())
    except (OSError, ValueError):
        return None
    return record.get("error") if record.get("attempt") == (current_attempt() or "local") else None


def first_failure(run_dir: Path, job_id: str | None) -> dict[str, Any] | None:
    """The earliest failure recorded by any attempt of job `job_id` (of local runs when None)."""
    records = []
    for path in (run_dir / FOLDER).glob("rank*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        job = record.get("attempt", "").split(".")[0]
        if job == (job_id if job_id is not None else "local"):
            records.append(record)
    newest_attempt = max((r["attempt"] for r in records), key=_restart, default=None)
    candidates = [r for r in records if r["attempt"] == newest_attempt]
    return min(candidates, key=lambda r: r["time"], default=None)


def _restart(attempt: str) -> int:
    restart = attempt.partition(".")[2]
    return int(restart) if restart.isdigit() else 0
