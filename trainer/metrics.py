"""RUN_DIR/metrics.jsonl (one JSON object a line) mirrored to W&B; rank 0 writes, others no-op."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, to_yaml

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """The configured peak, else the known peak of this GPU, else None (MFU is then null)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak: float | None) -> float | None:
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (world_size * peak * 1e12)


def wandb_mode(setting: str) -> str:
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


class MetricsLogger:
    def __init__(self, config: Config, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        self._file = self.path.open("a", buffering=1)
        mode = wandb_mode(config.log.wandb)
        if mode == "offline":
            os.environ.setdefault("WANDB_SILENT", "true")
        if mode != "off":
            import wandb
            import yaml

            self._wandb = wandb.init(
                project=config.log.wandb_project,
                name=config.run.name or run_dir.name,
                dir=str(run_dir),
                mode=mode,
                config=yaml.safe_load(to_yaml(config)),
                resume="allow",
                id=_wandb_run_id(run_dir),
            )

    def write(self, record: dict[str, Any], wandb_prefix: str = "") -> None:
        """One line in metrics.jsonl; its numbers also go to W&B, as `wandb_prefix + key`."""
        if not self.enabled:
            return
        record = {key: _finite_or_none(value) for key, value in record.items()}
        record["time"] = round(time.time(), 3)
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            numbers = {
                f"{wandb_prefix}{k}": v
                for k, v in record.items()
                if isinstance(v, (int, float)) and k not in ("step", "time")
            }
            if "event" in record:
                numbers[f"event/{record['event']}"] = 1
            self._wandb.log(numbers, step=record.get("step"))

    def event(self, name: str, step: int, **extra: Any) -> None:
        self.write({"event": name, "step": step, **extra})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _wandb_run_id(run_dir: Path) -> str:
    """One W&B run per RUN_DIR across restarts and requeues."""
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(uuid.uuid4().hex[:12])
        tmp.replace(id_file)
    return id_file.read_text().strip()
