"""Where a run stands, from its folder and SLURM: jobs, requeues, progress, checkpoints, ETA, goodput.

Everything comes from files the trainer and `submit` write (jobs.json, requeues.json, metrics.jsonl,
config.yaml, checkpoints/, goodput/) plus one SLURM query per job, so it works without accounting and for
jobs that SLURM has already forgotten.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.slurm_job import JOBS_FILE, read_jobs
from launcher.slurm_query import JobInfo, query_job
from trainer.config import SlurmConfig, TrainConfig
from trainer.errors import UserError
from trainer.resilience.failure_record import first_failure
from trainer.resilience.goodput import format_duration, format_goodput, summarize
from trainer.resilience.requeue import REQUEUES_FILE
from trainer.run_records import read_records

RUN_MARKERS = ("config.yaml", "metrics.jsonl", JOBS_FILE)
ETA_WINDOW = 20  # train lines


@dataclass
class Checkpoint:
    name: str
    valid: bool
    problem: str | None
    latest: bool


@dataclass
class RunStatus:
    run_dir: str
    state: str
    jobs: list[dict[str, Any]] = field(default_factory=list)
    requeues: int = 0
    max_requeues: int = SlurmConfig.max_requeues
    cap_reached: bool = False
    model: str | None = None
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    updated_s_ago: float | None = None
    s_per_step: float | None = None
    eta_s: float | None = None
    straggler: str | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    goodput: dict[str, Any] | None = (
        None  # trainer.resilience.goodput.summarize: allocated time and where it went
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_run_dir(path: str | Path) -> Path:
    run_dir = Path(path)
    if not run_dir.exists():
        raise UserError(f"'{path}' does not exist; pass the run.dir of a run (check the path)")
    if not run_dir.is_dir() or not any((run_dir / name).exists() for name in RUN_MARKERS):
        raise UserError(
            f"'{path}' is not a run folder (no {', '.join(RUN_MARKERS)}); pass the run.dir of a run"
        )
    return run_dir


def _run_settings(run_dir: Path) -> tuple[int, int]:
    """(last step the run trains to, slurm.max_requeues) from RUN_DIR/config.yaml."""
    train, slurm = TrainConfig(), SlurmConfig()
    path = run_dir / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else {}
        train_raw, slurm_raw = loaded.get("train") or {}, loaded.get("slurm") or {}
        max_steps = int(train_raw.get("max_steps", train.max_steps))
        stop_at = train_raw.get("stop_at_step")
        last = min(max_steps, int(stop_at)) if stop_at else max_steps
        return last, int(slurm_raw.get("max_requeues", slurm.max_requeues))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return train.max_steps, slurm.max_requeues


def _checkpoints(run_dir: Path, verify: bool) -> list[Checkpoint]:
    """Each step folder, newest first. By default from its manifest and the files' sizes, reading no checkpoint
    data (a login node must not read 50 GB per `status`); `verify` checksums every file as a resume does."""
    from trainer.checkpoint.steps import LATEST, step_folders, verify_step

    root = run_dir / "checkpoints"
    latest_file = root / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    found = []
    for folder in step_folders(root):
        _, problem = verify_step(folder, checksums=verify)
        found.append(Checkpoint(folder.name, problem is None, problem, folder.name == latest))
    return found


def _segment(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train lines since the last start of the trainer (queue waits and start-up excluded)."""
    start = max((i for i, r in enumerate(records) if r.get("event") == "start"), default=-1)
    return [r for r in records[start + 1 :] if "loss" in r and "time" in r]


def _seconds_per_step(lines: list[dict[str, Any]]) -> float | None:
    window = lines[-ETA_WINDOW:]
    if len(window) < 2 or window[-1]["step"] <= window[0]["step"]:
        return None
    return (window[-1]["time"] - window[0]["time"]) / (window[-1]["step"] - window[0]["step"])


