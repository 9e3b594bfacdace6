"""Parallel backends behind one small interface; the training loop does not know which one runs."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from trainer.config import BatchPlan, Config
from trainer.distributed import DistEnv
from trainer.parallel.model_source import ModelSource, model_source


class Backend(Protocol):
    """A wrapped model with its optimizer and schedule.

    One optimizer step is `grad_accum` calls of `forward_backward` followed by one `step`.
    """

    name: str
    module: nn.Module
    shard_size: int
    """Ranks one copy of the model state is sharded over (the world size unless hybrid, `parallel.shard`)."""

    def forward_backward(
        self, batch: dict[str, torch.Tensor], last_micro_batch: bool, num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward and backward of one micro batch; returns its loss, detached: the mean over its targets,
        or with `num_items` their sum divided by it (see trainer/parallel/inputs.py)."""

    def step(self) -> torch.Tensor:
        """Clip, optimizer step, zero the gradients; returns the gradient norm before clipping, on the device.

        A non-finite norm applies no update (the gradients are dropped).
        """

    def advance_schedule(self) -> None:
        """Move the learning-rate schedule to the next step: the loop calls it after each step it counts."""

    def eval_loss(
        self, batch: dict[str, torch.Tensor], num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of one batch without gradients (as `forward_backward` computes it)."""

    def train(self, mode: bool = True) -> None: ...

    @property
    def lr(self) -> float: ...


__all__ = ["Backend", "ModelSource", "build_backend", "model_source"]


def build_backend(config: Config, source: ModelSource, plan: BatchPlan, env: DistEnv) -> Backend:
    if config.parallel.backend == "deepspeed":
        from trainer.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(config, source, plan, env)
    from trainer.parallel.fsdp import FSDPBackend

    return FSDPBackend(config, source, plan, env)
