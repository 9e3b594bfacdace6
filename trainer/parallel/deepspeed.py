"""DeepSpeed ZeRO stage 3. Its JSON config is derived from ours, so users never keep two in sync."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.atomic import atomic_write_text
from trainer.config import BatchPlan, Config
from trainer.distributed import DistEnv
from trainer.errors import UserError
from trainer.models.build import check_tied, compile_blocks
from trainer.optim import build_scheduler, param_groups
from trainer.parallel.deepspeed_universal import (
    CONVERSION_FAILED,
    CONVERSION_WAIT_S,
    UNIVERSAL,
    to_universal,
    wait_for_conversion,
)
from trainer.parallel.inputs import model_inputs, prepare_attention
from trainer.parallel.model_source import ModelSource, StateGroup, fill_from
from trainer.parallel.node_layout import consecutive_layout_problem, node_major_order
from trainer.parallel.sharding import shard_group_size, state_bytes

log = logging.getLogger(__name__)
TAG = "deepspeed"
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # what engine._copy_recovery_script copies


def deepspeed_config(config: Config, plan: BatchPlan, shard_size: int | None = None) -> dict[str, Any]:
    """The engine's config. In bf16, gradients are accumulated and reduced in fp32, as FSDP2 does
    (MixedPrecisionPolicy(reduce_dtype=float32)): DeepSpeed's defaults, bf16 for both, would add rounding
    at every micro batch and in every reduction, and the two backends would not train alike."""
    train = config.train
    extra: dict[str, Any] = {}
    if train.precision == "bf16":
        extra = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    hierarchical = (
        {"zero_hpz_partition_size": shard_size} if shard_size and shard_size < plan.world_size else {}
    )
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
            **hierarchical,  # ZeRO++ hpZ: a secondary copy of the weights sharded within each group
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
        **extra,
    }


class DeepSpeedBackend:
    """Checkpoints in the engine's own format; another world size loads them as universal checkpoints."""

    name = "deepspeed"
    supports_async = False

    def __init__(self, config: Config, source: ModelSource, plan: BatchPlan, env: DistEnv) -> None:
        if env.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if env.device.type == "cpu":
            _skip_shm_comm_build()
        self.shard_size = shard_group_size(config.parallel.shard, env, state_bytes(source.meta()))
        ds_config = deepspeed_config(config, plan, self.shard_size)
        deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo")
        if self.shard_size < env.world_size:  # hpZ's groups are consecutive ranks
            problem = consecutive_layout_problem(node_major_order(env), config.parallel.shard)
            if problem:
                raise UserError(problem)
        model = _partitioned_model(source, ds_config, env.device)
        if config.train.compile:
            compile_blocks(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, source, config.train.weight_decay),
            config=ds_config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, config.train),
        )
        self.module = self.engine.module
        self.attention = prepare_attention(self.module)
        self.device = self.engine.device
        self._record_writes()
        model_dtype, accum_dtype = self.engine.get_data_types()
        log.info(
            "DeepSpeed ZeRO-3: parameters in %s, gradients accumulated in %s and reduced in %s; weights "
            "sharded over groups of %d ranks",
            model_dtype,
            getattr(self.engine.optimizer, "gradient_accumulation_dtype", accum_dtype),
            self.engine.communication_data_type,
            self.shard_size,
        )

    def forward_backward(
        self, batch: dict[str, torch.Tensor], last_micro_batch: bool, num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss = self.engine(**model_inputs(batch, num_items, self.attention)).loss
        self.engine.backward(loss)
        if not last_micro_batch:
            self.engine.step()  # at a non-boundary micro batch the engine only accumulates
        return loss.detach().float()

    def step(self) -> torch.Tensor:
        """The engine's step (it skips non-finite gradients itself, and reads the norm on the host)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        value = float(norm) if norm is not None else float("nan")
        return torch.tensor(value, dtype=torch.float64, device=self.engine.device)

    def advance_schedule(self) -> None:
        """Nothing: the engine steps its schedule inside `step`, and not after an overflow."""

    @torch.no_grad()
    def eval_loss(
        self, batch: dict[str, torch.Tensor], num_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.engine(**model_inputs(batch, num_items, self.attention)).loss.detach().float()

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
        self._saved.clear()
        self.engine.save_checkpoint(str(step_dir), tag=TAG, save_latest=False)
        if self._write_errors:
            raise self._write_errors[0]

    def saved_files(self) -> list[Path]:
        """The files this rank wrote in the last `save`: its ZeRO shards (zero_pp_rank_R_mp_rank_00_model_
        states.pt and _optim_states.pt) and, on rank 0, the recovery scripts. The checkpoint manager lists
        these in the manifest (each rank reports its own files; no directory listing is trusted)."""
        return list(self._saved)

    def _record_writes(self) -> None:
        """Route the engine's file writes through a recorder: the paths written, and the failures."""
        writer = self.engine.checkpoint_engine
        self._write_errors: list[Exception] = []
        self._saved: list[Path] = []

        def recorded(
            write: Callable[..., Any], paths: Callable[..., list[Path]] | None = None
        ) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> None:
                try:
                    write(*args, **kwargs)
                except Exception as error:  # torch.save reports a full disk as RuntimeError
                    self._write_errors.append(error)
                    return
                if paths is not None:
                    self._saved.extend(paths(*args, **kwargs))

            return call

        def saved(state_dict: Any, path: str) -> list[Path]:
            return [Path(path)]

        def scripts(save_path: str) -> list[Path]:
            return [Path(save_path, name) for name in RECOVERY_SCRIPTS if Path(save_path, name).is_file()]

        writer.save, writer.makedirs = recorded(writer.save, saved), recorded(writer.makedirs)
        # Rank 0 also copies DeepSpeed's recovery scripts next to the shards, outside the checkpoint engine.
        self.engine._copy_recovery_script = recorded(self.engine._copy_recovery_script, scripts)

    def load(self, step_dir: Path, saved_world_size: int) -> None:
        """Load a step; one saved with another world size through DeepSpeed's universal format.

        Rank 0 converts it once (kept in step_*/.universal for later attempts) while the other ranks wait
        for the folder to appear, outside any collective: a conversion that outlasts
        parallel.timeout_s (1.5B on a shared filesystem) must not make them abort. The engine reads the
        universal layout for that load only: a later load of a checkpoint this run wrote itself (a
        rollback) is a normal one.
        """
        if saved_world_size == dist.get_world_size():
            self.engine._config.load_universal_checkpoint = False
            self._load(step_dir, TAG)
            return
        universal = step_dir / UNIVERSAL
        token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)  # names this conversion in a failure report
        if dist.get_rank() == 0:
            try:
                (step_dir / CONVERSION_FAILED).unlink(missing_ok=True)
                to_universal(step_dir / TAG, universal)
            except Exception as error:
                report = {"token": token[0], "error": str(error).strip().splitlines()[0]}
                try:  # tells the waiting ranks; a read-only folder cannot, and the launcher stops them
                    atomic_write_text(step_dir / CONVERSION_FAILED, json.dumps(report))
                except OSError as write_error:
                    log.error("could not tell the other ranks that the conversion failed: %s", write_error)
                raise
        else:
            wait_for_conversion(universal, step_dir / CONVERSION_FAILED, token[0], CONVERSION_WAIT_S)
        log.info(
            "world size %d -> %d: loading the universal form of %s",
            saved_world_size,
            dist.get_world_size(),
            step_dir,
        )
        inner = self.engine.optimizer.optimizer
        weight_decays = [group["weight_decay"] for group in inner.param_groups]
        self.engine._config.load_universal_checkpoint = True
        try:
            self._load(step_dir, UNIVERSAL)
        finally:
            self.engine._config.load_universal_checkpoint = False
        # DeepSpeed's universal loader copies group 0's hyper-parameters onto every group and hands all
        # groups one shared `step` tensor, which AdamW then increments once per group: undo both.
        for group, weight_decay in zip(inner.param_groups, weight_decays, strict=True):
            group["weight_decay"] = weight_decay
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _load(self, step_dir: Path, tag: str) -> None:
        """engine.load_checkpoint, which says it found nothing by returning None rather than raising.

        It unpickles DeepSpeed's own files (torch.load(weights_only=False) inside the engine, which takes
        no weights_only argument): a DeepSpeed checkpoint must come from a trusted source
        (docs/checkpoints.md, "What loading trusts").
        """
        load_path, _ = self.engine.load_checkpoint(str(step_dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed loaded nothing from {step_dir / tag}")


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed on plain gloo on CPU.

    Its CPU accelerator otherwise JIT-compiles a shared-memory all-reduce kernel at start-up: minutes of
    C++ on a fresh machine, behind a file lock that every rank waits on (forever, if a build is killed).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _partitioned_model(source: ModelSource, ds_config: dict[str, Any], device: torch.device) -> nn.Module:
    """The model built under `zero.Init`, so that each rank keeps only its partition, with the initial weights.

    zero.Init builds each module in full, broadcasts its parameters from rank 0 and partitions them before
    the next module; the family's weight init is skipped (`empty`), so the values left are meaningless. The
    source's tensors (trainer/parallel/model_source.py: the seeded model replayed on every rank, or rank 0's
    init_from weights) replace them one parameter at a time: GatheredParameters with modifier_rank=0 gathers
    it, rank 0 writes the full tensor and partitions it again. The weights are then those FSDP starts from,
    bit for bit.

    The parameters are made in the compute dtype, which zero.Init takes from the config (fp32, or bf16/fp16
    when enabled): the engine casts a plain model's parameters to bf16/fp16 but leaves a zero.Init model's
    as they are, so fp32 ones would silently train in fp32. Copying the fp32 weights into them rounds as
    that cast did, and the optimizer's fp32 master weights come from these. No `dtype` argument: with
    one, DeepSpeed 0.19 picks bf16 on an accelerator without fp16 (the CPU) whatever it says.
    """
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = source.empty()
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))  # not partitioned: each rank's whole

    def keep_partition(group: StateGroup) -> None:
        name, full = group[0]
        if name in buffers:
            for each, _ in group:
                buffers[each].data.copy_(full)
            return
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):  # tied: one parameter
            if dist.get_rank() == 0:
                params[name].data.copy_(full)

    fill_from(source, device, params.keys() | buffers.keys(), keep_partition)
    check_tied(model)
    return model


def _param_groups(model: nn.Module, source: ModelSource, weight_decay: float) -> list[dict[str, Any]]:
    """`param_groups` of the partitioned model, decided on the meta model's shapes.

    param_groups tells matrices from vectors by `dim()`; a partitioned parameter is an empty 1-d tensor
    (its shape lives in `ds_shape`), so the same names in the same order are looked up on the meta model.
    """
    meta = source.meta()
    names = {id(param): name for name, param in meta.named_parameters()}
    params = dict(model.named_parameters())
    return [
        {**group, "params": [params[names[id(param)]] for param in group["params"]]}
        for group in param_groups(meta, weight_decay)
    ]
