"""Goodput: how much of the allocated time went into training steps, and where the rest went.

Rank 0 of every process lifetime ("attempt") keeps a `GoodputClock` and writes its account to
RUN_DIR/goodput/attempt-<start_ns>-<pid>.json; `summarize` adds the attempts of a run up across requeues.
Pure Python without torch: the login-node `llm-train status` imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_text
from trainer.resilience.fault_cost import cost_by_fault
from trainer.resilience.requeue import requeue_events

CATEGORIES = ("startup", "productive", "data", "checkpoint", "eval", "nonfinite", "recomputed", "shutdown")
LEDGER_DIR = "goodput"
# What summarize() reports as lost, in this order. "restarts" is the start-up of every attempt after the
# first plus the shut-down of every attempt but the last: the price of being requeued.
LOST = ("startup", "restarts", "checkpoint", "data", "eval", "nonfinite", "recomputed", "shutdown")
OUTCOMES = ("running", "done", "preempted", "failed")

log = logging.getLogger(__name__)


def _process_start_time() -> float:
    """Wall time this process started, so that interpreter start-up and imports count as start-up."""
    try:
        import psutil  # a dependency of deepspeed; imported here to keep `status` light

        return float(psutil.Process().create_time())
    except Exception:  # no psutil, or a platform where it cannot tell: count from now
        return time.time()


class GoodputClock:
    """Rank 0's account of this attempt's wall time, as a partition of the timeline into categories.

    At any moment exactly one category is running; switching charges the elapsed time to the previous one,
    so the categories add up to the attempt's allocated time by construction. Elapsed time is measured with
    time.monotonic() from a wall-clock anchor taken once, so a clock step (NTP) cannot break that sum and
    "updated" is started + the time accounted.

    The record is rewritten atomically at each flush. A process killed without a chance to close (kill -9,
    a node failure) is only accounted up to its last flush: at most `flush_every_s` of its time is missing.
    """

    def __init__(
        self, run_dir: Path | None, started: float | None = None, flush_every_s: float = 10.0
    ) -> None:
        self._current = "startup"
        self._path: Path | None = None  # None: disabled (ranks other than 0) or closed
        if run_dir is None:
            return
        self._anchor_wall, self._anchor_mono = time.time(), time.monotonic()
        self._started = _process_start_time() if started is None else started
        self._path = Path(run_dir) / LEDGER_DIR / f"attempt-{int(self._started * 1e9)}-{os.getpid()}.json"
        self._flush_every_s = flush_every_s
        self._last_flush = self._since = self._anchor_mono
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        # The time between the process start and this constructor is start-up too.
        self.seconds["startup"] = max(self._anchor_wall - self._started, 0.0)
        self.productive_at: dict[int, float] = {}
        self.last_step: int | None = None
        self.resumed: int | None = None
        self.outcome = "running"
        self.job_id = os.environ.get("SLURM_JOB_ID")
        restarts = os.environ.get("SLURM_RESTART_COUNT", "")
        self.restart_count = int(restarts) if restarts.isdigit() else None
        self._write_failed = False

    def _charge(self) -> None:
        now = time.monotonic()
        self.seconds[self._current] += now - self._since
        self._since = now

    def switch(self, category: str) -> str:
        """Make `category` the running one; return the previous one."""
        if category not in CATEGORIES:
            raise ValueError(f"goodput category must be one of {', '.join(CATEGORIES)}, not {category!r}")
        if self._path is not None:
            self._charge()
        previous, self._current = self._current, category
        return previous

    @contextmanager
    def phase(self, category: str) -> Iterator[None]:
        """Charge the block to `category`, then go back to whatever ran before (phases nest)."""
        previous = self.switch(category)
        try:
            yield
        finally:
            self.switch(previous)

    def step_done(self, step: int) -> None:
        """Called every step: one monotonic compare unless a periodic flush is due."""
        if self._path is None:
            return
        self.last_step = step
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()

    def resumed_from(self, step: int | None) -> None:
        """This attempt loaded checkpoint `step` (None: a fresh start)."""
        if self._path is None:
            return
        self.resumed = step

    def checkpointed(self, step: int) -> None:
        """Checkpoint `step` is complete: remember how much productive time it holds, and flush."""
        if self._path is None:
            return
        self._charge()
        self.productive_at[step] = self.seconds["productive"]
        self.flush()

    def rolled_back(self, to_step: int) -> None:
        """Rollback to checkpoint `to_step` within this attempt: the steps after it are redone, so the
        productive time spent on them was wasted and becomes "recomputed"."""
        if self._path is None:
            return
        self._charge()
        kept = _productive_at(self.productive_at, to_step)
        wasted = max(self.seconds["productive"] - kept, 0.0)
        self.seconds["productive"] -= wasted
        self.seconds["recomputed"] += wasted
        self.productive_at = {step: s for step, s in self.productive_at.items() if step <= to_step}
        self.last_step = to_step

    def set_outcome(self, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"goodput outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        if self._path is not None:
            self.outcome = outcome

    def _record(self) -> dict[str, Any]:
        """The attempt record as flush() writes it (charges the running category up to now first)."""
        assert self._path is not None
        self._charge()
        return {
            "attempt_id": self._path.stem,
            "job_id": self.job_id,
            "restart_count": self.restart_count,
            "started": self._started,
            "updated": self._started + sum(self.seconds.values()),
            "outcome": self.outcome,
            "resumed_from": self.resumed,
            "last_step": self.last_step,
            "seconds": dict(self.seconds),
            "productive_at": {str(step): s for step, s in sorted(self.productive_at.items())},
        }

    def flush(self) -> None:
        """Rewrite the attempt record atomically. A failed write is logged once and never stops training."""
        if self._path is None:
            return
        text = json.dumps(self._record(), indent=1) + "\n"
        self._last_flush = time.monotonic()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._path, text)
        except OSError as error:
            if not self._write_failed:
                log.warning(
                    "goodput: cannot write %s (%s); the run's goodput will be incomplete", self._path, error
                )
            self._write_failed = True

    def close(self, outcome: str | None = None) -> None:
        """Account up to now, set `outcome` if given, flush, and stop: later calls do nothing."""
        if self._path is None:
            return
        if outcome is not None:
            self.set_outcome(outcome)
        self.flush()
        self._path = None


def _productive_at(productive_at: dict[int, float], step: int) -> float:
    """Productive seconds held by the newest recorded checkpoint at or before `step` (0 if none)."""
    recorded = [s for s in productive_at if s <= step]
    return productive_at[max(recorded)] if recorded else 0.0


def _read_attempt(path: Path) -> dict[str, Any] | None:
    """One attempt record with its numbers checked, or None if it is unreadable (the run goes on)."""
    try:
        raw = json.loads(path.read_text())
        seconds = raw["seconds"]
        restarts = raw.get("restart_count")
        return {
            "job_id": None if raw.get("job_id") is None else str(raw["job_id"]),
            "restart_count": None if restarts is None else int(restarts),
            "started": float(raw["started"]),
            "updated": float(raw["updated"]),
            "resumed_from": None if raw.get("resumed_from") is None else int(raw["resumed_from"]),
            "last_step": None if raw.get("last_step") is None else int(raw["last_step"]),
            "seconds": {category: float(seconds.get(category, 0.0)) for category in CATEGORIES},
            "productive_at": {int(step): float(s) for step, s in (raw.get("productive_at") or {}).items()},
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _redone(attempt: dict[str, Any], later: list[dict[str, Any]]) -> float:
    """Productive seconds of `attempt` spent on steps that a later attempt did again.

    A later attempt resuming from checkpoint R (a fresh start: R = 0) redoes every step after R, so the
    time this attempt spent on them was wasted.
    """
    if not later or attempt["last_step"] is None:
        return 0.0
    resume = min(a["resumed_from"] or 0 for a in later)
    if resume >= attempt["last_step"]:
        return 0.0
    productive = attempt["seconds"]["productive"]
    own = attempt["resumed_from"]
    if own is not None and resume < own:
        return productive
    return max(productive - _productive_at(attempt["productive_at"], resume), 0.0)


def summarize(run_dir: Path) -> dict[str, Any] | None:
    """Goodput of a run over all its attempts, or None when it has no attempt records.

    allocated_s is the sum of every attempt's updated - started; it equals productive_s + sum(lost_s)
    up to float rounding. Percentages are of allocated_s.
    """
    folder = Path(run_dir) / LEDGER_DIR
    attempts = [a for a in map(_read_attempt, sorted(folder.glob("attempt-*.json"))) if a is not None]
    if not attempts:
        return None
    attempts.sort(key=lambda a: a["started"])
    allocated = productive = 0.0
    lost = dict.fromkeys(LOST, 0.0)
    redone_by_attempt = [_redone(attempt, attempts[i + 1 :]) for i, attempt in enumerate(attempts)]
    for i, (attempt, redone) in enumerate(zip(attempts, redone_by_attempt, strict=True)):
        seconds = attempt["seconds"]
        allocated += attempt["updated"] - attempt["started"]
        productive += seconds["productive"] - redone
        lost["recomputed"] += seconds["recomputed"] + redone
        lost["startup" if i == 0 else "restarts"] += seconds["startup"]
        lost["shutdown" if i == len(attempts) - 1 else "restarts"] += seconds["shutdown"]
        for category in ("checkpoint", "data", "eval", "nonfinite"):
            lost[category] += seconds[category]

    def pct(value: float) -> float:
        return round(100.0 * value / allocated, 1) if allocated > 0 else 0.0

    return {
        "attempts": len(attempts),
        "allocated_s": allocated,
        "productive_s": productive,
        "goodput_pct": pct(productive),
        "lost_s": lost,
        "lost_pct": {category: pct(s) for category, s in lost.items()},
        "faults": cost_by_fault(attempts, redone_by_attempt, requeue_events(Path(run_dir))),
    }


def format_duration(seconds: float) -> str:
    """3m10s under an hour, 1h02m from an hour on."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_goodput(summary: dict[str, Any]) -> str:
    """One line: the productive share, then the lost categories that show, largest first."""
    attempts = summary["attempts"]
    line = (
        f"{summary['goodput_pct']:.1f}% of {format_duration(summary['allocated_s'])} allocated over "
        f"{attempts} attempt{'s' if attempts != 1 else ''} productive"
    )
    shown = sorted(((c, p) for c, p in summary["lost_pct"].items() if p > 0), key=lambda item: -item[1])
    if shown:
        line += "; lost: " + ", ".join(f"{category} {p:.1f}%" for category, p in shown)
    faults = summary.get("faults") or {}
    if faults:
        line += "; per fault: " + ", ".join(
            f"{kind} x{int(cost['count'])} {format_duration(cost['lost_s'])}"
            for kind, cost in sorted(faults.items(), key=lambda item: -item[1]["lost_s"])
        )
    return line
