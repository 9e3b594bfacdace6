"""Ask SLURM about jobs and partitions, and cancel jobs, with its command-line clients.

Job state comes from `scontrol show job` (live jobs, with the restart count) and else from `sacct`,
which only works where accounting is configured; `scontrol` forgets a job MinJobAge seconds
(default 300, 60 on the test cluster) after it ends. Without SLURM installed every query answers
"unknown" instead of failing, so that `status` still works on a copy of a run folder.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

ACTIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
}  # fmt: skip
_TIMEOUT_S = 30


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str | None
    """SLURM's job state (RUNNING, COMPLETED, ...); None when SLURM does not know the job (any more)."""
    source: str
    """Where the state came from: scontrol | sacct | none (forgotten) | unavailable (no SLURM here)."""
    restarts: int | None = None
    run_time: str | None = None
    nodes: str | None = None
    reason: str | None = None
    exit_code: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def describe(self) -> str:
        if self.source == "unavailable":
            return f"{self.job_id} state unknown (SLURM commands not found here)"
        if self.state is None:
            return f"{self.job_id} finished (no longer known to SLURM)"
        parts = [f"{self.job_id} {self.state}"]
        if self.run_time:
            parts.append(f"for {self.run_time}")
        if self.nodes and self.nodes not in ("(null)", "None assigned"):
            parts.append(f"on {self.nodes}")
        if self.reason and self.reason != "None" and self.state == "PENDING":
            parts.append(f"({self.reason})")
        if self.restarts:
            parts.append(f"restarts {self.restarts}")
        if self.exit_code and self.state not in ACTIVE_STATES and self.exit_code != "0:0":
            parts.append(f"exit code {self.exit_code}")
        return " ".join(parts)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    """The finished command, or None when it is not installed or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show ... -o` output (Key=Value pairs on one line) as a dict."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def query_job(job_id: str) -> JobInfo:
    """The job's state from scontrol, else sacct, else 'no longer known'."""
    shown = _run(["scontrol", "show", "job", "-o", job_id])
    if shown is None and shutil.which("sacct") is None:
        return JobInfo(job_id, None, "unavailable")
    if shown is not None and shown.returncode == 0 and "JobState=" in shown.stdout:
        info = parse_scontrol(shown.stdout.splitlines()[0])
        restarts = info.get("Restarts", "")
        return JobInfo(
            job_id,
            info["JobState"],
            "scontrol",
            int(restarts) if restarts.isdigit() else None,
            info.get("RunTime"),
            info.get("NodeList"),
            info.get("Reason"),
            info.get("ExitCode"),
        )
    fields = "JobID,State,Elapsed,NodeList,ExitCode"
    acct = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", fields])
    if acct is not None and acct.returncode == 0:
        for line in acct.stdout.splitlines():
            values = line.split("|")
            if len(values) == 5 and values[0] == job_id:
                state = values[1].split()[0] if values[1] else None  # "CANCELLED by 0" -> CANCELLED
                return JobInfo(job_id, state, "sacct", None, values[2], values[3], None, values[4])
    return JobInfo(job_id, None, "none")


def cancel_job(job_id: str) -> str | None:
    """Cancel a job for good; returns scancel's complaint, or None on success.

    scancel sends SIGTERM first, which the trainer treats like a preemption: it saves and runs
    `scontrol requeue`, which SLURM grants even for a cancelled job. Marking the job not requeueable
    first makes that requeue fail, so a cancelled run stays cancelled (with its checkpoint if the
    save finished within KillWait).
    """
    if shutil.which("scancel") is None:
        return "scancel not found: run this on a SLURM login node"
    _run(["scontrol", "update", f"JobId={job_id}", "Requeue=0"])
    result = _run(["scancel", job_id])
    if result is None:
        return f"scancel {job_id} did not answer within {_TIMEOUT_S}s"
    if result.returncode != 0:
        return result.stderr.strip() or f"scancel {job_id} exited {result.returncode}"
    return None


def partition_exists(name: str) -> bool | None:
    """Whether sinfo lists the partition; None when sinfo is not available (not a login node)."""
    result = _run(["sinfo", "-h", "-p", name, "-o", "%P"])
    if result is None or result.returncode != 0:
        return None
    return bool(result.stdout.strip())


@dataclass(frozen=True)
class PartitionSize:
    nodes: int
    max_gpus_per_node: int


def parse_gpus(gres: str) -> int:
    """GPUs per node from sinfo's %G: 'gpu:8', 'gpu:a100:4(S:0-1),shard:8', '(null)' -> 8, 4, 0."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partition_size(name: str) -> PartitionSize | None:
    """How many nodes the partition has and the most GPUs one of them has; None when sinfo cannot say."""
    result = _run(["sinfo", "-h", "-p", name, "-o", "%D %G"])
    if result is None or result.returncode != 0 or not result.stdout.strip():
        return None
    nodes, gpus = 0, 0
    for line in result.stdout.splitlines():
        count, _, gres = line.strip().partition(" ")
        if count.isdigit():
            nodes += int(count)
            gpus = max(gpus, parse_gpus(gres.strip()))
    return PartitionSize(nodes, gpus)


def partitions() -> list[str]:
    result = _run(["sinfo", "-h", "-o", "%P"])
    if result is None or result.returncode != 0:
        return []
    return sorted({line.strip().rstrip("*") for line in result.stdout.splitlines() if line.strip()})
