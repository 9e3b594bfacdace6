"""`llm-train cancel RUN_DIR`: stop the run's SLURM job for good (checkpoints stay; resubmit to go on).

A marker in RUN_DIR tells the trainer, before SLURM's SIGTERM arrives, that this stop is not a preemption: it
saves a checkpoint, writes a `cancelled` event and exits 0 without asking for a requeue.
"""

from __future__ import annotations

import argparse

from trainer.atomic import atomic_write_text
from trainer.errors import UserError
from trainer.resilience.requeue import cancel_marker


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cancel", help="cancel the run's SLURM job")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's run.dir")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.run_status import check_run_dir
    from launcher.slurm_job import JOBS_FILE, mark_cancelled, read_jobs
    from launcher.slurm_query import cancel_job, query_job

    run_dir = check_run_dir(args.run_dir)
    jobs = read_jobs(run_dir)
    if not jobs:
        raise UserError(
            f"'{run_dir}' has no SLURM job ({JOBS_FILE} is missing): it was not started by submit"
        )
    active = [info for info in (query_job(str(job["job_id"])) for job in jobs) if info.active]
    if not active:
        print(f"nothing to cancel: job {jobs[-1]['job_id']} of {run_dir} is not pending or running")
        return 0
    for info in active:
        atomic_write_text(cancel_marker(run_dir, info.job_id), "llm-train cancel\n")
        problem = cancel_job(info.job_id)
        if problem:
            raise UserError(f"could not cancel job {info.job_id}: {problem}")
        mark_cancelled(run_dir, info.job_id)
        print(f"cancelled job {info.job_id} ({info.state}); resume later with the same `llm-train submit`")
    return 0
