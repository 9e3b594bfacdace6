"""The doctor's report: one `Check` a line (ok, warn or fail), and its rendering."""

from __future__ import annotations

from dataclasses import asdict, dataclass

STATUSES = ("ok", "warn", "fail")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, what was found (and for warn/fail, the fix)."""

    name: str
    status: str
    detail: str

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def format_report(checks: list[Check]) -> str:
    """One aligned line per check, then a count of each status."""
    width = max(len(check.name) for check in checks) + 1
    lines = [f"{check.status:<6}{check.name + ':':<{width}} {check.detail}" for check in checks]
    counts = {status: sum(check.status == status for check in checks) for status in STATUSES}
    summary = ", ".join(f"{counts[status]} {status}" for status in STATUSES)
    verdict = "runs will fail until the fail lines are fixed" if counts["fail"] else "nothing blocks a run"
    lines.append(f"{summary}: {verdict}")
    return "\n".join(lines)
