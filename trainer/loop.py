"""The training loop: one screen, backend-agnostic (nanoGPT's readability, torchtitan's separation)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.data.batches import target_count
from trainer.distributed import all_reduce_mean, all_reduce_sum
from trainer.metrics import mfu
from trainer.resilience.fault_injection import scaled_loss_if_chosen, step_faults
from trainer.resilience.nonfinite import LossWatch, handle_bad_step
from trainer.resilience.preemption import Preempted
from trainer.resilience.stragglers import StragglerWatch
from trainer.state import LoopContext, TrainState
from trainer.step_report import StepReport, StepResult

log = logging.getLogger(__name__)


def evaluate(ctx: LoopContext, val_batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Validation loss and perplexity; leaves the model in eval mode (`train_loop` sets train mode itself).

    Text: the mean of the batches' mean token losses. Instruction data: the loss of every response token
    of every batch and rank added up, over their count (batches hold different numbers of them).
    """
    ctx.heartbeat.enter("evaluation")
    ctx.backend.train(False)
    losses, targets = [], []
    for batch in val_batches:
        batch = _to_device(batch, ctx.device)
        if "labels" in batch:
            losses.append(ctx.backend.eval_loss(batch, num_items=_ONE.to(ctx.device)).double())
            targets.append(target_count(batch["labels"]))
        else:
            losses.append(ctx.backend.eval_loss(batch).double())
    if targets:
        total = all_reduce_sum(torch.stack([torch.stack(losses).sum(), torch.stack(targets).sum()]))
        val_loss = float(total[0] / total[1])
    else:
        val_loss = all_reduce_mean(torch.stack(losses).mean())
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def train_step(
    ctx: LoopContext, batches: Iterator[dict[str, torch.Tensor]], step: int, batch_index: int
) -> StepReport:
    """One optimizer step over `grad_accum` micro batches; returns its report, still on its way to the host.

    Nothing here waits for the device. Both backends apply no update when the gradient norm is not
    finite. Instruction batches hold different numbers of response tokens: their count over the whole
    step (one all-reduce) divides each micro batch's summed loss, so the step's loss and gradients are
    those of one mean over every response token of the global batch, whatever the micro batch size and
    world size.
    """
    loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    ctx.busy.start()
    with ctx.clock.phase("data"):
        ctx.heartbeat.enter("data", step)
        micro_batches = [_to_device(next(batches), ctx.device) for _ in range(ctx.plan.grad_accum)]
    num_items, response_tokens = _step_targets(ctx, micro_batches)
    with scaled_loss_if_chosen(ctx.backend.module, batch_index):
        for micro, batch in enumerate(micro_batches):
            ctx.heartbeat.enter("forward/backward")
            last = micro == ctx.plan.grad_accum - 1
            loss += ctx.backend.forward_backward(batch, last_micro_batch=last, num_items=num_items).double()
    step_faults(ctx.rank, step)
    busy_s = ctx.busy.stop()
    ctx.checkpoints.before_update()
    ctx.heartbeat.enter("optimizer step")
    grad_norm = ctx.backend.step()
    ctx.heartbeat.enter("step report all-reduce")
    received = ctx.stop_signals.received
    return StepReport(
        step,
        batch_index,
        loss / ctx.plan.grad_accum,
        grad_norm,
        received,
        ctx.checkpoints.failed_in_background,
        response_tokens,
        ctx.plan.world_size,
        ctx.rank,
        busy_s,
    )


