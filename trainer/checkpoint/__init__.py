"""Checkpoints: sharded, verified by a manifest written last, resumed exactly (see manager.py)."""

from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.steps import ResumePoint, newest_valid_step, verify_step

__all__ = ["CheckpointManager", "ResumePoint", "newest_valid_step", "verify_step"]
