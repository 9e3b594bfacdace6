"""Run `llm-train train` for real (local processes, gloo) and read back what it logged."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cli import main as cli_main

# Small, fast, fp32 and without W&B: what the trainer tests share.
BASE_OVERRIDES = [
    "model.size=tiny",
    "train.precision=fp32",
    "train.warmup_steps=2",
    "log.every_steps=1",
    "log.wandb=off",
    "eval.every_steps=0",
    "checkpoint.every_steps=1000",
]


def train(run_dir: Path, data: Path, nproc: int = 2, overrides: list[str] = ()) -> list[dict]:
    """Train in `nproc` local processes; returns the metrics.jsonl records. Fails the test on a non-zero exit."""
    args = [f"run.dir={run_dir}", f"data.path={data}", *BASE_OVERRIDES, *overrides]
    code = cli_main(["train", "tiny", *args, "--nproc", str(nproc)])
    assert code == 0, f"llm-train train exited {code}; logs in {run_dir / 'logs'}"
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]