_ONE = torch.ones((), dtype=torch.float32)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def _step_targets(
    ctx: LoopContext, micro_batches: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(None, None) for text; for instruction data the divisor of each micro batch's summed loss (the
    step's response-token count over all ranks, divided by world size x accumulation: each micro batch's
    gradient is averaged over both) and that count, both left on the device."""
    if "labels" not in micro_batches[0]:
        return None, None
    count = all_reduce_sum(torch.stack([target_count(batch["labels"]) for batch in micro_batches]).sum())
    return (count / (ctx.plan.world_size * ctx.plan.grad_accum)).float(), count


def skip_listed_batches(ctx: LoopContext, state: TrainState, batches: Iterator[Any]) -> None:
    """Draw and drop the global batches that train.skip_batches or earlier non-finite losses name."""
    skip = set(ctx.config.train.skip_batches) | set(state.skipped)
    while state.batches in skip:
        with ctx.clock.phase("data"):
            for _ in range(ctx.plan.grad_accum):
                next(batches)
        log.info("skipped global batch %d before step %d", state.batches, state.step + 1)
        state.batches += 1


def train_loop(ctx: LoopContext, state: TrainState, train_loader: Any, val_loader: Any | None) -> TrainState:
    """Train from `state` to the last step, with evaluations and checkpoints on their schedules.

    A step's report (loss, gradient norm, stop requests) is read one step later, when the device has
    long finished it, unless this step logs, evaluates, saves, is the last, or `train.on_nonfinite=
    skip_batch` must drop its batch before the next step (trainer/step_report.py). A bad step found a
    step late has applied no update (non-finite) and is stopped on or rolled back all the same.

    Train mode is set here, at the start and after each evaluation, never inherited from how the model
    was made or loaded: a model in eval mode trains without dropout, and transformers recomputes
    activations (activation checkpointing) only in train mode, so it would silently keep them all.
    """
    cfg, backend = ctx.config, ctx.backend
    backend.train(True)
    batches = iter(train_loader)
    progress = _progress_bar(ctx, state.step)
    tokens_per_step = ctx.plan.global_batch_size * ctx.facts.seq_len
    window_start, window_tokens = time.perf_counter(), 0
    last_step = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
    ctx.clock.switch("productive")
    watch = LossWatch(cfg.train.loss_spike_factor, cfg.train.on_nonfinite)
    profiler = _step_profiler(ctx)
    stragglers = StragglerWatch(ctx.plan.world_size, cfg.parallel.straggler_factor)
    unread: StepReport | None = None
    while state.step < last_step:
        skip_listed_batches(ctx, state, batches)
        step, step_start, lr = state.step + 1, time.perf_counter(), backend.lr
        if profiler is not None:
            profiler.before_step(step)
        report = train_step(ctx, batches, step, state.batches)
        if profiler is not None:
            profiler.after_step(step)
        state.batches += 1
        stop_signal = None
        if unread is not None:
            earlier, batches, stands = _settle(ctx, state, watch, unread, train_loader, batches)
            unread = None
            if not stands:
                continue  # rolled back: this step's work is gone with the rest
            stop_signal = earlier.stop_signal
        logs = step == 1 or step % cfg.log.every_steps == 0 or step == cfg.train.max_steps
        evaluates = (
            val_loader is not None
            and cfg.eval.every_steps
            and (step % cfg.eval.every_steps == 0 or step == cfg.train.max_steps)
        )
        saves = ctx.checkpoints.due(step) or step == last_step
        if logs or evaluates or saves or stop_signal or cfg.train.on_nonfinite == "skip_batch":
            result, batches, stands = _settle(ctx, state, watch, report, train_loader, batches)
            if not stands:
                continue
            stop_signal = stop_signal or result.stop_signal
        else:
            unread = report
        backend.advance_schedule()
        state.step, state.tokens = step, state.tokens + tokens_per_step
        window_tokens += tokens_per_step
        if logs:
            tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            record = {
                "step": step,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens": state.tokens,
                "tokens_per_s": round(tokens_per_s, 1),
                **({"response_tokens": result.response_tokens} if result.response_tokens is not None else {}),
                "mfu": mfu(tokens_per_s, ctx.facts.flops_per_token(), ctx.plan.world_size, ctx.peak_tflops),
                "step_time_s": round(time.perf_counter() - step_start, 4),
                "mem_gb": _memory_gb(ctx.device),
                **(stragglers.summary(result.busy_s) if ctx.is_main else {}),
            }
            ctx.metrics.write(record)
            _report(progress, record)
            window_start, window_tokens = time.perf_counter(), 0
        elif progress is not None:
            progress.update(1)
        ctx.clock.step_done(step)
        if evaluates:
            with ctx.clock.phase("eval"):
                ctx.metrics.write({"step": step, **evaluate(ctx, val_loader.iter_batches(cfg.eval.batches))})
            backend.train(True)
        if saves or stop_signal:
            blocking = step == last_step or stop_signal is not None
            with ctx.clock.phase("checkpoint"):
                ctx.heartbeat.enter("checkpoint save", urgent=True)  # ranks die in saves (OOM, a full disk)
                ctx.checkpoints.save(step, state.state_dict(), backend, train_loader, blocking=blocking)
            ctx.clock.checkpointed(step)
            ctx.metrics.event("checkpoint", step)
        if stop_signal and step < last_step:
            ctx.metrics.event("preempted", step, signal=stop_signal)
            raise Preempted(step, stop_signal)
    with ctx.clock.phase("checkpoint"):
        ctx.heartbeat.enter("checkpoint save")
        ctx.checkpoints.wait()
    if progress is not None:
        progress.close()
    return state


def _settle(
    ctx: LoopContext,
    state: TrainState,
    watch: LossWatch,
    report: StepReport,
    loader: Any,
    batches: Iterator[Any],
) -> tuple[StepResult, Iterator[Any], bool]:
    """Read `report` and apply train.on_nonfinite if its step went bad: (its result, the batch iterator
    to go on with, whether the step stands; not when its batch was dropped or the run rolled back).
    A background checkpoint write that failed on any rank stops every rank here, at the same step."""
    result = report.read()
    if result.save_failed:
        ctx.checkpoints.wait()  # raises the write's error, the same on every rank
    bad = watch.check(result.loss, result.grad_norm)
    if bad is None:
        return result, batches, True
    return result, handle_bad_step(ctx, state, bad, result, loader, batches), bad.applied


def _step_profiler(ctx: LoopContext) -> Any:
    """The profiler of `profile.steps`, or None (then nothing of it is even imported)."""
    if not ctx.config.profile.steps:
        return None
    from trainer.profiling import StepProfiler

    first, last = ctx.config.profile.steps
    return StepProfiler(first, last, Path(ctx.config.run.dir), ctx.rank, ctx.device)


def _memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _progress_bar(ctx: LoopContext, start_step: int) -> Any:
    if not (ctx.is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(
        total=ctx.config.train.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
    )


def _report(progress: Any, record: dict[str, Any]) -> None:
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        return
    log.info(
        "step %d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f",
        record["step"], record["loss"], record["lr"], record["grad_norm"], record["tokens_per_s"],
    )  # fmt: skip
