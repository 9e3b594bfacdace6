"""Each rank's liveness and current phase, so that the ranks left behind can name a lost or stalled one.

A collective that fails says little: gloo reports a closed socket or a timeout, NCCL a watchdog timeout,
neither says which rank went missing. So every rank runs a daemon thread that writes
RUN_DIR/heartbeats/node-NNNNN/rankNNNNN.json every `interval_s` seconds (a folder per node: on a parallel
filesystem, renames in one folder by every rank of a large job contend for that folder's lock): its phase ("forward/backward",
"step report all-reduce", "checkpoint save", ...), the step, since when, its pid and host. The training
thread only sets attributes when the phase changes. When a collective fails, `diagnose` reads the
others' files: a rank whose heartbeat stopped is lost (killed, crashed, node down); a rank still beating
but not where this one is (an earlier phase or step) is the one that stalled.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_text
from trainer.errors import PEER_FAILED_EXIT

log = logging.getLogger(__name__)

FOLDER = "heartbeats"
STALE_INTERVALS = 2.5  # a heartbeat older than this many intervals means the rank is gone


def current_attempt() -> str | None:
    """This allocation of a SLURM job, "JOB.RESTART" (None outside SLURM). A heartbeat carries it, so that a
    requeued attempt never names its cause from a file the killed attempt left behind."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT') or '0'}" if job else None


def heartbeat_interval(timeout_s: float) -> float:
    """Often enough to tell a dead rank well inside the collective timeout, rarely enough to cost nothing."""
    return max(0.5, min(5.0, timeout_s / 10))


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int, world_size: int, interval_s: float, node: int = 0) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / FOLDER / f"node-{node:05d}"
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.phase, self.step, self.since = "start-up", 0, time.time()
        self.failure: str | None = None
        """Why this rank's training failed, in one line; its last record carries it (`close`)."""
        self.peer_failed = False
        """Whether it failed because another rank did (a collective broke): then it is never the cause."""
        self._host, self._pid, self._attempt = socket.gethostname(), os.getpid(), current_attempt()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by enter(urgent=True): write now
        self._writing = threading.Lock()  # the thread and close() share the temporary file
        self._thread: threading.Thread | None = None
        if world_size > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._beat()
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()

    def enter(self, phase: str, step: int | None = None, urgent: bool = False) -> None:
        """This rank is now in `phase` (of `step`, if given); `urgent`: the background thread writes it now,
        not at its next interval (a phase in which ranks die, for the cause to name it)."""
        self.phase, self.since = phase, time.time()
        if step is not None:
            self.step = step
        if urgent:
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)
            self._thread = None
            failure = {"error": self.failure, "peer_failed": self.peer_failed} if self.failure else {}
            self._write({"exited": True, **failure})

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._beat()
            except OSError as error:  # a full or vanished run folder must not kill training
                log.debug("heartbeat not written: %s", error)

    def _beat(self) -> None:
        self._write({})

    def _write(self, extra: dict[str, Any]) -> None:
        record = {
            "rank": self.rank,
            "phase": self.phase,
            "step": self.step,
            "since": self.since,
            "time": time.time(),
            "pid": self._pid,
            "host": self._host,
            "attempt": self._attempt,
            "interval_s": self.interval_s,
            **extra,
        }
        path = self.folder / f"rank{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        with self._writing:
            tmp.write_text(json.dumps(record))
            tmp.replace(path)

    def _read(self, rank: int) -> dict[str, Any] | None:
        return read_heartbeat(self.run_dir, rank)

    def diagnose(self, max_wait_s: float | None = None) -> str:
        """Which other ranks are lost or behind, in one line. Waits until a lost rank's heartbeat is stale."""
        if self.world_size == 1:
            return "single process"
        deadline = time.time() + (
            max_wait_s if max_wait_s is not None else STALE_INTERVALS * self.interval_s + 1
        )
        while True:
            findings = self._findings()
            if any(kind == "lost" for kind, _ in findings) or time.time() >= deadline:
                break
            time.sleep(self.interval_s / 2)
        culprits = [text for kind, text in findings if kind in ("lost", "behind")]
        if culprits:
            return "; ".join(culprits)
        return (
            f"every rank reached '{self.phase}' of step {self.step}: the collective itself failed "
            "(network, NCCL/gloo) rather than a rank"
        )

    def _findings(self) -> list[tuple[str, str]]:
        now, findings = time.time(), []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            record = self._read(rank)
            if record is None:
                findings.append(
                    ("lost", f"rank {rank} never reported (no heartbeat in {self.run_dir / FOLDER})")
                )
                continue
            where = f"'{record['phase']}' of step {record['step']}"
            age, in_phase = now - record["time"], now - record["since"]
            if record.get("exited") or age > STALE_INTERVALS * self.interval_s or not _alive(record):
                findings.append(
                    (
                        "lost",
                        f"rank {rank} is lost (pid {record['pid']} on {record['host']}, "
                        f"last heartbeat {age:.0f} s ago, in {where})",
                    )  # fmt: skip
                )
            elif (record["step"], record["phase"]) != (self.step, self.phase):
                findings.append(
                    (
                        "behind",
                        f"rank {rank} stalled in {where} for {in_phase:.0f} s (this rank waits in "
                        f"'{self.phase}' of step {self.step})",
                    )  # fmt: skip
                )
            else:
                findings.append(("same", f"rank {rank} in {where}"))
        return findings


