"""Which rank holds the others back, from the step report's one all-reduce (no file is read for it).

Every rank measures how long each step kept it busy before its optimizer step (data, forward, backward; on
CUDA the device's time, `BusyTimer`) and
puts it in its own slot of the step report (trainer/step_report.py), so at a logging step rank 0 knows every
rank's time without touching the shared filesystem: the slowest rank and its lag behind the median go into the
metrics, and a rank more than `parallel.straggler_factor` times the median for PERSISTENT summaries in a row is
logged with its host (gathered once at start), so that the node can be left out of the next job
(`sbatch_extra: {exclude: HOST}` in the cluster profile).
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PERSISTENT = 3
"""Summaries in a row in which a rank must be slow before it is named in the log."""


def gather_hosts(world_size: int) -> list[str]:
    """Every rank's host name, by rank (a collective: every rank calls it once, at the start of training)."""
    if world_size < 2 or not dist.is_initialized():
        return [socket.gethostname()] * world_size
    hosts: list[str] = [""] * world_size
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts


class BusyTimer:
    """How long a step keeps this rank busy before its optimizer step, never waiting for the device.

    On the CPU the host's time is the work's. On CUDA the host only queues kernels and returns long before
    they end, so the time is the device's, between events recorded around the step's data and
    forward/backward, read one step late: the previous step's events have long completed by the next step's
    end (`query()`, no synchronisation). The first step reports 0 there, and no rank is named for it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host_start = 0.0
        self._events: tuple[Any, Any] | None = None
        self._pending: tuple[Any, Any] | None = None
        self._last_device_s = 0.0

    def start(self) -> None:
        self._host_start = time.perf_counter()
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()

    def stop(self) -> float:
        if not self.cuda or self._events is None:
            return time.perf_counter() - self._host_start
        self._events[1].record()
        previous, self._pending = self._pending, self._events
        if previous is not None and previous[1].query():
            self._last_device_s = previous[0].elapsed_time(previous[1]) / 1000
        return self._last_device_s


class StragglerWatch:
    def __init__(self, world_size: int, factor: float) -> None:
        self.world_size, self.factor = world_size, factor
        self.hosts = gather_hosts(world_size)
        self.slow_in_a_row: dict[int, int] = {}

    def summary(self, busy_s: Sequence[float]) -> dict[str, Any]:
        """{"slowest_rank", "slowest_lag_s"} of one step's busy times by rank; {} for one rank."""
        if self.world_size < 2 or len(busy_s) != self.world_size:
            return {}
        median = statistics.median_low(busy_s)  # of two ranks, the other one: not the straggler's own half
        slowest = max(range(self.world_size), key=lambda rank: busy_s[rank])
        self._watch(slowest, busy_s[slowest], median)
        return {"slowest_rank": slowest, "slowest_lag_s": round(busy_s[slowest] - median, 4)}

    def _watch(self, rank: int, busy: float, median: float) -> None:
        slow = median > 0 and busy > self.factor * median
        self.slow_in_a_row = {rank: self.slow_in_a_row.get(rank, 0) + 1} if slow else {}
        if self.slow_in_a_row.get(rank) == PERSISTENT:
            host = self.hosts[rank]
            log.warning(
                "rank %d on host %s is a straggler: %.2fx the median step time for %d summaries in a row; leave "
                "the node out of the next job (cluster profile: sbatch_extra: {exclude: %s})",
                rank, host, busy / median, PERSISTENT, host,
            )  # fmt: skip
