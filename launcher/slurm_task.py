"""What each task of a submitted job runs (submitit unpickles and calls `run_task` on the compute node).

The task is the supervisor of one training process (trainer/resilience/supervisor.py): it decides about the
requeue after the trainer has exited, whatever ended it. submitit's job process installs its own SIGUSR2
handler (checkpoint and `scontrol requeue`) and a SIGTERM handler; the trainer must be the only one that reacts
(it saves first and counts requeues; a second requeue by submitit would restart the job twice), so the
supervisor replaces them before anything else and passes the signals on to the trainer.
"""

from __future__ import annotations


def run_task(trainer_args: list[str]) -> int:
    """One SLURM task: train in a supervised child process; rank and world size come from SLURM's variables."""
    from trainer.resilience.supervisor import supervise

    code = supervise(trainer_args)
    if code:
        raise SystemExit(code)  # keeps the trainer's exit code (2: user error) as the task's
    return code
