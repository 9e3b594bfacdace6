"""What breaks on a real cluster, on CPU with gloo: lost and stalled ranks, full disks, damaged data, NaNs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from trainer_runs import (
    BASE_OVERRIDES,
    by_step,
    kill_group,
    overrides,
    read_metrics,
    resume_step,
    since_last_start,
    start_training,
    train,
    wait_for,
)

from launcher.cli import main as cli_main
from trainer.checkpoint import newest_valid_step
from trainer.data.read_retry import READ_ERROR_ENV
from trainer.resilience.fault_injection import (
    NAN_AT_BATCH_ENV,
    SLEEP_IN_SAVE_ENV,
    SPIKE_AT_BATCH_ENV,
    STALL_ENV,
)

TIMEOUT_S = 20
STALL_TIMEOUT_S = 12  # waited out in full by the stall test
NAN_BATCH = 4  # the global batch of step 5 (0-based draw order)


class Stderr:
    """A background process's stderr lines, each with the time it arrived."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.returncode: int | None = None
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def first(self, text: str) -> tuple[float, str] | None:
        return next(((t, line) for t, line in self.lines if text in line), None)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(line for _, line in self.lines)


def _train_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line).get("step", 0) for line in lines if '"loss"' in line), default=0)


# --- lost and stalled ranks ------------------------------------------------------------------------


@contextmanager
def _run_to_fail(run_dir: Path, data: Path, extra: list[str], env: dict[str, str]) -> Iterator[Stderr]:
    """A background 2-rank run whose stderr is followed; killed at the end if still alive."""
    proc = start_training(run_dir, data, extra, env, stderr=subprocess.PIPE)
    stderr = Stderr(proc)
    try:
        yield stderr
    finally:
        if proc.poll() is None:
            kill_group(proc)
        stderr.returncode = proc.wait(timeout=60)


def _survivor_report(stderr: Stderr, timeout: float) -> tuple[float, str]:
    """When rank 0 reported its failure, and the report."""
    wait_for(lambda: stderr.first("rank 0 failed in") is not None or stderr.ended(), timeout)
    report = stderr.first("rank 0 failed in")
    assert report is not None, stderr.text()
    return report


def test_killed_rank_is_named_by_the_survivor_and_the_resume_matches(straight, demo_dataset, tmp_path):
    run_dir = tmp_path / "run"
    extra = [*overrides("fsdp", f"parallel.timeout_s={TIMEOUT_S}", "checkpoint.every_steps=1")]
    with _run_to_fail(run_dir, demo_dataset.path, extra, {}) as stderr:
        wait_for(lambda: _train_steps(run_dir) >= 4 or stderr.ended())
        assert not stderr.ended(), stderr.text()
        victim = json.loads((run_dir / "heartbeats" / "node-00000" / "rank00001.json").read_text())["pid"]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        reported_at, report = _survivor_report(stderr, 60)
    assert reported_at - killed_at <= TIMEOUT_S + 10
    assert f"rank 1 is lost (pid {victim}" in report
    assert stderr.returncode != 0
    # The last complete checkpoint is intact, and a resume from it recomputes the straight run exactly.
    newest = newest_valid_step(run_dir / "checkpoints").step
    records = since_last_start(train(run_dir, demo_dataset.path, nproc=2, overrides=overrides("fsdp")))
    assert resume_step(records) == newest
    expected = by_step(read_metrics(straight["fsdp"]))
    assert by_step(records) == {step: expected[step] for step in range(newest + 1, 13)}


def test_stalled_rank_is_named_within_the_collective_timeout(demo_dataset, tmp_path):
    run_dir = tmp_path / "run"
    extra = overrides("fsdp", f"parallel.timeout_s={STALL_TIMEOUT_S}")
    rank1_log = run_dir / "logs" / "rank1.log"
    with _run_to_fail(run_dir, demo_dataset.path, extra, {STALL_ENV: "1:3:600"}) as stderr:
        wait_for(
            lambda: "stalls for" in (rank1_log.read_text() if rank1_log.is_file() else "") or stderr.ended()
        )
        stalled_at = time.monotonic()
        reported_at, report = _survivor_report(stderr, STALL_TIMEOUT_S + 30)
        wait_for(lambda: stderr.first("rank 0 exited with code 3") is not None or stderr.ended(), 30)
    assert STALL_TIMEOUT_S - 2 <= reported_at - stalled_at <= STALL_TIMEOUT_S + 10
    assert "rank 1 stalled in 'forward/backward' of step 3" in report, report
    assert "this rank waits in 'optimizer step' of step 3" in report
    # The survivor itself, before the launcher stops rank 1; 3: its collective failed because of another rank.
    exited = stderr.first("rank 0 exited with code 3 (its collective failed because of another rank)")
    assert exited is not None and exited[0] - stalled_at <= STALL_TIMEOUT_S + 10, stderr.text()


