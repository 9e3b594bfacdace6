"""RUN_DIR/metrics.jsonl (one JSON object a line) mirrored to W&B; rank 0 writes, others no-op.

W&B starts in a thread of its own (`wandb.init` takes seconds: its imports, its service process, its run
files), so that the run builds its model, evaluates and steps meanwhile. Lines written before it is up wait
in a queue and reach W&B in order, with their steps, as soon as it is; `close` waits for it. W&B only mirrors
metrics.jsonl: a W&B that fails to start or stops taking lines (its service killed by the SIGTERM that SLURM
sends to every process of a job step) is one warning, and the run goes on with metrics.jsonl alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, to_yaml

log = logging.getLogger(__name__)

PEAK_TFLOPS = {
    "NVIDIA B200": 2250.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM-80GB": 312.0,  # the name DGX A100 80GB systems report
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
}
"""Dense (not 2:4 sparse) bf16 tensor-core TFLOP/s from NVIDIA's data sheets, by the exact name
`torch.cuda.get_device_name()` reports. Exact names, not substrings: "NVIDIA L40" is not an L4, an
"H100 NVL" not an H100 SXM, and a GPU missing here has no MFU rather than a wrong one."""


def _normalised(name: str) -> str:
    return " ".join(name.split()).casefold()


_PEAK_BY_NAME = {_normalised(name): peak for name, peak in PEAK_TFLOPS.items()}


def known_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU named `device_name` (case and spacing ignored), None when unknown."""
    return _PEAK_BY_NAME.get(_normalised(device_name))


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """The configured peak, else the known peak of this GPU, else None (MFU is then null), with a log line why."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = known_peak_tflops(name)
    if peak is None:
        log.warning(
            "no known peak TFLOP/s for GPU %r: MFU is not reported; set train.peak_tflops to its dense bf16 peak",
            name,
        )
    return peak


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
        self._wandb: Future | None = None
        self._wandb_queue: list[tuple[dict[str, Any], int | None]] = []
        if not enabled:
            return
        self._file = self.path.open("a", buffering=1)
        mode = wandb_mode(config.log.wandb)
        if mode == "offline":
            os.environ.setdefault("WANDB_SILENT", "true")
        if mode != "off":
            import yaml

            settings = {
                "project": config.log.wandb_project,
                "name": config.run.name or run_dir.name,
                "dir": str(run_dir),
                "mode": mode,
                "config": yaml.safe_load(to_yaml(config)),
                "resume": "allow",
                "id": _wandb_run_id(run_dir),
            }
            self._wandb = Future()
            threading.Thread(
                target=_start_wandb, args=(self._wandb, settings), name="wandb-init", daemon=True
            ).start()

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
            self._wandb_queue.append((numbers, record.get("step")))
            if self._wandb.done():
                try:
                    self._send(self._wandb.result())  # raises what wandb.init raised, or what a log raised
                except Exception as error:  # noqa: BLE001 - W&B mirrors metrics.jsonl; losing it loses nothing
                    self._wandb = None
                    _abandon_wandb()
                    log.warning(
                        "W&B failed (%s): the rest of this run is in metrics.jsonl only; what W&B took stays in "
                        "its files (offline: `wandb sync`)",
                        _first_line(error),
                    )

    def _send(self, wandb_run: Any) -> None:
        queue, self._wandb_queue = self._wandb_queue, []
        for numbers, step in queue:
            wandb_run.log(numbers, step=step)

    def event(self, name: str, step: int, **extra: Any) -> None:
        self.write({"event": name, "step": step, **extra})

    def close(self) -> None:
        """Close metrics.jsonl and the W&B run (once it has started and has every line). Runs after the last
        checkpoint, also on a stop: a W&B helper process killed by the same SIGTERM must not turn a clean stop
        into a failure, so its error is one warning line (the offline files written so far stay for
        `wandb sync`)."""
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            started, self._wandb = self._wandb, None
            try:
                wandb_run = started.result()
            except Exception as error:  # noqa: BLE001 - the run's own lines are complete in metrics.jsonl
                _abandon_wandb()
                log.warning("W&B did not start (%s); metrics.jsonl is complete", _first_line(error))
                return
            try:
                self._send(wandb_run)
                wandb_run.finish()
            except Exception as error:  # noqa: BLE001 - any failure of W&B's shut-down is only worth a warning
                _abandon_wandb()
                log.warning("W&B did not close cleanly (%s); metrics.jsonl is complete", _first_line(error))


def _abandon_wandb() -> None:
    """End a W&B session whose service is gone (SLURM signals every process of a job step, W&B's service among
    them) through W&B's own `teardown`, which also removes its exit hook: without it the process would end
    with W&B's traceback of the lost connection."""
    import wandb

    try:
        wandb.teardown()
    except Exception as error:  # noqa: BLE001 - the connection is known to be lost
        log.debug("W&B teardown: %s", _first_line(error))


def _start_wandb(started: Future, settings: dict[str, Any]) -> None:
    """`wandb.init(**settings)` into `started` (in the "wandb-init" thread)."""
    try:
        import wandb

        started.set_result(wandb.init(**settings))
    except BaseException as error:  # noqa: BLE001 - handed to the thread that writes the lines
        started.set_exception(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
