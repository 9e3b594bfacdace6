"""A run as a SLURM job, on the login node: validate, write the sbatch script through submitit, submit,
and keep the job ids in RUN_DIR/jobs.json.

submitit pickles a call of `launcher.slurm_task.run_task` (what each task runs); srun starts one task per
GPU, or one per node on a CPU cluster. The job runs the resolved config that submit wrote to
RUN_DIR/config.yaml, with absolute paths, so that a requeued job computes exactly what was validated even
if the YAML file or a preset changes meanwhile.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from launcher.profiles import ClusterProfile, format_time
from launcher.slurm_query import PartitionSize
from launcher.slurm_task import run_task
from trainer.atomic import atomic_write_text
from trainer.config import (
    CONFIGS_DIR,
    BatchPlan,
    Config,
    batch_plan,
    load_config,
    resolve_config_path,
    to_yaml,
)
from trainer.errors import UserError

SUBMITIT_DIR = "submitit"
JOBS_FILE = "jobs.json"
DRY_RUN_SCRIPT = "dry_run.sbatch"
MAX_SIGNAL_LEAD_S = 65535  # sbatch --signal's limit


@dataclass(frozen=True)
class Submission:
    """Everything checked on the login node before a job is queued."""

    config: Config
    profile: ClusterProfile
    plan: BatchPlan

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.dir)

    @property
    def folder(self) -> Path:
        return self.run_dir / SUBMITIT_DIR

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"


def _absolute(value: str | None) -> str | None:
    """An absolute path as the user wrote it (symlinks kept: they may resolve differently on compute nodes);
    a URL as it is."""
    return value if value is None or "://" in value else os.path.abspath(os.path.expanduser(value))


def _with_absolute_paths(config: Config) -> Config:
    """Paths resolved against the submit directory: the job may start anywhere."""
    streams = [replace(s, path=_absolute(s.path), remote=_absolute(s.remote)) for s in config.data.streams]
    data = replace(
        config.data, path=_absolute(config.data.path), remote=_absolute(config.data.remote), streams=streams
    )
    checkpoint = config.checkpoint
    if checkpoint.resume not in ("auto", "none"):
        checkpoint = replace(checkpoint, resume=_absolute(checkpoint.resume))
    model = config.model
    if model.init_from and Path(model.init_from).expanduser().exists():
        model = replace(model, init_from=_absolute(model.init_from))
    run = replace(config.run, dir=_absolute(config.run.dir))
    return replace(config, run=run, data=data, checkpoint=checkpoint, model=model)


def prepare(config_arg: str, overrides: list[str], profile: ClusterProfile) -> Submission:
    """Resolve and validate the run config for this profile: a bad config never reaches the queue."""
    from trainer.checkpoint.compatibility import resume_conflicts  # torch: not for `llm-train --help`
    from trainer.data.dataset_info import read_dataset_info
    from trainer.data.mixture import check_mixture

    config = _with_absolute_paths(load_config(config_arg, overrides))
    conflicts = resume_conflicts(config, Path(config.run.dir))
    if conflicts:
        raise UserError(conflicts[0])
    info = read_dataset_info(config.data.path, config.data.remote)
    check_mixture(config.data, info)
    plans = []
    for nodes in reversed(profile.node_counts):  # every world size an allocation may have must divide
        world_size = nodes * profile.tasks_per_node
        try:
            plans.append(batch_plan(config.train, world_size, info.seq_len))
        except UserError as error:
            raise UserError(
                f"{error} (world size {world_size} = {nodes} nodes x {profile.tasks_per_node} tasks per node; "
                f"change --nodes{', --min-nodes' if profile.min_nodes else ''} or the batch sizes)"
            ) from error
    plan = plans[0]  # the full allocation's
    lead = config.slurm.signal_lead_s
    if not 0 < lead <= MAX_SIGNAL_LEAD_S:
        raise UserError(f"slurm.signal_lead_s={lead} must be between 1 and {MAX_SIGNAL_LEAD_S} seconds")
    if lead >= profile.time_s:
        raise UserError(
            f"slurm.signal_lead_s={lead} is not shorter than the time limit {format_time(profile.time_s)}; "
            "lower slurm.signal_lead_s or raise --time"
        )
    return Submission(config, profile, plan)


def check_visible_to_nodes(config: Config) -> None:
    """Refuse paths the compute nodes cannot see (launcher/node_local.py), naming the first."""
    from launcher.node_local import node_local_paths

    found = node_local_paths(config)
    if found:
        key, path, reason = found[0]
        name = f"{key} ({path})" if " " in key else f"{key}='{path}'"
        raise UserError(
            f"{name} is {reason}: the job's nodes cannot see it; put it on a filesystem shared "
            "with the compute nodes (home, project or scratch)"
        )


def check_run_dir_given(config_arg: str, overrides: list[str]) -> None:
    """A submitted run names its folder: a preset's run.dir (runs/tiny) would mix every run made from it."""
    if any(item.split("=", 1)[0].strip() == "run.dir" for item in overrides):
        return
    if resolve_config_path(config_arg).resolve().is_relative_to(CONFIGS_DIR.resolve()):
        raise UserError(
            f"submit needs a run.dir of its own: the preset '{config_arg}' would write into its default "
            "folder; add run.dir=/shared/runs/NAME (a folder the compute nodes see)"
        )