# --- full disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """RUN_DIR/checkpoints on a 3 MiB tmpfs: one tiny-model checkpoint (2.2 MB) fits, two do not."""
    run_dir = tmp_path / "run"
    mount_point = run_dir / "checkpoints"
    mount_point.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, f"this test mounts a tmpfs and needs root: {result.stderr}"
    try:
        yield run_dir
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize(
    ("backend", "extra", "then_resume"),
    [("fsdp", [], True), ("fsdp", ["checkpoint.async=true"], False), ("deepspeed", [], False)],
    ids=["fsdp", "fsdp-async", "deepspeed"],
)
def test_disk_full_mid_save_keeps_the_previous_checkpoint(
    backend, extra, then_resume, small_disk, demo_dataset, capfd, monkeypatch
):
    """With checkpoint.async the write fails in the background, and the ranks learn it at different
    moments: here the failed write takes 1 s more to report and rank 1 is held 3 s before step 7's
    update, so rank 1 knows at step 7 and rank 0 not yet. Every rank must still stop at the same step
    with the same message (a rank stopping alone leaves the other waiting in the step's collectives,
    and the launcher reports a lost rank instead)."""
    if extra:
        monkeypatch.setenv(SLEEP_IN_SAVE_ENV, "6:1")
        monkeypatch.setenv(STALL_ENV, "1:7:3")
    run_dir = small_disk
    args = [f"run.dir={run_dir}", f"data.path={demo_dataset.path}", *BASE_OVERRIDES, "train.max_steps=8",
            "checkpoint.every_steps=3", "checkpoint.keep_last=1", f"parallel.backend={backend}",
            f"parallel.timeout_s={TIMEOUT_S}", *extra]  # fmt: skip
    code = cli_main(["train", "tiny", *args, "--nproc", "2"])
    err = capfd.readouterr().err
    assert code == 1, err  # a full disk is not the user's mistake: under SLURM the job is requeued
    message = next((line for line in err.splitlines() if "could not be written" in line), err)
    assert "the disk (or the quota) is full: a SLURM job is requeued" in message, message
    assert f"checkpoint step 6 could not be written to {run_dir / 'checkpoints' / 'step_00000006'}" in message
    assert "MiB free there" in message and "step_00000003 stays the newest complete checkpoint" in message
    assert not (run_dir / "checkpoints" / "step_00000006").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert newest_valid_step(run_dir / "checkpoints").step == 3
    if not then_resume:  # the resume path is the backend's usual one, checked once
        return
    # With room again, the run resumes from step 3.
    subprocess.run(["mount", "-o", "remount,size=64m", str(run_dir / "checkpoints")], check=True)
    code = cli_main(["train", "tiny", *args, "--nproc", "2"])
    assert code == 0
    assert resume_step(since_last_start(read_metrics(run_dir))) == 3


# --- damaged data ----------------------------------------------------------------------------------


def test_missing_shard_fails_before_any_model_is_built(demo_dataset, tmp_path, capfd):
    data = tmp_path / "data"
    shutil.copytree(demo_dataset.path, data)
    (data / "train" / "shard.00000.mds").unlink()
    code = cli_main(["train", "tiny", f"run.dir={tmp_path / 'run'}", f"data.path={data}", "--nproc", "2"])
    err = capfd.readouterr().err
    assert code == 2
    assert f"shard '{data / 'train' / 'shard.00000.mds'}' is missing" in err
    rank_log = tmp_path / "run" / "logs" / "rank0.log"  # the launcher checks the data before starting ranks
    assert not rank_log.exists() or "model:" not in rank_log.read_text()


