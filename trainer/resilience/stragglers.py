"""Which rank holds the others back, from the heartbeats alone (no collective per step).

Every rank records how long each step kept it busy before its first collective of the optimizer step (data,
forward, backward: `Heartbeat.step_busy`); its heartbeat file carries the last steps' figures. At each logging
step rank 0 reads them and reports the slowest rank and its lag behind the median; a rank more than
`parallel.straggler_factor` times the median for PERSISTENT summaries in a row is logged with its host, so that
the node can be left out of the next job (`sbatch_extra: {exclude: HOST}` in the cluster profile).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from trainer.resilience.heartbeat import read_heartbeat

log = logging.getLogger(__name__)

PERSISTENT = 3
"""Summaries in a row in which a rank must be slow before it is named in the log."""


class StragglerWatch:
    def __init__(self, run_dir: Path, world_size: int, factor: float) -> None:
        self.run_dir, self.world_size, self.factor = run_dir, world_size, factor
        self.slow_in_a_row: dict[int, int] = {}

    def summary(self) -> dict[str, Any]:
        """{"slowest_rank", "slowest_lag_s"} over the recent steps that every rank's heartbeat reports (each
        rank writes its heartbeat at every logging step, so these lag by one logging interval at most);
        {} when there is nothing to compare (one rank, or no common step yet)."""
        if self.world_size < 2:
            return {}
        records = [read_heartbeat(self.run_dir, rank) for rank in range(self.world_size)]
        if any(record is None for record in records):
            return {}
        busy = [{int(step): s for step, s in record.get("busy_s", {}).items()} for record in records]
        steps = set.intersection(*(set(times) for times in busy))
        if not steps:
            return {}
        means = [statistics.fmean(times[step] for step in steps) for times in busy]
        median = statistics.median_low(means)  # of two ranks, the other one: not the straggler's own half
        slowest = max(range(self.world_size), key=lambda rank: means[rank])
        self._watch(slowest, means[slowest], median, records[slowest].get("host", "?"))
        return {"slowest_rank": slowest, "slowest_lag_s": round(means[slowest] - median, 4)}

    def _watch(self, rank: int, busy: float, median: float, host: str) -> None:
        slow = median > 0 and busy > self.factor * median
        self.slow_in_a_row = {rank: self.slow_in_a_row.get(rank, 0) + 1} if slow else {}
        if self.slow_in_a_row.get(rank) == PERSISTENT:
            log.warning(
                "rank %d on host %s is a straggler: %.2fx the median step time for %d summaries in a row; leave "
                "the node out of the next job (cluster profile: sbatch_extra: {exclude: %s})",
                rank, host, busy / median, PERSISTENT, host,
            )  # fmt: skip