def check_fits(profile: ClusterProfile, size: PartitionSize | None) -> None:
    """Refuse a layout the partition can never run (it would wait in the queue forever)."""
    if size is None:
        return
    if profile.nodes > size.nodes:
        raise UserError(
            f"--nodes {profile.nodes}: partition '{profile.partition}' has {size.nodes} node(s); "
            f"use --nodes {size.nodes} or fewer, or another partition"
        )
    if profile.gpus_per_node > size.max_gpus_per_node:
        raise UserError(
            f"--gpus-per-node {profile.gpus_per_node}: the nodes of partition '{profile.partition}' have at most "
            f"{size.max_gpus_per_node} GPU(s); use --gpus-per-node {size.max_gpus_per_node} or another partition"
        )


def stop_watch_lines(python: str, trainer_args: str) -> tuple[list[str], list[str]]:
    """The batch script's lines before and after srun for SIGTERM: srun kills every task on it, so a watcher
    in the batch step requeues the job when the trainer could not (trainer/resilience/stopped_job.py)."""
    before = [
        "# SIGTERM (scancel, preemption) makes srun kill every task at once: requeue if the trainer cannot",
        f"{python} -m trainer.resilience.stopped_job {trainer_args} &",
        "LLM_TRAIN_STOP_WATCH=$!",
        "trap 'true' TERM  # this shell lives on to end the watcher once srun has returned",
    ]
    after = [
        "LLM_TRAIN_STATUS=$?  # srun's: the job's exit status stays the trainer's",
        'kill -KILL "$LLM_TRAIN_STOP_WATCH" 2>/dev/null  # not TERM: that is what it watches for',
        'exit "$LLM_TRAIN_STATUS"',
    ]
    return before, after


def _task_layout(profile: ClusterProfile) -> dict[str, Any]:
    """Tasks and CPUs: per task in sbatch; with a node range (min_nodes), per node in sbatch and per task in srun.

    sbatch --ntasks-per-node with --nodes=MIN-MAX makes the job's task count MIN x that, and SLURM then allocates
    MIN nodes however many are free. So a ranged job asks sbatch for one task per node holding all of the node's
    CPUs (SLURM then gives it as many nodes as are free, up to MAX), and srun starts the node's tasks."""
    if not profile.min_nodes:
        return {"ntasks_per_node": profile.tasks_per_node, "cpus_per_task": profile.cpus_per_task}
    cpus = profile.cpus_per_task or 1
    return {
        "cpus_per_task": cpus * profile.tasks_per_node,
        "srun_args": ["--ntasks-per-node", str(profile.tasks_per_node), "--cpus-per-task", str(cpus)],
    }


