"""A stop is a stop with W&B on: SLURM's SIGTERM reaches W&B's service process too (scancel and preemption
signal every process of the job step), and that must not turn a clean stop into a failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from trainer_runs import read_metrics, start_training, train, wait_for

WANDB = ["log.wandb=offline", "train.max_steps=400", "train.global_batch_size=8", "train.micro_batch_size=2"]


def _group_and_wandb(pgid: int) -> list[int]:
    """The processes of the run's process group, and W&B's service processes that they started (W&B puts
    its service in a session of its own; SLURM signals it anyway, as part of the job step)."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            commands[int(entry.name)] = (entry / "cmdline").read_text()
        except OSError:
            continue
        parents[int(entry.name)], groups[int(entry.name)] = int(stat[1]), int(stat[2])
    chosen = {pid for pid, group in groups.items() if group == pgid}
    for _ in range(3):  # wandb-core is a child of rank 0, its helpers children of wandb-core
        chosen |= {pid for pid, parent in parents.items() if parent in chosen and "wandb" in commands[pid]}
    return sorted(chosen)


def test_sigterm_to_every_process_with_wandb_on_stops_cleanly_and_resumes_the_same_wandb_run(
    demo_dataset, tmp_path
):
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, demo_dataset.path, WANDB, env={}, stderr=subprocess.PIPE)
    wait_for(lambda: any(r.get("step", 0) >= 3 and "loss" in r for r in _records(run_dir)), timeout=180)
    # W&B starts in the background: under load its service may not have written its file by step 3.
    wait_for(
        lambda: any(p.stat().st_size > 0 for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")),
        timeout=120,
    )
    wandb_dirs = list((run_dir / "wandb").glob("offline-run-*"))
    victims = _group_and_wandb(os.getpgid(proc.pid))
    assert any("wandb-core" in Path(f"/proc/{pid}/cmdline").read_text() for pid in victims), victims
    for pid in victims:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    for log in (run_dir / "logs").glob("rank*.log"):
        assert "Traceback" not in log.read_text(), log
    events = [r for r in read_metrics(run_dir) if "event" in r]
    assert events[-1]["event"] == "preempted" and events[-2]["event"] == "checkpoint", events
    stopped = events[-1]["step"]
    wandb_file = next(wandb_dirs[0].glob("run-*.wandb"))
    assert wandb_file.stat().st_size > 0  # what W&B took stays on disk for `wandb sync`

    # The next attempt (here: the same command again) resumes and mirrors into the same W&B run.
    records = train(
        run_dir, demo_dataset.path, nproc=2, overrides=[*WANDB, f"train.stop_at_step={stopped + 2}"]
    )
    assert [r["step"] for r in records if r.get("event") == "resume"] == [stopped]
    run_ids = {path.name.rsplit("-", 1)[1] for path in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1, run_ids


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]
