"""DeepSpeed ZeRO stage 3. Its JSON config is derived from ours, so users never keep two in sync."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import BatchPlan, Config
from trainer.distributed import DistEnv
from trainer.model import compile_blocks
from trainer.optim import build_scheduler, param_groups

log = logging.getLogger(__name__)
TAG = "deepspeed"
UNIVERSAL = ".universal"  # derived data: a leading dot keeps it out of the manifest


def deepspeed_config(config: Config, plan: BatchPlan) -> dict[str, Any]:
    train = config.train
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [train.beta1, train.beta2],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """Checkpoints in the engine's own format; another world size loads them as universal checkpoints."""

    name = "deepspeed"
    supports_async = False

    def __init__(self, config: Config, model: nn.Module, plan: BatchPlan, env: DistEnv) -> None:
        if env.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if env.device.type == "cpu":
            _skip_shm_comm_build()
        # The model arrives fully initialised on the CPU (not built under zero.Init, whose partitioned
        # parameters would skip the model's own weight init); the engine partitions it here.
        if config.train.compile:
            compile_blocks(model)
        ds_config = deepspeed_config(config, plan)
        deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, config.train.weight_decay),
            config=ds_config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, config.train),
        )
        self.module = self.engine.module
        self.device = self.engine.device
        self._record_write_errors()

    def forward_backward(self, input_ids: torch.Tensor, last_micro_batch: bool) -> torch.Tensor:
        loss = self.engine(input_ids=input_ids, labels=input_ids).loss
        self.engine.backward(loss)
        if not last_micro_batch:
            self.engine.step()  # at a non-boundary micro batch the engine only accumulates
        return loss.detach().float()

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids=input_ids, labels=input_ids).loss.detach().float()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, step_dir: Path, async_group: Any = None) -> None:
        """DeepSpeed's save, whose collectives every rank must reach even when one of its writes fails.

        A write that raised inside `save_checkpoint` would leave this rank out of the collectives that
        follow it there, and the ranks would wait on each other until the timeout. So the engine's file
        writes only record their failure; the first one is raised once the whole save has run.
        """
        self._write_errors.clear()
        self.engine.save_checkpoint(str(step_dir), tag=TAG, save_latest=False)
        if self._write_errors:
            raise self._write_errors[0]

    def _record_write_errors(self) -> None:
        writer = self.engine.checkpoint_engine
        self._write_errors: list[Exception] = []

        def recorded(write: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> None:
                try:
                    write(*args, **kwargs)
                except Exception as error:  # torch.save reports a full disk as RuntimeError
                    self._write_errors.append(error)

            return call

        writer.save, writer.makedirs = recorded(writer.save), recorded(writer.makedirs)
        # Rank 0 also copies DeepSpeed's recovery scripts next to the shards, outside the checkpoint engine.
        self.engine._copy_recovery_script = recorded(self.engine._copy_recovery_script)

    def load(self, step_dir: Path, saved_world_size: int) -> None:
        if saved_world_size == dist.get_world_size():
            self.engine.load_checkpoint(str(step_dir), tag=TAG)
            return
        universal = step_dir / UNIVERSAL
        if dist.get_rank() == 0 and not universal.is_dir():
            to_universal(step_dir / TAG, universal)
        dist.barrier()
        log.info(
            "world size %d -> %d: loading the universal form of %s",
            saved_world_size,
            dist.get_world_size(),
            step_dir,
        )
        self.engine._config.load_universal_checkpoint = True
        inner = self.engine.optimizer.optimizer
        weight_decays = [group["weight_decay"] for group in inner.param_groups]
        self.engine.load_checkpoint(str(step_dir), tag=UNIVERSAL)
        # DeepSpeed's universal loader copies group 0's hyper-parameters onto every group and hands all
        # groups one shared `step` tensor, which AdamW then increments once per group: undo both.
        for group, weight_decay in zip(inner.param_groups, weight_decays, strict=True):
            group["weight_decay"] = weight_decay
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed on plain gloo on CPU.

    Its CPU accelerator otherwise JIT-compiles a shared-memory all-reduce kernel at start-up: minutes of
    C++ on a fresh machine, behind a file lock that every rank waits on (forever, if a build is killed).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def to_universal(source: Path, target: Path) -> None:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (world-size independent), atomically."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {source}: {result.stderr.strip().splitlines()[-1:]}")
    tmp.rename(target)
