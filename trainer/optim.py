"""AdamW parameter groups and the learning-rate schedule, shared by both backends."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, LayerNorm gains and position embeddings are left alone (GPT-2 / nanoGPT)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "wpe" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if step >= train.max_steps:
        return train.min_lr
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return train.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW: one kernel per step, and its `found_inf` input skips a step on the device (the FSDP
    backend's non-finite gradients) without the host reading anything."""
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        eps=1e-8,
        fused=True,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> LambdaLR:
    base = train.lr if train.lr > 0 else 1.0
    return LambdaLR(optimizer, lambda step: lr_at(step, train) / base)
