"""One training run on this process: set up the pieces, hand them to the loop (torchtitan's train.py)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint import CheckpointManager, ResumePoint
from trainer.checkpoint.step_contents import model_code_files
from trainer.config import Config, batch_plan, write_config
from trainer.data.loader import DatasetInfo, build_loader, read_dataset_info
from trainer.distributed import DistEnv
from trainer.errors import UserError
from trainer.loop import evaluate, train_loop
from trainer.metrics import MetricsLogger, peak_tflops
from trainer.models.attention import choose_attention
from trainer.models.build import ModelRecipe, model_facts
from trainer.parallel import build_backend, model_source
from trainer.resilience.fault_injection import start_faults
from trainer.resilience.goodput import GoodputClock, summarize
from trainer.resilience.heartbeat import Heartbeat
from trainer.resilience.preemption import Preempted, StopSignals
from trainer.resilience.requeue import cancelled, requeue
from trainer.resilience.stragglers import BusyTimer
from trainer.state import LoopContext, TrainState


def device_name(device: torch.device) -> str:
    """What the ranks run on, for the run's record and the exported model card ("NVIDIA H100 80GB HBM3", "cpu")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_dims(config: Config, info: DatasetInfo) -> tuple[int, int]:
    """Vocabulary size and context length: from the config when set, else from the dataset."""
    vocab = config.model.vocab_size or info.vocab_size
    seq_len = config.model.seq_len or info.seq_len
    if vocab is None:
        raise UserError(
            f"the dataset at '{config.data.path}' has no prepare.json; set model.vocab_size to its tokenizer's size"
        )
    if info.vocab_size is not None and vocab < info.vocab_size:
        raise UserError(
            f"model.vocab_size={vocab} is smaller than the dataset's vocab_size {info.vocab_size}"
        )
    if seq_len < info.seq_len:
        raise UserError(
            f"model.seq_len={seq_len} is shorter than the dataset's samples ({info.seq_len} tokens)"
        )
    return vocab, seq_len


def starting_point(config: Config, checkpoints: CheckpointManager) -> tuple[ResumePoint | None, str | None]:
    """(checkpoint to resume in full, checkpoint to take only the weights from): checkpoint.load=weights_only
    applies to another run's checkpoint; this run's own always resume in full (requeues go on)."""
    point = checkpoints.find_resume()
    if point is None or config.checkpoint.load != "weights_only" or checkpoints.is_own(point):
        return point, None
    log.info("checkpoint.load=weights_only: weights of %s, new optimizer and schedule", point.step_dir)
    return None, str(point.step_dir)


def run_training(config: Config, env: DistEnv, heartbeat: Heartbeat, clock: GoodputClock) -> TrainState:
    run_dir = Path(config.run.dir)
    start_faults(env.rank)
    info = read_dataset_info(config.data.path, config.data.remote)
    plan = batch_plan(config.train, env.world_size, info.seq_len)
    vocab_size, seq_len = model_dims(config, info)
    if env.is_main:
        write_config(config, run_dir)
        log.info("batch plan: %s", plan.describe())
    checkpoints = CheckpointManager(config, env)
    resume_point, weights_from = starting_point(config, checkpoints)
    seed_everything(config.run.seed)
    attn = choose_attention(config.model.attn, env.device, config.train.precision)
    recipe = ModelRecipe(config.model, vocab_size, seq_len, attn, config.run.seed, init_from=weights_from)
    source = model_source(recipe, env)  # the full model on rank 0 only; the others build empty shards
    facts = model_facts(source.meta(), info.seq_len, config.model.arch)
    checkpoints.model_config = source.hf_config.to_json_string()
    checkpoints.model_code = model_code_files(source.hf_config)
    log.info(
        "model: %s, %.2fM parameters, %.3g GFLOPs per token",
        config.model.family_name, facts.n_params / 1e6, facts.flops_per_token() / 1e9,
    )  # fmt: skip
    backend = build_backend(config, source, plan, env)
    del source
    loader_args = {
        "global_batch_size": plan.global_batch_size,
        "info": info,
        "pin_memory": env.device.type == "cuda",
    }
    train_loader = build_loader(config.data, "train", plan.micro_batch_size, config.run.seed, **loader_args)
    val_loader = None
    if config.eval.every_steps and info.val_samples == 0:
        log.warning("the dataset has no val split: no evaluation")
    elif config.eval.every_steps:
        val_loader = build_loader(config.data, "val", plan.micro_batch_size, config.run.seed, **loader_args)
    metrics = MetricsLogger(config, run_dir, enabled=env.is_main)
    peak = peak_tflops(config.train.peak_tflops, env.device)
    stop_signals = StopSignals()
    ctx = LoopContext(
        config, plan, backend, metrics, facts, env.device, peak, env.is_main, checkpoints, stop_signals,
        heartbeat, clock, env.rank, BusyTimer(env.device),
    )  # fmt: skip
    state = TrainState()
    try:
        origin = (
            {"init_from": weights_from or config.model.init_from}
            if (weights_from or config.model.init_from)
            else {}
        )
        metrics.event(
            "start",
            state.step,
            world_size=env.world_size,
            backend=backend.name,
            grad_accum=plan.grad_accum,
            shard_group=backend.shard_size,
            model=config.model.family_name,
            arch=facts.arch,
            params=facts.n_params,
            device=device_name(env.device),
            nodes=env.world_size // max(1, env.local_world_size),
            **origin,
        )
        if resume_point is not None:
            heartbeat.enter("resume")
            state.load_state_dict(checkpoints.load(resume_point, backend, train_loader))
            metrics.event(
                "resume",
                state.step,
                checkpoint=str(resume_point.step_dir),
                from_world_size=resume_point.world_size,
            )
        elif val_loader is not None:
            with clock.phase("eval"):
                metrics.write(
                    {"step": state.step, **evaluate(ctx, val_loader.iter_batches(config.eval.batches))}
                )
        clock.resumed_from(resume_point.step if resume_point is not None else None)
        train_loop(ctx, state, train_loader, val_loader)
        clock.switch("shutdown")
        if state.step >= config.train.max_steps:
            clock.set_outcome("done")
            clock.flush()
            goodput = summarize(run_dir)
            metrics.event(
                "done", state.step, tokens=state.tokens, goodput_pct=goodput and goodput["goodput_pct"]
            )
    except Preempted as stop:
        clock.switch("shutdown")
        clock.set_outcome("preempted")
        if env.is_main:
            requeued, why = requeue(run_dir, config.slurm.max_requeues, stop.step, stop.signal_name)
            log.warning("%s; %s", stop, why)
            if requeued:
                metrics.event("requeued", stop.step, reason=why)
            elif cancelled(run_dir):
                metrics.event("cancelled", stop.step)
    finally:
        stop_signals.restore()
        metrics.close()
    return state
