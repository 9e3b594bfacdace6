"""What a bad step does to the run: a NaN/inf loss or gradient norm, or a loss spike.

`train.on_nonfinite` = stop | skip_batch | rollback. Neither backend applies an update whose gradient
norm is not finite (DeepSpeed treats it as an overflow, the FSDP backend's fused AdamW skips it on the
device), so the weights are still those of the previous step when the loop sees a non-finite loss.
Every rank sees the same all-reduced loss and global norm, so every rank takes the same decision. The
loop learns of a step one step late unless it must know at once (trainer/step_report.py); skip_batch
always must, since the next step has to train on the next batch with the schedule unmoved.

- stop: raise, naming the step and the global batch.
- skip_batch: drop that global batch and retry the step with the next one (the schedule does not move).
- rollback: reload the newest complete checkpoint (weights, optimizer, RNG, data position) and go on
  from there, skipping the offending batch when the data reaches it again: the result equals a run that
  never saw that batch (`train.skip_batches` with its index).

A spike (`train.loss_spike_factor` times the mean of the previous 20 losses) is finite: its update has
been applied by the time the loss is known, so rollback undoes it and skip_batch can only log it.
The batches dropped are kept in the train state (and so in checkpoints); more than
`train.max_nonfinite` of them stop the run, since repeated bad steps mean something else is wrong.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.state import LoopContext, TrainState
    from trainer.step_report import StepResult

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (or spiked) and the run stops instead of silently continuing."""


SPIKE_WINDOW = 20


@dataclass(frozen=True)
class BadStep:
    kind: str  # "non-finite" | "spike"
    loss: float
    grad_norm: float
    applied: bool  # whether the step's update was applied and stands (a spike under skip_batch)
    recent_mean: float | None = None

    def describe(self, step: int, batch: int) -> str:
        if self.kind == "spike":
            ratio = self.loss / self.recent_mean if self.recent_mean else float("inf")
            what = f"loss spike {self.loss:.4f} ({ratio:.1f}x the mean {self.recent_mean:.4f} of the previous {SPIKE_WINDOW} steps)"
        else:
            what = f"non-finite loss {self.loss} (gradient norm {self.grad_norm})"
        return f"{what} at step {step}, global batch {batch}"


class LossWatch:
    """Tells a bad step from a good one; remembers the recent good losses for spike detection."""

    def __init__(self, spike_factor: float, on_nonfinite: str) -> None:
        self.spike_factor, self.on_nonfinite = spike_factor, on_nonfinite
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def check(self, loss: float, grad_norm: float) -> BadStep | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return BadStep("non-finite", loss, grad_norm, applied=False)
        if self.spike_factor and len(self.recent) == SPIKE_WINDOW:
            mean = sum(self.recent) / SPIKE_WINDOW
            if loss > self.spike_factor * mean:
                return BadStep("spike", loss, grad_norm, self.on_nonfinite == "skip_batch", mean)
        self.recent.append(loss)
        return None


def handle_bad_step(
    ctx: LoopContext, state: TrainState, bad: BadStep, result: StepResult, loader: Any, batches: Iterator[Any]
) -> Iterator[Any]:
    """Apply train.on_nonfinite to the step of `result`, found bad; returns the batch iterator to go on with."""
    train = ctx.config.train
    step, batch = result.step, result.batch
    what = bad.describe(step, batch)
    if train.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"{what}; lower train.lr, check the data, or set train.on_nonfinite=skip_batch|rollback"
        )
    if bad.applied:
        log.warning("%s: its update is applied (skip_batch cannot undo a finite step; rollback can)", what)
        ctx.metrics.event(
            bad.kind.replace("-", ""), step, batch=batch, action="logged", loss_seen=str(bad.loss)
        )
        return batches
    if len(state.skipped) >= train.max_nonfinite:
        raise NonFiniteLossError(
            f"{what}: more than train.max_nonfinite={train.max_nonfinite} bad steps "
            f"(batches {state.skipped} were dropped before); lower train.lr or check the data"
        )
    state.skipped.append(batch)
    action = "dropping the batch" if train.on_nonfinite == "skip_batch" else "rolling back"
    log.warning("%s: %s", what, action)
    ctx.metrics.event(
        bad.kind.replace("-", ""), step, batch=batch, action=train.on_nonfinite,
        loss_seen=str(bad.loss), grad_norm_seen=str(bad.grad_norm),
    )  # fmt: skip
    if train.on_nonfinite == "skip_batch":
        return batches
    return _rollback(ctx, state, loader, batches, what)


def _rollback(
    ctx: LoopContext, state: TrainState, loader: Any, batches: Iterator[Any], what: str
) -> Iterator[Any]:
    ctx.heartbeat.enter("rollback")
    with ctx.clock.phase("nonfinite"):
        ctx.checkpoints.wait()
        point = ctx.checkpoints.newest_complete()
        if point is None:
            raise NonFiniteLossError(
                f"{what}: no checkpoint to roll back to yet; lower checkpoint.every_steps or use "
                "train.on_nonfinite=skip_batch"
            )
        batches.close()  # type: ignore[attr-defined]  # the loader's iteration ends before it is rewound
        skipped = state.skipped
        state.load_state_dict(ctx.checkpoints.load(point, ctx.backend, loader))
        state.skipped = sorted(set(state.skipped) | set(skipped))
    ctx.clock.rolled_back(state.step)
    ctx.metrics.event("rollback", state.step, skipped=state.skipped)
    log.warning("rolled back to step %d; global batches %s will be skipped", state.step, state.skipped)
    return iter(loader)
