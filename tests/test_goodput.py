"""Goodput accounting without training: the clock's partition of an attempt, summing attempts across
requeues (restarts, recomputed steps), and `llm-train status` showing it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from launcher.cli import main as cli_main
from trainer.config import load_config, to_yaml
from trainer.resilience.goodput import LEDGER_DIR, GoodputClock, format_goodput, summarize

SLACK = 0.15  # seconds a sleep may overshoot on a busy machine


def _only_record(run_dir: Path) -> dict:
    (path,) = (run_dir / LEDGER_DIR).glob("attempt-*.json")
    return json.loads(path.read_text())


def _write_attempt(run_dir: Path, name: str, started: float, seconds: dict[str, float], **fields) -> None:
    """An attempt record as GoodputClock writes it, with updated = started + the time accounted."""
    folder = run_dir / LEDGER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = {"started": started, "updated": started + sum(seconds.values()), "seconds": seconds}
    record |= {"resumed_from": None, "last_step": None, "productive_at": {}, "outcome": "done", **fields}
    (folder / f"attempt-{name}.json").write_text(json.dumps(record))


def _adds_up(summary: dict) -> bool:
    return abs(summary["allocated_s"] - summary["productive_s"] - sum(summary["lost_s"].values())) < 1e-6


def test_clock_charges_each_phase_and_the_categories_add_up_to_the_attempt(tmp_path):
    clock = GoodputClock(tmp_path, started=time.time() - 0.3)  # 0.3 s of start-up before the clock
    time.sleep(0.1)
    clock.switch("productive")
    time.sleep(0.1)
    with clock.phase("data"):
        time.sleep(0.2)
    time.sleep(0.1)
    clock.step_done(1)
    with clock.phase("checkpoint"):
        time.sleep(0.1)
        clock.checkpointed(1)
    clock.switch("shutdown")
    closed_at = time.time()
    clock.close("done")

    record = _only_record(tmp_path)
    seconds, allocated = record["seconds"], record["updated"] - record["started"]
    assert abs(sum(seconds.values()) - allocated) <= 0.01 * allocated
    assert abs(record["updated"] - closed_at) < 0.05
    assert 0.4 <= seconds["startup"] < 0.4 + SLACK
    assert 0.2 <= seconds["productive"] < 0.2 + SLACK  # the nested data phase is not productive
    assert 0.2 <= seconds["data"] < 0.2 + SLACK
    assert 0.1 <= seconds["checkpoint"] < 0.1 + SLACK
    assert seconds["shutdown"] < 0.05 and seconds["eval"] == seconds["recomputed"] == 0.0
    assert record["productive_at"].keys() == {"1"}
    assert abs(record["productive_at"]["1"] - seconds["productive"]) < 0.01  # all productive time was before
    assert (record["outcome"], record["last_step"], record["resumed_from"]) == ("done", 1, None)


def test_disabled_clock_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clock = GoodputClock(None)
    with clock.phase("productive"):
        clock.step_done(1)
        clock.checkpointed(1)
    clock.rolled_back(0)
    clock.flush()
    clock.close("done")
    assert list(tmp_path.iterdir()) == []


def test_summarize_sums_attempts_and_charges_the_restart_and_redone_steps(tmp_path):
    # Preempted at step 10 after a checkpoint at step 8; the requeued attempt resumes from 8 and finishes.
    first = {"startup": 20, "productive": 100, "data": 5, "checkpoint": 10, "shutdown": 8}
    second = {"startup": 15, "productive": 50, "checkpoint": 5, "shutdown": 2}
    # Named so that the file order is not the start order.
    _write_attempt(tmp_path, "b", 1000.0, first, outcome="preempted", last_step=10, productive_at={"8": 80})
    _write_attempt(tmp_path, "a", 2000.0, second, resumed_from=8, last_step=20, productive_at={"16": 40})
    (tmp_path / LEDGER_DIR / "attempt-c.json").write_text('{"started": ')  # being written: skipped

    summary = summarize(tmp_path)
    assert summary["attempts"] == 2
    assert summary["allocated_s"] == 143 + 72
    assert summary["lost_s"]["recomputed"] == 100 - 80
    assert summary["lost_s"]["restarts"] == 15 + 8
    assert (summary["lost_s"]["startup"], summary["lost_s"]["shutdown"]) == (20, 2)
    assert summary["productive_s"] == 80 + 50
    assert _adds_up(summary)
    assert format_goodput(summary) == (
        "60.5% of 3m35s allocated over 2 attempts productive; lost: restarts 10.7%, startup 9.3%, "
        "recomputed 9.3%, checkpoint 7.0%, data 2.3%, shutdown 0.9%"
    )


def test_summarize_counts_all_productive_time_as_redone_when_the_run_started_over(tmp_path):
    _write_attempt(tmp_path, "1", 1000.0, {"productive": 30}, last_step=5, productive_at={"4": 20})
    _write_attempt(tmp_path, "2", 2000.0, {"productive": 60}, last_step=10)  # fresh start: no checkpoint
    summary = summarize(tmp_path)
    assert (summary["productive_s"], summary["lost_s"]["recomputed"]) == (60, 30)
    assert _adds_up(summary)


def test_summarize_without_records_is_none(tmp_path):
    assert summarize(tmp_path) is None


def test_rollback_moves_productive_time_after_the_checkpoint_to_recomputed(tmp_path):
    clock = GoodputClock(tmp_path, started=time.time())
    clock.switch("productive")
    time.sleep(0.1)
    clock.checkpointed(5)
    time.sleep(0.1)
    clock.checkpointed(7)
    time.sleep(0.1)
    with clock.phase("nonfinite"):
        clock.rolled_back(5)
    clock.switch("shutdown")
    clock.close("done")

    record = _only_record(tmp_path)
    seconds = record["seconds"]
    assert record["productive_at"].keys() == {"5"}  # step 7 was forgotten
    assert abs(record["productive_at"]["5"] - seconds["productive"]) < 0.01
    assert 0.2 <= seconds["recomputed"] < 0.2 + SLACK
    assert 0.1 <= seconds["productive"] < 0.1 + SLACK
    assert record["last_step"] == 5
    assert summarize(tmp_path)["lost_s"]["recomputed"] == seconds["recomputed"]


def test_killed_attempt_counts_up_to_its_last_flush(tmp_path):
    started = time.time()
    clock = GoodputClock(tmp_path, started=started, flush_every_s=0.2)
    clock.switch("productive")
    clock.step_done(1)
    assert not (tmp_path / LEDGER_DIR).exists()  # no flush before flush_every_s
    time.sleep(0.25)
    clock.step_done(2)  # flushes
    time.sleep(0.3)  # then the process is killed: this time is never written

    record = _only_record(tmp_path)
    assert (record["outcome"], record["last_step"]) == ("running", 2)
    summary = summarize(tmp_path)
    assert 0.25 <= summary["allocated_s"] < 0.25 + SLACK
    assert summary["allocated_s"] < time.time() - started - 0.25
    assert _adds_up(summary)


def test_status_shows_goodput(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_config("tiny", [f"run.dir={run_dir}", "data.path=/d", "train.max_steps=20"])
    (run_dir / "config.yaml").write_text(to_yaml(config))
    (run_dir / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n{"step": 1, "loss": 5.0}\n')
    assert cli_main(["status", str(run_dir)]) == 0
    assert not any(line.startswith("goodput") for line in capsys.readouterr().out.splitlines())

    _write_attempt(run_dir, "1", 1000.0, {"startup": 10, "productive": 80}, outcome="preempted", last_step=8)
    _write_attempt(run_dir, "2", 2000.0, {"startup": 10, "productive": 100}, resumed_from=8, last_step=20)
    assert cli_main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["goodput"] == summarize(run_dir) and status["goodput"]["attempts"] == 2
    assert cli_main(["status", str(run_dir)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("goodput"))
    assert row.split(None, 1)[1] == format_goodput(summarize(run_dir))


def test_time_lost_is_charged_to_the_fault_that_ended_each_attempt(tmp_path):
    """Each requeued attempt's redone work, its shut-down and the next attempt's start-up go to the kind of
    fault that requeues.json recorded for it (matched by job and allocation); the last attempt is no fault."""
    events = [
        {"job_id": "7", "restart_count": 0, "step": 0, "signal": "SIGTERM"},
        {"job_id": "7", "restart_count": 1, "step": 9, "signal": "failure",
         "cause": "rank 1 was killed by SIGKILL in 'checkpoint save' of step 9 (pid 5 on node2)"},
        {"job_id": "7", "restart_count": 2, "step": 15, "signal": "failure",
         "cause": "rank 0 failed in 'checkpoint save' of step 15 (checkpoint step 15 could not be written to /r "
                  "(rank 0: [Errno 28] No space left on device); 0.0 MiB free there; the disk (or the quota) is full: "
                  "a SLURM job is requeued and resumes from it; free space if it stays full)"},
    ]  # fmt: skip
    (tmp_path / "requeues.json").write_text(json.dumps({"count": 3, "events": events}))
    job = {"job_id": "7"}
    _write_attempt(tmp_path, "0", 1000.0, {"startup": 5, "shutdown": 2}, restart_count=0, **job)
    _write_attempt(tmp_path, "1", 2000.0, {"startup": 7, "productive": 30, "shutdown": 1}, restart_count=1,
                   last_step=9, productive_at={"6": 20.0}, **job)  # fmt: skip
    _write_attempt(tmp_path, "2", 3000.0, {"startup": 11, "productive": 40, "shutdown": 3}, restart_count=2,
                   resumed_from=6, last_step=15, productive_at={"12": 36.0}, **job)  # fmt: skip
    _write_attempt(tmp_path, "3", 4000.0, {"startup": 13, "productive": 90}, restart_count=3, resumed_from=12,
                   last_step=60, **job)  # fmt: skip

    faults = summarize(tmp_path)["faults"]
    assert faults == {
        "preempted (SIGTERM)": {"count": 1, "lost_s": 0 + 2 + 7},  # nothing redone, shut-down, next start-up
        "rank killed (SIGKILL)": {"count": 1, "lost_s": (30 - 20) + 1 + 11},  # steps 7-9 redone
        "disk full": {"count": 1, "lost_s": (40 - 36) + 3 + 13},  # steps 13-15 redone
    }
    assert "per fault: rank killed (SIGKILL) x1 0m22s, disk full x1 0m20s, preempted (SIGTERM) x1 0m09s" in (
        format_goodput(summarize(tmp_path))
    )
    # An attempt killed during start-up, before it wrote its record: its fault still counts, with the start-up
    # of the attempt that followed.
    (tmp_path / LEDGER_DIR / "attempt-0.json").unlink()
    assert summarize(tmp_path)["faults"]["preempted (SIGTERM)"] == {"count": 1, "lost_s": 7}
