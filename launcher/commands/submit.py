"""`llm-train submit CONFIG [key=value ...] --cluster PROFILE [--nodes N] [--gpus-per-node G]
[--time HH:MM:SS] [--dry-run]`: queue a run on SLURM through submitit.

The SLURM job id is the last line of stdout, for scripts: `JOB=$(llm-train submit ... | tail -n 1)`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainer.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit", help="submit a run to SLURM (one task per GPU; saves, requeues and resumes on preemption)"
    )
    parser.add_argument("config", help="YAML config path or preset name (tiny, gpt2-124m, ...)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value config overrides, e.g. run.dir=/shared/runs/x"
    )
    parser.add_argument(
        "--cluster",
        required=True,
        metavar="PROFILE",
        help="cluster profile: a name in configs/clusters or a path",
    )
    parser.add_argument("--nodes", type=int, help="override the profile's node count")
    parser.add_argument(
        "--min-nodes",
        type=int,
        metavar="N",
        help="let an allocation (the first, or one after a requeue) start on as few as N nodes when no more are "
        "free; the global batch stays and the run resumes on the new world size (profile key min_nodes)",
    )
    parser.add_argument("--gpus-per-node", type=int, help="override the profile's GPUs (= tasks) per node")
    parser.add_argument(
        "--time",
        metavar="TIME",
        help="override the profile's time limit per allocation, in SLURM's formats: MM, MM:SS, HH:MM:SS, "
        "D-HH, D-HH:MM or D-HH:MM:SS",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write and print the sbatch script and batch plan; submit nothing",
    )
    parser.set_defaults(handler=run)


def _plan_text(config: Any, profile: Any) -> str:
    """The memory/time plan of the job (launcher/plan.py), when the profile names its GPU model."""
    if not profile.gpus_per_node or profile.gpu is None:
        return (
            "plan: set `gpu: NAME` (h100, a100-80gb, ...) in the cluster profile for a memory and time plan"
        )
    from launcher.plan import format_plan, plan_for_config

    plan, note = plan_for_config(config, profile.nodes, profile.gpus_per_node, profile.gpu)
    return "plan:\n" + format_plan(plan) + note


def _fit_warning(config: Any, profile: Any) -> str | None:
    """One line when the measured peak of the configured micro batch (`plan --measure`: one step on fake
    tensors, FSDP2 runs only) exceeds what a run may use of the profile's GPU; None when it fits or is unknown."""
    if not profile.gpus_per_node or profile.gpu is None or config.parallel.backend != "fsdp":
        return None
    from launcher.plan import plan_for_config, usable_bytes
    from launcher.plan_measure import NotMeasurable, measure_step

    plan, _ = plan_for_config(config, profile.nodes, profile.gpus_per_node, profile.gpu)
    world = profile.nodes * profile.gpus_per_node
    try:
        step = measure_step(
            config, plan.vocab_size, plan.seq_len, world, profile.gpus_per_node, plan.shard_group
        )
    except NotMeasurable:
        return None  # a mixture of experts' routing: the plan's formula is all there is
    room = usable_bytes(profile.gpu)
    if step.peak <= room:
        return None
    return (
        f"warning: the measured peak of one step at train.micro_batch_size={step.micro_batch_size} is "
        f"{step.peak / 1e9:.1f} GB, over the {room / 1e9:.1f} GB a run may use of a {profile.gpu}: it would run out "
        "of memory; lower the micro batch (llm-train plan CONFIG --measure --max-micro-batch finds the largest)"
    )


def run(args: argparse.Namespace) -> int:
    from launcher import slurm_job, slurm_query
    from launcher.profiles import format_time, load_profile, with_overrides

    profile = with_overrides(
        load_profile(args.cluster), args.nodes, args.gpus_per_node, args.time, min_nodes=args.min_nodes
    )
    slurm_job.check_run_dir_given(args.config, args.overrides)
    if not args.dry_run:  # a dry run may describe another cluster than this one
        known = slurm_query.partition_exists(profile.partition)
        if known is False:
            listed = ", ".join(slurm_query.partitions()) or "none"
            raise UserError(
                f"partition '{profile.partition}' (cluster profile {profile.name}) does not exist on this "
                f"cluster; sinfo lists: {listed}"
            )
        slurm_job.check_fits(profile, slurm_query.partition_size(profile.partition))
    sub = slurm_job.prepare(args.config, args.overrides, profile)
    if not args.dry_run:  # the dry run's paths are for the cluster it describes
        slurm_job.check_visible_to_nodes(sub.config)
    layout = (
        f"{profile.sbatch_nodes} node(s) x {profile.tasks_per_node} task(s) "
        f"({f'{profile.gpus_per_node} GPUs per node' if profile.gpus_per_node else 'CPU, one task per node'})"
    )
    if args.dry_run:
        path, script = slurm_job.dry_run(sub)
        print(script)
        print(f"batch plan: {sub.plan.describe()}")
        print(f"layout: {layout}, partition {profile.partition}, time {format_time(profile.time_s)}")
        print(_plan_text(sub.config, profile))
        if warning := _fit_warning(sub.config, profile):
            print(warning, file=sys.stderr)
        print(f"dry run: sbatch script written to {path}; nothing submitted")
        return 0

    for job in slurm_job.read_jobs(sub.run_dir):
        info = slurm_query.query_job(job["job_id"])
        if info.active:
            raise UserError(
                f"run.dir '{sub.run_dir}' already has job {info.job_id} ({info.state}); wait for it to end "
                f"or stop it with `llm-train cancel {sub.run_dir}`"
            )
    if warning := _fit_warning(sub.config, profile):
        print(warning, file=sys.stderr)
    job_id = slurm_job.submit(sub, args.config, args.overrides)
    print(f"batch plan: {sub.plan.describe()}")
    print(f"layout: {layout}, partition {profile.partition}, time {format_time(profile.time_s)}")
    print(f"run dir: {sub.run_dir} (job logs in {sub.folder}, progress: llm-train status {sub.run_dir})")
    print(f"submitted job {job_id}")
    print(job_id)
    return 0
