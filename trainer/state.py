"""The training loop's state (what a checkpoint saves) and context (what every step needs), below loop and resilience."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.checkpoint import CheckpointManager
from trainer.config import BatchPlan, Config
from trainer.metrics import MetricsLogger
from trainer.models.build import ModelFacts
from trainer.parallel import Backend
from trainer.resilience.goodput import GoodputClock
from trainer.resilience.heartbeat import Heartbeat
from trainer.resilience.preemption import StopSignals
from trainer.resilience.stragglers import BusyTimer


@dataclass
class TrainState:
    """Progress counters that a checkpoint saves and a resume restores.

    `batches` counts the global batches drawn from the data (trained on or skipped); `skipped` lists
    those dropped after a non-finite loss, so that a rollback or a resume skips them again.
    """

    step: int = 0
    tokens: int = 0
    batches: int = 0
    skipped: list[int] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "batches": self.batches, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.batches = int(state.get("batches", self.step))  # checkpoints from before skipping existed
        self.skipped = [int(index) for index in state.get("skipped", [])]


@dataclass
class LoopContext:
    config: Config
    plan: BatchPlan
    backend: Backend
    metrics: MetricsLogger
    facts: ModelFacts
    device: torch.device
    peak_tflops: float | None
    is_main: bool
    checkpoints: CheckpointManager
    stop_signals: StopSignals
    heartbeat: Heartbeat
    clock: GoodputClock
    rank: int = 0
    busy: BusyTimer = field(default_factory=lambda: BusyTimer(torch.device("cpu")))
    """Times each step's data and forward/backward for the straggler summary, on the run's device."""
