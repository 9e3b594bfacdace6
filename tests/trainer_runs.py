"""Run `llm-train train` for real (local processes, gloo) and read back what it logged."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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

# The checkpoint and fault tests' runs: 12 steps, world size 2, accumulation 2, a checkpoint every 3 steps.
STEPS = ["train.max_steps=12", "checkpoint.every_steps=3", "checkpoint.keep_last=4"]
BATCH = ["train.global_batch_size=8", "train.micro_batch_size=2"]
BACKENDS = ("fsdp", "deepspeed")


def overrides(backend: str, *extra: str) -> list[str]:
    return [f"parallel.backend={backend}", *STEPS, *BATCH, *extra]


def train(
    run_dir: Path,
    data: Path,
    nproc: int = 2,
    overrides: list[str] = (),
    nodes: int = 1,
    distribution: str = "block",
) -> list[dict]:
    """Train in `nproc` local processes (split into `nodes` simulated nodes, their ranks numbered as
    `distribution` says); returns the metrics.jsonl records. Fails the test on a non-zero exit."""
    args = [f"run.dir={run_dir}", f"data.path={data}", *BASE_OVERRIDES, *overrides]
    layout = ["--nproc", str(nproc), "--nodes", str(nodes), "--distribution", distribution]
    code = cli_main(["train", "tiny", *args, *layout])
    assert code == 0, f"llm-train train exited {code}; logs in {run_dir / 'logs'}"
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def start_training(
    run_dir: Path, data: Path, extra: list[str], env: dict[str, str], stderr: int | None = subprocess.DEVNULL
) -> subprocess.Popen:
    """`llm-train train --nproc 2` in the background, in its own process group (see kill_group)."""
    args = [f"run.dir={run_dir}", f"data.path={data}", *BASE_OVERRIDES, *extra]
    command = [sys.executable, "-m", "launcher.cli", "train", "tiny", *args, "--nproc", "2"]
    return subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)  # fmt: skip


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def by_step(records: list[dict]) -> dict[int, float]:
    """Loss per step; a step logged twice (recomputed after a rollback) keeps its last value."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def since_last_start(records: list[dict]) -> list[dict]:
    return records[max(i for i, r in enumerate(records) if r.get("event") == "start") :]


def resume_step(records: list[dict]) -> int:
    return next(r["step"] for r in records if r.get("event") == "resume")


def fresh_processes() -> Any:
    """A multiprocessing context whose processes start fresh (no thread or state of the test process's) yet
    without paying the imports each: forks of a forkserver that imported torch, streaming and the loader (spawn
    took seconds a process)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "streaming", "trainer.data.loader"])
    return context


def run_to_completion(processes: list, timeout: float) -> list[int | None]:
    """Start every process, wait for each up to `timeout` s, kill the ones still alive; their exit codes."""
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    for process in processes:
        if process.is_alive():
            process.kill()
    return [process.exitcode for process in processes]


def host_conversions(
    run_dir: Path, data: Path, nproc: int, extra: list[str], steps: tuple[int, int]
) -> dict[int, list[str]]:
    """Train with the host-conversion counter of tests/rank_hooks/sitecustomize.py watching steps
    `steps` (first, last; none of them may log, evaluate or save); returns each rank's conversions."""
    watched = watch_steps(run_dir, data, nproc, ["log.every_steps=1000", *extra], steps)
    return {rank: record["conversions"] for rank, record in watched.items()}


def watch_steps(
    run_dir: Path, data: Path, nproc: int, overrides: list[str], steps: tuple[int, int]
) -> dict[int, dict]:
    """Train with tests/rank_hooks/sitecustomize.py watching the training thread over steps `steps` (first,
    last); each rank's record: its tensor-to-host conversions and the files it opened."""
    prefix = run_dir.parent / f"{run_dir.name}-syncs"
    hooks = {"LLM_TRAIN_TEST_HOST_SYNCS": f"{prefix}:{steps[0]}:{steps[1]}"}
    saved = {name: os.environ.get(name) for name in hooks}
    os.environ.update(hooks)
    try:
        train(run_dir, data, nproc=nproc, overrides=overrides)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    reports = {rank: Path(f"{prefix}.rank{rank}.json") for rank in range(nproc)}
    return {rank: json.loads(path.read_text()) for rank, path in reports.items()}
