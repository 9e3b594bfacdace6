"""What a NaN or infinite loss does to the run: `train.on_nonfinite` = stop | skip_batch | rollback.

Neither backend applies an update whose gradient norm is not finite (DeepSpeed treats it as an
overflow, the FSDP backend checks the norm before stepping), so the weights are still those of the
previous step when the loop sees the bad loss. Every rank sees the same all-reduced loss and global
norm, so every rank takes the same decision.

- stop: raise, naming the step and the global batch.
- skip_batch: drop that global batch and retry the step with the next one (the schedule does not move).
- rollback: reload the newest complete checkpoint (weights, optimizer, RNG, data position) and go on
  from there, skipping the offending batch when the data reaches it again: the result equals a run that
  never saw that batch (`train.skip_batches` with its index).

The batches dropped are kept in the train state (and so in checkpoints); more than
`train.max_nonfinite` of them stop the run, since repeated NaNs mean something else is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.loop import LoopContext, TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and the run stops instead of silently continuing."""


def handle_nonfinite(
    ctx: LoopContext, state: TrainState, loss: float, grad_norm: float, loader: Any, batches: Iterator[Any]
) -> Iterator[Any]:
    """Apply train.on_nonfinite to the step that just failed; returns the batch iterator to go on with."""
    train = ctx.config.train
    step, batch = state.step + 1, state.batches - 1
    what = f"non-finite loss {loss} (gradient norm {grad_norm}) at step {step}, global batch {batch}"
    if train.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"{what}; lower train.lr, check the data, or set train.on_nonfinite=skip_batch|rollback"
        )
    if len(state.skipped) >= train.max_nonfinite:
        raise NonFiniteLossError(
            f"{what}: more than train.max_nonfinite={train.max_nonfinite} non-finite steps "
            f"(batches {state.skipped} were dropped before); lower train.lr or check the data"
        )
    state.skipped.append(batch)
    log.warning(
        "%s: %s", what, "dropping the batch" if train.on_nonfinite == "skip_batch" else "rolling back"
    )
    ctx.metrics.event(
        "nonfinite",
        step,
        batch=batch,
        action=train.on_nonfinite,
        loss_seen=str(loss),
        grad_norm_seen=str(grad_norm),
    )
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
