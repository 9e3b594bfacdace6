"""Checkpoints: sharded, verified by a manifest written last, resumed exactly.

manager.py saves and resumes; steps.py reads what is on disk.
"""

from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.step_contents import MODEL_CONFIG
from trainer.checkpoint.steps import ResumePoint, newest_valid_step, verify_step

__all__ = ["MODEL_CONFIG", "CheckpointManager", "ResumePoint", "newest_valid_step", "verify_step"]
