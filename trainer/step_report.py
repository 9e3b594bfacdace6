"""What a training step tells the host, read without emptying the device's queue.

A step leaves its summed loss and gradient norm on the device. Reading them at once (`.item()`) would
make the host wait for the whole step, and on a GPU every such wait leaves the device idle while the
host prepares the next step. So the loss, this rank's stop request, whether its background checkpoint
write has failed, how long the step kept each rank busy (the straggler summary: no rank reads another's
files for it) and (instruction data) the response tokens travel in ONE all-reduce, and the result is
copied to host memory without blocking (pinned memory and an event on CUDA). The loop reads a step's
report one step later, when its work has long finished, or at once where it must know (logging,
evaluation, checkpoint, the last step, `train.on_nonfinite=skip_batch`). Every rank reads the same
reduced values, so every rank decides alike.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

from trainer.distributed import all_reduce_sum
from trainer.resilience.requeue import STOP_SIGNALS

_STOP_SLOTS = sorted(int(sig) for sig in STOP_SIGNALS)
"""One slot per stop signal: summed over ranks, a slot above zero means some rank received that signal."""


@dataclass(frozen=True)
class StepResult:
    step: int
    batch: int
    """The global batch (0-based draw order) the step trained on."""
    loss: float
    """Averaged over ranks and micro batches."""
    grad_norm: float
    stop_signal: str | None
    """The name of a stop signal any rank received by the end of the step, else None."""
    save_failed: bool
    """Some rank's background checkpoint write had failed by the end of the step. Each rank learns that
    at its own moment; acting on the reduced flag makes every rank stop at the same step."""
    response_tokens: int | None
    busy_s: tuple[float, ...] = ()
    """How long the step kept each rank busy before its optimizer step (data, forward, backward), by rank."""


class StepReport:
    """One step's loss, gradient norm and stop requests, reduced and on their way to the host."""

    def __init__(
        self,
        step: int,
        batch: int,
        loss_sum: torch.Tensor,
        grad_norm: torch.Tensor,
        stop_received: int,
        save_failed: bool,
        response_tokens: torch.Tensor | None,
        world_size: int,
        rank: int = 0,
        busy_s: float = 0.0,
    ) -> None:
        self.step, self.batch, self.world_size = step, batch, world_size
        self.has_tokens = response_tokens is not None
        device = loss_sum.device
        flags = [1.0 if stop_received == slot else 0.0 for slot in _STOP_SLOTS] + [float(save_failed)]
        busy = [0.0] * world_size
        busy[rank] = busy_s  # summed over ranks: every rank's busy time in its own slot
        reduced = all_reduce_sum(torch.cat([loss_sum.double().reshape(1), _to_device(flags + busy, device)]))
        parts = [reduced, grad_norm.detach().double().reshape(1)]
        if response_tokens is not None:
            parts.append(response_tokens.double().reshape(1))
        values = torch.cat(parts)
        if device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._copied: torch.cuda.Event | None = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = values, None

    @property
    def host_buffer(self) -> torch.Tensor:
        """The host memory the result is read from (the only tensor `read` converts)."""
        return self._host

    def read(self) -> StepResult:
        """The step's values; waits only for this step's copy (long finished when read a step later)."""
        if self._copied is not None:
            self._copied.synchronize()
        values = self._host.numpy().tolist()  # host memory: no device is involved any more
        slots = len(_STOP_SLOTS)
        loss_sum, stops, save_failed = values[0], values[1 : 1 + slots], values[1 + slots]
        busy = values[2 + slots : 2 + slots + self.world_size]
        grad_norm = values[2 + slots + self.world_size]
        received = [slot for slot, count in zip(_STOP_SLOTS, stops, strict=True) if count > 0]
        return StepResult(
            step=self.step,
            batch=self.batch,
            loss=loss_sum / self.world_size,
            grad_norm=grad_norm,
            stop_signal=signal.Signals(max(received)).name if received else None,
            save_failed=save_failed > 0,
            response_tokens=round(values[-1]) if self.has_tokens else None,
            busy_s=tuple(busy),
        )


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """A small host list on `device` without a blocking copy (pinned source on CUDA)."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
