"""One SLURM task = this supervisor + one training process: the requeue is decided outside the trainer.

On NCCL a lost or stalled peer ends in the watchdog's `abort()` (SIGABRT), the kernel's OOM killer sends
SIGKILL, a segfault is SIGSEGV: in none of them does the trainer's Python get to say "requeue me". So each
task runs `python -m trainer.main` as a child and decides when it has exited:

  exit 0                finished, or preempted and already requeued by rank 0 after its checkpoint: nothing
  exit 2                a user error: never requeued (the decision is recorded, so no other task requeues)
  exit 1, or a signal   this rank failed: name it from its heartbeat, requeue while slurm.max_requeues remain
  exit 3                a collective failed because another rank did (PEER_FAILED_EXIT): wait a little for
                        that rank's task to decide (it may be a user error), then requeue if nobody has decided
  SIGABRT after another rank stopped    NCCL's watchdog ended a survivor (TORCH_NCCL_ASYNC_ERROR_HANDLING):
                        as exit 3, and the cause recorded is the rank that stopped first (heartbeat.first_stopped)

Every decision claims RUN_DIR/.requeue-JOB-RESTART (created at most once, with its decision in it: requeue.py), so one allocation requeues at
most once whichever tasks survive. Stop signals (SIGUSR2, SIGTERM) are passed to the child, which starts with
them blocked and unblocks them once its handlers are installed (StopSignals): a signal during start-up waits in
the kernel instead of killing the process or being lost. The NCCL settings below are set unless the site's
environment already has them.

    srun python -m trainer.resilience.supervisor CONFIG [key=value ...]
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType

from trainer.errors import PEER_FAILED_EXIT, UserError
from trainer.resilience.failure_record import this_attempts_failure
from trainer.resilience.heartbeat import first_stopped, read_heartbeat, record_exit
from trainer.resilience.requeue import STOP_SIGNALS, cancelled, decided, decision, record_decision, requeue

PEER_DECISION_WAIT_S = 15.0
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)

NCCL_DEFAULTS = {
    # A failed or timed-out collective tears the process down (abort) instead of hanging the job.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Flight recorder: on a timeout each rank dumps its last collectives (which rank stopped where).
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    # NCCL's own warnings (a lost peer, a bad network interface) in the task logs, without its info flood.
    "NCCL_DEBUG": "WARN",
}
FLIGHT_RECORDER_SIZE = "2000"


def flight_recorder_variables() -> tuple[str, str]:
    """The names of the flight recorder's buffer size and dump file: torch 2.7 renamed them (TORCH_FR_*)."""
    try:
        major, minor = (int(part) for part in version("torch").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        major, minor = 2, 7
    if (major, minor) >= (2, 7):
        return "TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE"
    return "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"


def child_environment(run_dir: Path | None) -> dict[str, str]:
    """This task's environment plus the NCCL defaults; the flight recorder dumps into RUN_DIR/nccl_traces/."""
    env = dict(os.environ)
    for key, value in NCCL_DEFAULTS.items():
        env.setdefault(key, value)
    buffer_size, dump_file = flight_recorder_variables()
    env.setdefault(buffer_size, FLIGHT_RECORDER_SIZE)
    if run_dir is not None and dump_file not in env:
        (run_dir / "nccl_traces").mkdir(parents=True, exist_ok=True)
        env[dump_file] = str(run_dir / "nccl_traces" / "rank_")
    return env


def run_child(command: list[str], env: dict[str, str], on_exit: Callable[[int], None] | None = None) -> int:
    """Run the trainer with stop signals blocked (it unblocks them), passing ours on; its exit status.
    `on_exit(code)` runs as soon as it has exited, before what it left behind is ended."""
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    earlier_children = set(_children())  # not the trainer's: never ended here (run_child may be embedded)
    adopt_orphans()
    try:
        child = subprocess.Popen(command, env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    code = child.wait()
    if on_exit is not None:
        on_exit(code)
    end_leftovers(spare=earlier_children)
    return code


def adopt_orphans() -> None:
    """Become the child subreaper (Linux): whatever the trainer started (loader workers, W&B's service in its own
    session, a resource tracker) is reparented to this process when the trainer exits, so `end_leftovers` can end
    it and nothing of this attempt outlives it to hold a port or a file of the next. The trainer stays in the
    task's process group and session, where SLURM's process tracking and signals find it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_leftovers(spare: set[int] = frozenset()) -> None:
    """Kill and reap every remaining descendant of this process (the trainer has exited) but `spare`, the
    children this process had before it started the trainer."""
    while True:
        children = [pid for pid in _children() if pid not in spare]
        if not children:
            return
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _children() -> list[int]:
    me = os.getpid()
    return [pid for pid, parent in _parents().items() if parent == me]


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry.name}/stat") as stat:
                    parents[int(entry.name)] = int(stat.read().rsplit(")", 1)[1].split()[1])
    return parents


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def diagnose(run_dir: Path, rank: int, code: int) -> str:
    """One line naming this task's rank, how it ended, and where it was (its last heartbeat)."""
    record = read_heartbeat(run_dir, rank)
    where = (
        f" in '{record['phase']}' of step {record['step']} (pid {record['pid']} on {record['host']})"
        if record
        else f" on {socket.gethostname()} (no heartbeat)"
    )
    error = (record or {}).get("error") or this_attempts_failure(run_dir, rank)
    return f"rank {rank} {describe_exit(code)}{where}" + (f": {error}" if error else "")


def decide(run_dir: Path, rank: int, code: int, max_requeues: int) -> str | None:
    """Requeue or not after the trainer exited with `code`; returns a line to log, or None."""
    if code == 0:
        return None
    if code == 2:
        record_decision(run_dir, "user error: not requeued")
        return f"rank {rank} exited with a user error (exit 2): not requeueing"
    if cancelled(run_dir) or decision(run_dir).startswith("requeue after SIG"):
        return None  # the job is being stopped (cancel, or a preemption's requeue): SLURM ends every task
    first = first_stopped(run_dir)
    survivor = code in (PEER_FAILED_EXIT, -signal.SIGABRT) and first is not None and first[0] != rank
    if code == PEER_FAILED_EXIT or survivor:  # the rank that stopped first decides (it may be a user error)
        deadline = time.monotonic() + PEER_DECISION_WAIT_S
        while time.monotonic() < deadline and not decided(run_dir):
            time.sleep(0.5)
    if survivor:
        message = blame(first, rank, code)
        record = first[1] or {}
    else:
        message = diagnose(run_dir, rank, code)
        record = read_heartbeat(run_dir, rank) or {}
    _, why = requeue(run_dir, max_requeues, int(record.get("step", 0)), "failure", cause=message)
    return f"{message}; {why}"


def blame(first: tuple[int, dict | None, dict | None], rank: int, code: int) -> str:
    """One line naming the rank that stopped first (`first_stopped`) as the cause of this rank's end."""
    culprit, beat, ended = first
    how = describe_exit(ended["code"]) if ended else "stopped beating"
    where = (
        f" in '{beat['phase']}' of step {beat['step']} (pid {beat['pid']} on {beat['host']})" if beat else ""
    )
    error = f" ({beat['error']})" if beat and beat.get("error") else ""
    return f"rank {culprit} {how}{where}{error} first; rank {rank} {describe_exit(code)} after it"


def supervise(trainer_args: list[str]) -> int:
    """Run one task's trainer and decide about the requeue; returns the task's exit code (3 reads as 1)."""
    run_dir, max_requeues = _run_settings(trainer_args)
    rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))
    under_slurm = run_dir is not None and "SLURM_JOB_ID" in os.environ
    code = run_child(
        [sys.executable, "-m", "trainer.main", *trainer_args],
        child_environment(run_dir),
        on_exit=(lambda code: record_exit(run_dir, rank, code)) if under_slurm else None,
    )
    if under_slurm:
        line = decide(run_dir, rank, code, max_requeues)
        if line:
            _log(run_dir, rank, line)
    for sig in STOP_SIGNALS:  # the run is over: a late signal must not turn this task into a failure
        signal.signal(sig, signal.SIG_IGN)
    if code < 0:
        return 128 - code
    return 1 if code == PEER_FAILED_EXIT else code


def _run_settings(trainer_args: list[str]) -> tuple[Path | None, int]:
    """run.dir and slurm.max_requeues, or (None, 0) when the config does not load (the trainer will say why)."""
    from trainer.config import load_config

    try:
        config = load_config(trainer_args[0] if trainer_args else None, trainer_args[1:])
    except UserError:
        return None, 0
    return Path(config.run.dir), config.slurm.max_requeues


def _log(run_dir: Path, rank: int, line: str) -> None:
    """On stderr (the task's SLURM log) and appended to the rank's log file."""
    print(f"llm-train supervisor: {line}", file=sys.stderr, flush=True)
    try:
        with open(run_dir / "logs" / f"rank{rank}.log", "a") as log_file:
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor rank {rank}: {line}\n")
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))
