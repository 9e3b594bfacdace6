"""Profiles on demand (`profile.steps=[a, b]`): a PyTorch profiler trace of steps a..b per rank, and on CUDA a
memory snapshot at step b. Imported only when the key is set: a run without it runs no profiler code."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, first: int, last: int, run_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = first, last
        self.folder = run_dir / "profiles" / f"rank{rank}"
        self.cuda = device.type == "cuda"
        self._profiler: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True
        )
        self._profiler.__enter__()

    def after_step(self, step: int) -> None:
        if step != self.last or self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace_steps_{self.first}-{self.last}.json"
        self._profiler.export_chrome_trace(str(trace))
        self._profiler = None
        log.info("profile of steps %d-%d written to %s", self.first, self.last, trace)
        if self.cuda:
            snapshot = self.folder / f"memory_step_{self.last}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("memory snapshot written to %s (open it at pytorch.org/memory_viz)", snapshot)