def test_a_transient_read_error_is_retried_and_changes_no_loss(straight, demo_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(READ_ERROR_ENV, "1:3")  # rank 1's first three sample reads fail with EIO
    run_dir = tmp_path / "run"
    records = train(run_dir, demo_dataset.path, overrides=overrides("fsdp", "data.read_retry_wait_s=0.01"))
    assert by_step(records) == by_step(read_metrics(straight["fsdp"]))
    log = (run_dir / "logs" / "rank1.log").read_text()
    assert "injected read error" in log and "try 4 of 6" in log and "try 5 of 6" not in log, log


def test_a_read_that_keeps_failing_stops_the_run_to_be_requeued_not_as_a_user_error(
    demo_dataset, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv(READ_ERROR_ENV, "0:1000")
    extra = ["train.max_steps=2", "data.read_retries=2", "data.read_retry_wait_s=0.01"]
    code = cli_main(["train", "tiny", f"run.dir={tmp_path / 'run'}", f"data.path={demo_dataset.path}",
                     *BASE_OVERRIDES, *extra, "--nproc", "2"])  # fmt: skip
    err = capfd.readouterr().err
    assert code == 1, err  # a failure (requeued under SLURM), not a user error (2, never requeued)
    assert "failed 3 times (OSError: [Errno 5] test hook: injected read error)" in err, err
    assert "could not be read (filesystem or network)" in err, err


# --- non-finite losses -----------------------------------------------------------------------------

SLOW_CHECKSUM_S = 2
ROLLBACK_TIMEOUT_S = 10
"""A rollback's checkpoint (9 files) checked on one rank would keep the others waiting 18 s > 10 s."""
NAN_RUN = [
    "train.max_steps=8",
    "checkpoint.every_steps=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
]


@pytest.fixture(scope="module")
def never_saw_the_batch(demo_dataset, tmp_path_factory) -> dict[str, dict[int, float]]:
    """Per backend: the losses of a run told to skip global batch NAN_BATCH (train.skip_batches)."""
    runs = {}
    for backend in ("fsdp", "deepspeed"):
        run_dir = tmp_path_factory.mktemp(f"skip-{backend}")
        extra = [*NAN_RUN, f"parallel.backend={backend}", f"train.skip_batches=[{NAN_BATCH}]"]
        runs[backend] = by_step(train(run_dir, demo_dataset.path, nproc=2, overrides=extra))
    return runs


def test_nonfinite_loss_stops_the_run_naming_the_step(demo_dataset, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(NAN_AT_BATCH_ENV, str(NAN_BATCH))
    # Step 5 does not log: the loop learns of it a step late, and still names it.
    args = [
        f"run.dir={tmp_path}",
        f"data.path={demo_dataset.path}",
        *BASE_OVERRIDES,
        *NAN_RUN,
        "log.every_steps=4",
    ]
    code = cli_main(["train", "tiny", *args, "--nproc", "2"])
    err = capfd.readouterr().err
    assert code == 1
    assert f"non-finite loss nan (gradient norm nan) at step 5, global batch {NAN_BATCH}" in err
    assert max(by_step(read_metrics(tmp_path))) == 4


@pytest.mark.parametrize(
    ("mode", "backend"),
    [("skip_batch", "fsdp"), ("rollback", "fsdp"), ("skip_batch", "deepspeed"), ("rollback", "deepspeed")],
)
def test_skip_batch_and_rollback_equal_a_run_that_never_saw_the_batch(
    mode, backend, never_saw_the_batch, demo_dataset, tmp_path, monkeypatch
):
    """skip_batch reads each step's loss at once; rollback logs every other step here, so that step 5's
    report is read a step late (after step 6 trained) and the rollback must undo step 6 as well.

    FSDP's rollback runs on a slow filesystem: each checksum takes 2 s longer (a test hook), so that checking
    the step's 9 files on one rank takes 18 s while the other ranks wait in a collective that times out after
    10 (parallel.timeout_s). The ranks check a share each, and the rollback completes."""
    monkeypatch.setenv(NAN_AT_BATCH_ENV, str(NAN_BATCH))
    extra = [*NAN_RUN, f"parallel.backend={backend}", f"train.on_nonfinite={mode}"]
    if mode == "rollback":
        extra.append("log.every_steps=2")
    if (mode, backend) == ("rollback", "fsdp"):
        monkeypatch.setenv("LLM_TRAIN_TEST_SLOW_CHECKSUMS", str(SLOW_CHECKSUM_S))  # tests/rank_hooks
        extra.append(f"parallel.timeout_s={ROLLBACK_TIMEOUT_S}")
    records = train(tmp_path, demo_dataset.path, nproc=2, overrides=extra)
    events = [r for r in records if r.get("event") in ("nonfinite", "rollback")]
    assert events[0]["event"] == "nonfinite"
    assert (events[0]["step"], events[0]["batch"], events[0]["action"]) == (5, NAN_BATCH, mode)
    if mode == "rollback":
        assert (events[1]["event"], events[1]["step"], events[1]["skipped"]) == ("rollback", 3, [NAN_BATCH])
    reference = never_saw_the_batch[backend]
    logged = by_step(records)
    assert sorted(logged) == ([1, 2, 4, 6, 8] if mode == "rollback" else list(range(1, 9)))
    assert logged == {step: reference[step] for step in logged}


def test_loss_spike_rolls_back_like_a_run_that_never_saw_the_batch(demo_dataset, tmp_path, monkeypatch):
    """A finite spike (x10 on global batch 22, after the 20 steps the spike detector averages over)."""
    spike_run = ["train.max_steps=25", "checkpoint.every_steps=10", *NAN_RUN[2:]]
    reference = by_step(
        train(tmp_path / "ref", demo_dataset.path, overrides=[*spike_run, "train.skip_batches=[22]"])
    )
    monkeypatch.setenv(SPIKE_AT_BATCH_ENV, "22:10")
    extra = [*spike_run, "train.loss_spike_factor=3", "train.on_nonfinite=rollback"]
    records = train(tmp_path / "run", demo_dataset.path, overrides=extra)
    spike = next(r for r in records if r.get("event") == "spike")
    assert (spike["step"], spike["batch"], spike["action"]) == (23, 22, "rollback")
    assert next(r for r in records if r.get("event") == "rollback")["step"] == 20
    assert by_step(records) == reference


def test_too_many_nonfinite_steps_stop_the_run(demo_dataset, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(NAN_AT_BATCH_ENV, "2,3")
    args = [f"run.dir={tmp_path}", f"data.path={demo_dataset.path}", *BASE_OVERRIDES, *NAN_RUN,
            "train.on_nonfinite=skip_batch", "train.max_nonfinite=1"]  # fmt: skip
    assert cli_main(["train", "tiny", *args, "--nproc", "2"]) == 1
    assert (
        "more than train.max_nonfinite=1 bad steps (batches [2] were dropped before)"
        in capfd.readouterr().err
    )


# --- goodput ---------------------------------------------------------------------------------------


def test_goodput_adds_up_over_a_preempted_and_resumed_run(demo_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    extra = overrides("fsdp", "checkpoint.every_steps=4")
    began = time.monotonic()
    proc = start_training(run_dir, demo_dataset.path, extra, {})
    try:
        wait_for(lambda: _train_steps(run_dir) >= 3 or proc.poll() is not None)
        proc.send_signal(signal.SIGUSR2)  # the launcher passes it to both ranks: checkpoint, then stop
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            kill_group(proc)
    first_wall = time.monotonic() - began
    began = time.monotonic()
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=extra)
    second_wall = time.monotonic() - began
    assert [r["event"] for r in records if r.get("event") in ("preempted", "resume", "done")] == [
        "preempted", "resume", "done"
    ]  # fmt: skip
    assert cli_main(["status", str(run_dir), "--json"]) == 0
    goodput = json.loads(capsys.readouterr().out)["goodput"]
    assert goodput["attempts"] == 2
    accounted = goodput["productive_s"] + sum(goodput["lost_s"].values())
    assert accounted == pytest.approx(goodput["allocated_s"], rel=0.01)
    # Allocated is each rank 0's lifetime: within the launchers' wall time, and covering at least the
    # trainer's own timeline in metrics.jsonl (from each "start" event to that attempt's last line).
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    logged = sum(
        records[end - 1]["time"] - records[begin]["time"]
        for begin, end in zip(starts, [*starts[1:], len(records)], strict=True)
    )
    assert logged <= goodput["allocated_s"] <= first_wall + second_wall
    for category in ("startup", "restarts", "checkpoint", "data"):
        assert goodput["lost_s"][category] > 0, category
    assert goodput["productive_s"] > 0 and goodput["lost_s"]["recomputed"] == 0  # the stop saved its step
    assert 0 < goodput["goodput_pct"] < 100
