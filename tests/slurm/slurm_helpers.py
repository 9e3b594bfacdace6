"""Small helpers for tests against the local SLURM test cluster (slurm/cluster.sh).

No accounting is configured there (no sacct), so job state comes from `scontrol show job`, which keeps a
finished job for MinJobAge (60 s) before forgetting it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PARTITION = "debug"
NODES = ("node1", "node2")
# Where SLURM tests keep their files: jobs get a private /tmp on each node, so never under /tmp.
TMP_BASE = Path(os.environ.get("LLM_SLURM_TEST_TMP", "/var/tmp/llm-training-tests"))
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
TERMINAL_JOB_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "SPECIAL_EXIT",
}  # fmt: skip


def run(cmd: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command; a failure raises with its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def node_states(partition: str = PARTITION) -> dict[str, str]:
    """{node: state} of the partition's nodes; a trailing '*' means the node does not respond."""
    out = run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %T"], timeout=20).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def cluster_problem() -> str | None:
    """Why the local cluster cannot run the tests, or None when it can."""
    try:
        states = node_states()
    except FileNotFoundError:
        return "sinfo not found: SLURM is not installed"
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    except RuntimeError as err:
        return str(err)
    usable = [n for n, s in states.items() if s in USABLE_NODE_STATES]
    if len(usable) < len(NODES):
        shown = ", ".join(f"{n}={s}" for n, s in states.items()) or "no nodes"
        return f"partition {PARTITION!r} needs {len(NODES)} usable nodes, sinfo shows: {shown}"
    return None


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show ... -o` output (Key=Value pairs on one line) as a dict."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


@dataclass
class Job:
    job_id: str
    out: Path  # the batch step's stdout and stderr

    def info(self) -> dict[str, str] | None:
        """`scontrol show job` as a dict; None once the controller has forgotten the job."""
        proc = run(["scontrol", "show", "job", "-o", self.job_id], check=False)
        if proc.returncode != 0 or "JobState=" not in proc.stdout:
            return None
        return parse_scontrol(proc.stdout)

    def state(self) -> str | None:
        info = self.info()
        return info["JobState"] if info else None

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else f"(no output file {self.out})"

    def wait_state(self, states: set[str] | str, timeout: float) -> dict[str, str]:
        """Wait until the job is in one of `states`; raises (with the job's output) after `timeout` seconds."""
        states = {states} if isinstance(states, str) else states
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.info()
            if info and info["JobState"] in states:
                return info
            if info and info["JobState"] in TERMINAL_JOB_STATES - states:
                break
            time.sleep(0.5)
        raise AssertionError(
            f"job {self.job_id}: wanted state {sorted(states)}, got {info and info.get('JobState')} "
            f"(reason {info and info.get('Reason')}) after at most {timeout:.0f}s; output:\n{self.output()}"
        )

    def wait_finished(self, timeout: float = 90) -> dict[str, str]:
        """Wait for a terminal state; on timeout the job is cancelled and the error shows its output."""
        try:
            return self.wait_state(TERMINAL_JOB_STATES, timeout)
        except AssertionError:
            self.cancel()
            raise

    def cancel(self) -> None:
        run(["scancel", self.job_id], check=False)


def ends_with_newline(text: str) -> bool:
    """The default test of a complete file: jobs end what they write with a newline."""
    return text.endswith("\n")


def wait_for_file(
    path: Path, timeout: float, job: Job | None = None, complete: Callable[[str], bool] = ends_with_newline
) -> str:
    """Wait until `path` holds complete content (`complete(text)`) and return its text; raises (with the job's
    output) after `timeout`, or once the job has ended without writing it.

    Jobs write such files under a temporary name and rename them (atomic); waiting for complete content rather
    than for the name also catches a writer that does not, instead of returning half a file.
    """

    def read() -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None

    deadline = time.monotonic() + timeout
    text = None
    while time.monotonic() < deadline:
        text = read()
        if text is not None and complete(text):
            return text
        if job is not None and job.state() in TERMINAL_JOB_STATES:
            # The job may have written the file just before it ended, after the read above: look once more.
            text = read()
            if text is not None and complete(text):
                return text
            break
        time.sleep(0.2)
    seen = "did not appear" if text is None else f"is incomplete ({text!r})"
    detail = f" job {job.job_id} state {job.state()}; output:\n{job.output()}" if job else ""
    raise AssertionError(f"{path} {seen} after at most {timeout:.0f}s.{detail}")


def sbatch(script: str, workdir: Path, *options: str, name: str = "llm-test") -> Job:
    """Submit a batch script (text) from `workdir`; its output goes to workdir/slurm-<jobid>.out."""
    path = workdir / f"{name}.sbatch"
    path.write_text(script)
    out = workdir / "slurm-%j.out"
    proc = run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--chdir={workdir}",
            f"--output={out}",
            f"--partition={PARTITION}",
            *options,
            str(path),
        ]  # fmt: skip
    )
    job_id = proc.stdout.strip().split(";")[0]
    return Job(job_id, workdir / f"slurm-{job_id}.out")
