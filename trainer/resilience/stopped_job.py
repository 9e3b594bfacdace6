"""A watcher in the batch step that requeues the job when a SIGTERM reaches it and the trainer cannot:
`python -m trainer.resilience.stopped_job CONFIG [key=value ...] &`, started by the batch script before srun.

A plain `scancel` or a preemption sends SIGTERM to every process of the job, srun among them, and srun answers
SIGTERM by killing every task at once (SIGKILL to the supervisors; what is left of the step is killed when
SLURM's KillWait runs out). Between steps the trainer usually saves and requeues in time, during start-up it
cannot. So this watcher, which gets the same SIGTERM, waits for the trainer's (or a supervisor's) decision until
shortly before KillWait ends, and requeues the job itself when none came (trainer.resilience.requeue: at most
once per allocation, never after `llm-train cancel`, within slurm.max_requeues); the run then resumes from its
newest checkpoint. No torch here; the batch script ends the watcher (SIGKILL) once srun has returned.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.config import Config, load_config
from trainer.resilience.requeue import decided, requeue

DEFAULT_KILL_WAIT_S = 30.0  # SLURM's default KillWait
MARGIN_S = 1.5  # the requeue itself must be done before KillWait ends


def kill_wait_s() -> float:
    """SLURM's KillWait: how long the job's processes have between SIGTERM and SIGKILL."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_KILL_WAIT_S
    found = re.search(r"^KillWait\s*=\s*(\d+)", shown, re.MULTILINE)
    return float(found.group(1)) if found else DEFAULT_KILL_WAIT_S


def last_step(run_dir: Path) -> int:
    """The newest step in RUN_DIR/metrics.jsonl (0 when none): where the interrupted attempt had got to."""
    step = 0
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return step
    for line in lines:
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError, TypeError):
            continue  # a line cut by the kill
    return step


def requeue_unless_decided(config: Config, signal_name: str, grace_s: float) -> str | None:
    """Wait up to `grace_s` for this allocation's decision; requeue when none came. What was done, or None when
    the trainer (or a supervisor) had decided."""
    run_dir = Path(config.run.dir)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if decided(run_dir):
            return None
        time.sleep(0.1)
    if decided(run_dir):
        return None
    step = last_step(run_dir)
    if step >= config.train.max_steps:
        return f"the run had finished (step {step}): not requeued"
    cause = f"{signal_name} reached srun, which ended every task before the trainer could save; requeued by the batch script"
    _, why = requeue(run_dir, config.slurm.max_requeues, step, signal_name, cause=cause)
    return why


def main(argv: list[str]) -> int:
    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    config = load_config(argv[0], argv[1:])
    grace_s = max(kill_wait_s() - MARGIN_S, 0.5)
    while not received:
        signal.pause()
    why = requeue_unless_decided(config, "SIGTERM", grace_s)
    if why is not None:
        print(f"llm-train batch script: SIGTERM during the job; {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