def _overall_state(
    events: list[dict[str, Any]],
    job: dict[str, Any] | None,
    latest: JobInfo | None,
    requeues: int,
    max_requeues: int,
    failure: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """(one-line state, whether the requeue cap stopped the run)."""
    last = events[-1] if events else None
    at_step = f" at step {last['step']}" if last is not None else ""
    if latest is not None and latest.active:
        why = (
            f": {pending_reason(latest.reason)}"
            if latest.state == "PENDING" and pending_reason(latest.reason)
            else ""
        )
        if latest.state == "PENDING" and latest.restarts:
            return f"requeued, waiting to resume (restart {latest.restarts}){why}", False
        return f"{latest.state.lower()}{why}", False
    if last is not None and last["event"] == "done":
        return f"finished{at_step}", False
    if job is not None and job.get("cancelled"):
        return f"cancelled{at_step} (llm-train cancel, {job['cancelled']})", False
    if latest is not None and latest.state not in (None, "COMPLETED"):
        why = f": rank {failure['rank']}: {failure['error']}" if failure else ""
        return f"{latest.state.lower()}{at_step}{why}", False
    if last is not None and last["event"] == "preempted":
        if requeues >= max_requeues:
            return (
                f"stopped{at_step}: requeue cap reached (slurm.max_requeues={max_requeues}); "
                "resubmit to continue",
                True,
            )
        return f"stopped{at_step} by {last.get('signal', 'a signal')}, not requeued", False
    if latest is None:
        if last is not None and last["event"] in ("start", "resume", "checkpoint"):
            return f"not submitted to SLURM; last event '{last['event']}'{at_step}", False
        return ("not submitted to SLURM" if last is None else f"stopped{at_step}"), False
    if latest.source == "unavailable":
        return "unknown (SLURM commands not found on this machine)", False
    if latest.state is None and failure is not None and failure["time"] >= (last or {}).get("time", 0):
        return (
            f"failed{at_step} (no longer known to SLURM): rank {failure['rank']}: {failure['error']}",
            False,
        )
    if latest.state is None:
        detail = f"; last event '{last['event']}'{at_step}" if last is not None else ""
        return f"finished (no longer known to SLURM){detail}", False
    return f"job completed{at_step}", False


PENDING_REASONS = {
    "Priority": "other jobs have a higher priority",
    "Resources": "waiting for nodes to become free",
    "BeginTime": "waiting for its start time (SLURM delays a requeued job briefly)",
    "PartitionConfig": "the partition cannot run this layout (nodes, GPUs or time limit): resubmit with another",
    "PartitionNodeLimit": "more nodes than the partition allows per job: resubmit with fewer --nodes",
    "PartitionTimeLimit": "a time limit above the partition's: resubmit with a shorter --time",
    "ReqNodeNotAvail": "a required node is down or reserved",
    "QOSMaxGRESPerUser": "your QOS's GPU limit is reached by your other jobs",
    "AssocGrpGRES": "your account's GPU limit is reached",
    "JobHeldUser": "held by you (scontrol release JOBID)",
    "JobHeldAdmin": "held by an administrator",
    "Dependency": "waiting for another job",
}


def pending_reason(reason: str | None) -> str | None:
    """SLURM's pending reason code with what it means, e.g. 'Priority (other jobs have a higher priority)'."""
    if not reason or reason == "None":
        return None
    return f"{reason} ({PENDING_REASONS[reason]})" if reason in PENDING_REASONS else reason


def read_status(path: str | Path, verify: bool = False) -> RunStatus:
    run_dir = check_run_dir(path)
    checkpoints = _checkpoints(run_dir, verify)  # before the metrics: progress is never behind a checkpoint
    records = read_records(run_dir)
    events = [r for r in records if "event" in r]
    last_step, max_requeues = _run_settings(run_dir)
    requeue_file = run_dir / REQUEUES_FILE
    try:
        requeues = int(json.loads(requeue_file.read_text())["count"]) if requeue_file.is_file() else 0
    except (OSError, ValueError, KeyError, TypeError):
        requeues = 0
    infos = [(job, query_job(str(job["job_id"]))) for job in read_jobs(run_dir)]
    job, latest = infos[-1] if infos else (None, None)
    failure = first_failure(run_dir, str(latest.job_id) if latest is not None else None)
    state, cap_reached = _overall_state(events, job, latest, requeues, max_requeues, failure)
    status = RunStatus(
        run_dir=str(run_dir.resolve()),
        state=state,
        jobs=[{**job, **asdict(info), "describe": info.describe()} for job, info in infos],
        requeues=requeues,
        max_requeues=max_requeues,
        cap_reached=cap_reached,
        max_steps=last_step,
        checkpoints=checkpoints,
        goodput=summarize(run_dir),
    )
    start = next((r for r in reversed(events) if r["event"] == "start" and "model" in r), None)
    if start is not None:
        status.model = f"{start['model']}, {start.get('params', 0) / 1e6:.2f}M parameters"
    train_lines = [r for r in records if "loss" in r]
    if train_lines:
        newest = train_lines[-1]
        status.step, status.loss = newest["step"], newest["loss"]
        status.tokens_per_s = newest.get("tokens_per_s")
        if newest.get("slowest_rank") is not None:
            status.straggler = (
                f"rank {newest['slowest_rank']}, {newest['slowest_lag_s']:+.3f} s/step behind the median"
            )
        if "time" in newest:
            status.updated_s_ago = round(time.time() - newest["time"], 1)
    newest_checkpoint = next((int(c.name.split("_")[-1]) for c in checkpoints if c.valid), None)
    if newest_checkpoint is not None and (status.step is None or status.step < newest_checkpoint):
        status.step = newest_checkpoint  # its train line may not be logged (log.every_steps)
    status.s_per_step = _seconds_per_step(_segment(records))
    # An ETA only while training runs: a running job, or a local run still logging (not one that is held).
    live = latest.state == "RUNNING" if latest is not None else bool(events) and events[-1]["event"] != "done"
    if status.s_per_step is not None and status.step is not None and live:
        status.eta_s = round(max(last_step - status.step, 0) * status.s_per_step, 1)
    return status


def format_status(status: RunStatus) -> str:
    rows = [("run", status.run_dir), ("state", status.state)]
    if status.jobs:
        rows.append(("jobs", "; ".join(job["describe"] for job in reversed(status.jobs))))
    if status.model is not None:
        rows.append(("model", status.model))
    left = "no requeues left" if status.requeues >= status.max_requeues else "cap not reached"
    rows.append(("requeues", f"{status.requeues} of at most {status.max_requeues} ({left})"))
    if status.step is not None:
        progress = f"step {status.step}/{status.max_steps}"
        if status.loss is not None:
            progress += f", loss {status.loss:.4f}"
        if status.tokens_per_s is not None:
            progress += f", {status.tokens_per_s:,.0f} tokens/s"
        if status.updated_s_ago is not None:
            progress += f", last logged {format_duration(status.updated_s_ago)} ago"
        rows.append(("progress", progress))
    else:
        rows.append(("progress", f"no step logged yet (of {status.max_steps})"))
    if status.eta_s is not None:
        rows.append(
            ("eta", f"{format_duration(status.eta_s)} of training left ({status.s_per_step:.3f} s/step)")
        )
    if status.straggler is not None:
        rows.append(("slowest", status.straggler))
    if status.checkpoints:
        shown = [
            f"{c.name} {'ok' if c.valid else 'INVALID (' + str(c.problem) + ')'}{' (latest)' if c.latest else ''}"
            for c in status.checkpoints
        ]
        rows.append(("checkpoints", "; ".join(shown)))
    else:
        rows.append(("checkpoints", "none"))
    if status.goodput is not None:
        rows.append(("goodput", format_goodput(status.goodput)))
    width = max(len(key) for key, _ in rows) + 2
    return "\n".join(f"{key:<{width}}{value}" for key, value in rows)
