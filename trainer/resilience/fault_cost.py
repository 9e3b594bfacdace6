"""What each kind of fault cost a run: the attempts that requeues ended, matched with requeues.json's events.

An attempt ended by a requeue lost three things, all charged to the fault that ended it: the productive time
it spent on steps the next attempt did again (everything after the checkpoint that attempt resumed from), its
own shut-down, and the start-up of the attempt that followed. Waiting in the queue is not allocated time and
is not counted. A fault that needed no requeue (a transient read retried in place) costs its retries' waits,
which goodput counts under "data".

Pure Python without torch: the login-node `llm-train status` imports this module.
"""

from __future__ import annotations

import re
from typing import Any

SIGNAL_KINDS = {"SIGTERM": "preempted (SIGTERM)", "SIGUSR2": "time limit (SIGUSR2)"}
FAILURE_KINDS = (  # (pattern in the recorded cause, kind); the first that matches names the fault
    (re.compile(r"killed by (SIG[A-Z0-9]+)"), "rank killed ({0})"),
    (re.compile(r"disk \(or the quota\) is full|No space left on device|Disk quota exceeded"), "disk full"),
    (re.compile(r"failed \d+ times .*could not be read"), "data read"),
    (re.compile(r"stalled|timed out|[Tt]imeout"), "stalled rank"),
)


def fault_kind(event: dict[str, Any]) -> str:
    """A short name for what caused one requeue (an entry of requeues.json)."""
    reason = str(event.get("signal", ""))
    if reason in SIGNAL_KINDS:
        return SIGNAL_KINDS[reason]
    cause = str(event.get("cause", ""))
    for pattern, kind in FAILURE_KINDS:
        found = pattern.search(cause)
        if found:
            return kind.format(*found.groups())
    return "failure" if reason == "failure" else reason or "unknown"


def _restart_of(event: dict[str, Any], events: list[dict[str, Any]]) -> int:
    """The allocation (restart count) an event ended; older records without one: its place among its job's."""
    if isinstance(event.get("restart_count"), int):
        return event["restart_count"]
    of_job = [e for e in events if str(e.get("job_id")) == str(event.get("job_id"))]
    return of_job.index(event)


def cost_by_fault(
    attempts: list[dict[str, Any]], redone: list[float], events: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """{kind: {"count": faults, "lost_s": seconds}} over a run's requeues (`attempts` sorted by start;
    `redone[i]`: the productive seconds of attempt i that a later attempt did again). An attempt killed before
    it wrote its goodput record (a kill during start-up) costs what its successor's start-up shows."""
    by_allocation = {
        (str(a.get("job_id")), a.get("restart_count")): (a, r) for a, r in zip(attempts, redone, strict=True)
    }
    costs: dict[str, dict[str, float]] = {}
    for event in events:
        job, restart = str(event.get("job_id")), _restart_of(event, events)
        lost = 0.0
        if (job, restart) in by_allocation:
            ended, wasted = by_allocation[(job, restart)]
            lost += wasted + ended["seconds"]["shutdown"]
        if (job, restart + 1) in by_allocation:
            lost += by_allocation[(job, restart + 1)][0]["seconds"]["startup"]
        entry = costs.setdefault(fault_kind(event), {"count": 0, "lost_s": 0.0})
        entry["count"] += 1
        entry["lost_s"] += lost
    return costs