def sbatch_parameters(sub: Submission) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (sbatch's names) for this submission."""
    profile = sub.profile
    setup = [
        f"# each task trains: trainer.main {shlex.quote(str(sub.config_path))} (launcher.slurm_task.run_task)",
        f"# time limit {format_time(profile.time_s)}; SIGUSR2 {sub.config.slurm.signal_lead_s} s before it: "
        "save, requeue, resume",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-"
        + (str(profile.cpus_per_task or 1) if profile.min_nodes else "${SLURM_CPUS_PER_TASK:-1}")
        + "}",
        *profile.setup,
    ]
    watch, teardown = stop_watch_lines(shlex.quote(sys.executable), shlex.quote(str(sub.config_path)))
    setup += watch
    mem = None  # SLURM's default
    if profile.mem_gb == 0:
        mem = "0"  # all of each node's memory
    elif profile.mem_gb is not None:
        whole = profile.mem_gb == int(profile.mem_gb)
        mem = f"{int(profile.mem_gb)}GB" if whole else f"{int(profile.mem_gb * 1024)}MB"
    return {
        "job_name": sub.config.run.name or sub.run_dir.name,
        "partition": profile.partition,
        "account": profile.account,
        "qos": profile.qos,
        "constraint": profile.constraint,
        "nodes": profile.nodes,  # submitit counts its tasks from it: the range goes in additional_parameters
        **_task_layout(profile),
        "gpus_per_node": profile.gpus_per_node or None,
        "mem": mem,
        "time": math.ceil(profile.time_s / 60),  # SLURM counts whole minutes
        "signal_delay_s": sub.config.slurm.signal_lead_s,
        "setup": setup,
        "teardown": teardown,
        "wckey": None,
        "additional_parameters": {"requeue": True, "nodes": profile.sbatch_nodes, **profile.sbatch_extra},
    }


def submitit_command(folder: Path, python: str | None = None) -> str:
    """The command submitit puts after srun (the same string SlurmExecutor builds)."""
    python = python or shlex.quote(sys.executable)
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(sub: Submission) -> str:
    """The sbatch script that `submit` would queue (submitit's own template and parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(
        command=submitit_command(sub.folder), folder=sub.folder, **sbatch_parameters(sub)
    )


def dry_run(sub: Submission) -> tuple[Path, str]:
    """Write the sbatch script to RUN_DIR/submitit/dry_run.sbatch; nothing is submitted."""
    script = sbatch_script(sub)
    sub.folder.mkdir(parents=True, exist_ok=True)
    path = sub.folder / DRY_RUN_SCRIPT
    atomic_write_text(path, script)
    return path, script


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / JOBS_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["jobs"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"'{path}' is unreadable ({error}); move it away to start afresh") from error


def mark_cancelled(run_dir: Path, job_id: str) -> None:
    """Note in jobs.json that `llm-train cancel` ended this job (SLURM forgets it soon after)."""
    jobs = read_jobs(run_dir)
    for job in jobs:
        if str(job["job_id"]) == job_id:
            job["cancelled"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(run_dir / JOBS_FILE, json.dumps({"jobs": jobs}, indent=1))


def _record_job(sub: Submission, job_id: str, overrides: list[str], config_arg: str) -> None:
    jobs = read_jobs(sub.run_dir)
    jobs.append(
        {
            "job_id": job_id,
            "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "profile": sub.profile.name,
            "partition": sub.profile.partition,
            "nodes": sub.profile.nodes,
            **({"min_nodes": sub.profile.min_nodes} if sub.profile.min_nodes else {}),
            "tasks_per_node": sub.profile.tasks_per_node,
            "gpus_per_node": sub.profile.gpus_per_node,
            "world_size": sub.profile.world_size,
            "time": format_time(sub.profile.time_s),
            "config": config_arg,
            "overrides": overrides,
        }
    )
    atomic_write_text(sub.run_dir / JOBS_FILE, json.dumps({"jobs": jobs}, indent=1))


def submit(sub: Submission, config_arg: str, overrides: list[str]) -> str:
    """Write RUN_DIR/config.yaml, queue the job through submitit, record it in RUN_DIR/jobs.json."""
    import submitit

    sub.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sub.config_path, to_yaml(sub.config))
    executor = submitit.SlurmExecutor(folder=sub.folder)
    executor.update_parameters(**sbatch_parameters(sub))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; we say it once
            job = executor.submit(run_task, [str(sub.config_path)])
    except (submitit.core.utils.FailedJobError, OSError) as error:
        lines = [line for line in str(error).splitlines() if "error" in line.lower()] or [str(error)]
        raise UserError(f"sbatch refused the job: {lines[-1].strip()}") from error
    _record_job(sub, str(job.job_id), overrides, config_arg)
    return str(job.job_id)