def read_heartbeat(run_dir: Path, rank: int) -> dict[str, Any] | None:
    """A rank's last heartbeat record in this attempt, or None when it wrote none (or a single-process run).
    Its node's folder is not known to the reader: the newest of this attempt's records in any of them."""
    name = f"rank{rank:05d}.json"
    paths = [*(run_dir / FOLDER).glob(f"node-*/{name}"), run_dir / FOLDER / name]
    records = [record for record in map(_read_this_attempts, paths) if record is not None]
    return max(records, key=lambda record: record.get("time", 0.0), default=None)


def _read_this_attempts(path: Path) -> dict[str, Any] | None:
    """The JSON record at `path` when the current attempt wrote it (an earlier attempt's names nothing)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("attempt") == current_attempt() else None


def _alive(record: dict[str, Any]) -> bool:
    """False when the rank ran on this host and its process is gone; True when unknown."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _exit_path(run_dir: Path, rank: int) -> Path:
    return run_dir / FOLDER / f"rank{rank:05d}.exit.json"


def record_exit(run_dir: Path, rank: int, code: int) -> None:
    """The supervisor's note that its trainer exited with `code` now (see `first_stopped`)."""
    path = _exit_path(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "code": code, "time": time.time(), "attempt": current_attempt()}
        atomic_write_text(path, json.dumps(record))
    except OSError as error:
        log.debug("exit of rank %d not recorded: %s", rank, error)


def first_stopped(run_dir: Path) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None] | None:
    """The rank of this attempt that stopped first: (rank, its last heartbeat, its exit record or None).

    A rank has stopped when its supervisor recorded its exit (then: at that time) or when its heartbeat went
    stale (then: at its last beat, e.g. a node that went down); a rank still beating has not. With NCCL the
    survivors of a lost rank die by SIGABRT too, after the collective timeout: the rank that stopped first
    is the cause, whichever task looks. A rank that failed because another did (its collective broke: exit 3,
    `peer_failed` in its last heartbeat) is never the cause. None when no rank of this attempt has stopped.
    """
    now, stopped = time.time(), []
    pattern = "rank[0-9][0-9][0-9][0-9][0-9]*.json"
    paths = [*(run_dir / FOLDER).glob(pattern), *(run_dir / FOLDER).glob(f"node-*/{pattern}")]
    ranks = {int(path.name[4:9]) for path in paths}
    for rank in sorted(ranks):
        beat, ended = read_heartbeat(run_dir, rank), _read_exit(run_dir, rank)
        if (beat or {}).get("peer_failed") or (ended or {}).get("code") == PEER_FAILED_EXIT:
            continue
        if ended is not None:
            stopped.append((ended["time"], rank, beat, ended))
        elif beat is not None and (
            beat.get("exited") or now - beat["time"] > STALE_INTERVALS * beat.get("interval_s", 5.0)
        ):
            stopped.append((beat["time"], rank, beat, None))
    if not stopped:
        return None
    _, rank, beat, ended = min(stopped, key=lambda entry: entry[:2])
    return rank, beat, ended


def _read_exit(run_dir: Path, rank: int) -> dict[str, Any] | None:
    return _read_this_attempts(_exit_path(run_dir, rank))
