"""Requeue from the batch script when a stop signal reached srun: `python -m trainer.resilience.stopped_job
SIGNAL CONFIG [key=value ...]`, run by the job's batch shell after srun has returned.

A plain `scancel` or a preemption sends SIGTERM to every process of the job, srun among them, and srun answers
SIGTERM by killing every task at once (SIGKILL): the trainer may not get to save and requeue, least of all during
start-up. So the batch shell traps the signal, lets srun return, and then runs this, which requeues the job
(trainer.resilience.requeue: at most once per allocation, never after `llm-train cancel`, within
slurm.max_requeues). When the trainer did save and requeue, its decision stands and this does nothing.
No torch here: it runs in the batch shell while SLURM's kill wait runs out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.config import load_config
from trainer.resilience.requeue import decided, requeue


def last_step(run_dir: Path) -> int:
    """The newest step in RUN_DIR/metrics.jsonl (0 when none): where the interrupted attempt had got to."""
    step = 0
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError, TypeError):
                continue  # a line cut by the kill
    except OSError:
        pass
    return step


def main(argv: list[str]) -> int:
    signal_name, config_arg, *overrides = argv
    config = load_config(config_arg, overrides)
    run_dir = Path(config.run.dir)
    if decided(run_dir):
        return 0  # the trainer (or a task's supervisor) has already decided for this allocation
    cause = f"{signal_name} reached srun, which ended every task at once; requeued by the batch script"
    requeued, why = requeue(run_dir, config.slurm.max_requeues, last_step(run_dir), signal_name, cause=cause)
    print(f"llm-train batch script: {signal_name} during the job; {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
