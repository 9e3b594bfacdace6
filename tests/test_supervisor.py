"""The per-task supervisor: signals reach the trainer whenever they arrive; the requeue rules by exit status.

The end-to-end cases (a rank killed by SIGABRT in a 2-node job is requeued and resumes exactly; a user error is
not requeued; the cap holds) run on the local SLURM cluster in tests/slurm/test_submit.py. Here the same code
runs without SLURM's controller: `scontrol` is absent or refuses, which `requeue` reports without raising.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from trainer.resilience.heartbeat import first_stopped, record_exit
from trainer.resilience.requeue import REQUEUES_FILE, requeue
from trainer.resilience.supervisor import child_environment, decide, supervise

CHILD = textwrap.dedent(
    """
    import sys, time
    print("starting", flush=True)
    time.sleep(float(sys.argv[1]))  # start-up: no handler yet, the signal must wait
    from trainer.resilience.preemption import StopSignals
    signals = StopSignals()
    deadline = time.monotonic() + 10
    while not signals.received and time.monotonic() < deadline:
        time.sleep(0.01)
    print("received", signals.received, flush=True)
    signals.restore()
    import os, signal, threading
    threading.Thread(target=time.sleep, args=(1,)).start()  # threads do not block the signals
    os.kill(os.getpid(), signal.SIGTERM)  # after the run: no effect
    time.sleep(0.3)
    print("finished", flush=True)
    """
)
SUPERVISOR = textwrap.dedent(
    """
    import sys
    from trainer.resilience.supervisor import run_child
    sys.exit(run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]], dict(__import__("os").environ)))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_a_stop_signal_during_start_up_waits_for_the_trainers_handler(sig):
    """Sent to the task before the trainer has its handler: neither lost nor fatal, handled once it is ready;
    and once the run is over, a late stop signal does not kill the trainer."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, CHILD, "1.5"], stdout=subprocess.PIPE, text=True
    )
    assert (
        proc.stdout.readline() == "starting\n"
    )  # the child sleeps with the signal blocked (not a fixed wait)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert out.split() == ["received", str(int(sig)), "finished"]


@pytest.fixture
def slurm_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A run folder inside a (pretend) allocation: a job id without a controller to talk to."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no scontrol
    run_dir = tmp_path / "run"
    (run_dir / "heartbeats").mkdir(parents=True)
    beat = {"rank": 1, "phase": "forward/backward", "step": 7, "since": 0, "time": 0, "pid": 99, "host": "n2",
            "attempt": "4242.0"}  # fmt: skip
    (run_dir / "heartbeats" / "rank00001.json").write_text(json.dumps(beat))
    return run_dir


def markers(run_dir: Path) -> dict[str, str]:
    return {path.name: path.read_text().strip() for path in run_dir.glob(".requeue-*")}


def test_a_finished_run_is_never_requeued(slurm_job):
    assert decide(slurm_job, 1, 0, max_requeues=5) is None
    assert markers(slurm_job) == {} and not (slurm_job / REQUEUES_FILE).exists()


def test_a_user_error_is_recorded_so_that_no_task_requeues(slurm_job):
    line = decide(slurm_job, 1, 2, max_requeues=5)
    assert "user error" in line and "not requeueing" in line
    assert markers(slurm_job) == {".requeue-4242-0": "user error: not requeued"}
    # The other rank, failing because this one left its collective, defers to that decision.
    started = time.monotonic()
    other = decide(slurm_job, 0, 3, max_requeues=5)
    assert time.monotonic() - started < 2, "a decision already made must not be waited for"
    assert "has decided (user error: not requeued)" in other, other
    assert not (slurm_job / REQUEUES_FILE).exists()


def test_a_rank_killed_by_sigabrt_is_named_from_its_heartbeat_and_requeued(slurm_job):
    line = decide(slurm_job, 1, -signal.SIGABRT, max_requeues=5)
    assert line.startswith("rank 1 was killed by SIGABRT in 'forward/backward' of step 7 (pid 99 on n2)"), (
        line
    )
    assert "scontrol requeue 4242 failed" in line, line  # attempted; no controller here
    assert markers(slurm_job) == {".requeue-4242-0": "requeue after failure"}
    history = json.loads((slurm_job / REQUEUES_FILE).read_text())
    assert history["count"] == 0 and history["events"] == [], "a requeue that failed is not counted"


def test_a_survivor_aborted_by_nccl_names_the_rank_that_stopped_first(slurm_job, monkeypatch):
    """NCCL's watchdog ends the survivors of a lost rank by SIGABRT too: whichever task decides, the cause
    recorded is the rank whose trainer exited (or whose heartbeat stopped) first, never the survivor."""
    monkeypatch.setattr("trainer.resilience.supervisor.PEER_DECISION_WAIT_S", 0.5)
    now = time.time()
    for rank in (0, 2):  # survivors, still beating until the watchdog aborts them
        beat = {"rank": rank, "phase": "step report all-reduce", "step": 7, "since": now - 30, "time": now,
                "pid": 100 + rank, "host": "n1", "attempt": "4242.0", "interval_s": 5.0}  # fmt: skip
        (slurm_job / "heartbeats" / f"rank{rank:05d}.json").write_text(json.dumps(beat))
    record_exit(slurm_job, 1, -signal.SIGKILL)  # rank 1's trainer was killed: its supervisor saw it first
    time.sleep(0.01)
    record_exit(slurm_job, 0, -signal.SIGABRT)
    line = decide(slurm_job, 0, -signal.SIGABRT, max_requeues=5)
    assert line.startswith(
        "rank 1 was killed by SIGKILL in 'forward/backward' of step 7 (pid 99 on n2) first; "
        "rank 0 was killed by SIGABRT after it"
    ), line
    # Without its exit on record (its node went down), rank 1 still stopped first: its heartbeat went stale.
    (slurm_job / "heartbeats" / "rank00001.exit.json").unlink()
    assert first_stopped(slurm_job)[0] == 1
    # A rank that failed because another did (gloo: its collective broke, exit 3) is never the cause, even
    # when its exit is on record before the culprit's.
    record_exit(slurm_job, 0, 3)
    time.sleep(0.01)
    record_exit(slurm_job, 1, -signal.SIGKILL)  # reaped later than rank 0's exit
    assert first_stopped(slurm_job)[0] == 1
    # A rank that aborts itself first is its own cause (the others still beat).
    for path in slurm_job.glob("heartbeats/rank0000[01].*"):
        path.unlink()
    record_exit(slurm_job, 2, -signal.SIGABRT)
    assert first_stopped(slurm_job)[0] == 2


def test_a_heartbeat_left_by_an_earlier_attempt_names_nothing(slurm_job, monkeypatch):
    """The requeued attempt (restart 1) dies before its first heartbeat: the killed attempt's file (pid 99,
    step 7) must not be taken for its cause."""
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    line = decide(slurm_job, 1, 1, max_requeues=5)
    assert line.startswith("rank 1 exited with code 1 on "), line
    assert "(no heartbeat)" in line and "pid 99" not in line and "step 7" not in line, line


def test_what_a_dead_trainer_started_ends_with_it():
    """A trainer's helpers (loader workers, W&B's service) must not outlive it and hold the next attempt's port."""
    trainer = textwrap.dedent(
        """
        import subprocess, sys
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(helper.pid, flush=True)
        sys.exit(1)
        """
    )
    script = "import sys; from trainer.resilience.supervisor import run_child; "
    script += "sys.exit(run_child([sys.executable, '-c', sys.argv[1]], dict(__import__('os').environ)))"
    done = subprocess.run([sys.executable, "-c", script, trainer], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    helper = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _running(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(helper), "the trainer's helper outlived it"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_requeue_cap_holds_for_failures(slurm_job):
    (slurm_job / REQUEUES_FILE).write_text(json.dumps({"count": 2, "events": []}))
    line = decide(slurm_job, 1, 1, max_requeues=2)
    assert "slurm.max_requeues=2 reached: not requeueing" in line, line


def test_nccl_settings_are_defaults_the_site_can_override(monkeypatch, tmp_path):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    env = child_environment(tmp_path)
    assert env["NCCL_DEBUG"] == "INFO" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(env["TORCH_FR_BUFFER_SIZE"]) > 0  # torch 2.14's name (TORCH_NCCL_TRACE_BUFFER_SIZE before 2.7)
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "nccl_traces" / "rank_")


def test_supervise_runs_the_trainer_and_reports_its_user_error(tmp_path, monkeypatch, rank_server):
    """The whole path without SLURM: a config error in the trainer is exit 2 from the task, nothing decided.
    What this process had started before (here: the session's rank server) is not the trainer's to end."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code = supervise(["tiny", f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'missing'}"])
    assert code == 2
    assert rank_server.process.poll() is None, "the supervisor ended a process the trainer had not started"
    assert markers(tmp_path / "run") == {}
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        assert signal.getsignal(sig) == signal.SIG_IGN
        signal.signal(sig, signal.SIG_DFL)
    assert os.environ.get("SLURM_JOB_ID") is None


@pytest.mark.parametrize(
    ("scontrol", "counted"),
    [
        # The requeue's SIGTERM reaches scontrol before it exits: it must be blocked, so scontrol finishes.
        ('[ "$1" = requeue ] && kill -TERM $$; exit 0', 1),
        # scontrol dies anyway (SIGKILL): the job's record says it was requeued.
        ('[ "$1" = requeue ] && kill -KILL $$; echo "JobId=4242 JobState=PENDING Restarts=1"', 1),
        # scontrol dies and the job is not requeued: not counted.
        ('[ "$1" = requeue ] && kill -KILL $$; echo "JobId=4242 JobState=RUNNING Restarts=0"', 0),
    ],
    ids=["sigterm", "sigkill-requeued", "sigkill-not-requeued"],
)
def test_a_requeue_that_ends_scontrol_with_the_job_still_counts(slurm_job, tmp_path, scontrol, counted):
    """`scontrol requeue` runs inside the job it requeues, so SLURM's kill of the job's processes can end it
    before it reports success: requeues.json once lost such a requeue (count 0 for a job that restarted)."""
    fake = tmp_path / "bin" / "scontrol"  # stands for the controller's reply; the kill is what is tested
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!/bin/bash\n{scontrol}\n")
    fake.chmod(0o755)
    requeued, why = requeue(slurm_job, max_requeues=5, step=7, reason="failure", cause="rank 1 ...")
    assert requeued == bool(counted), why
    history = json.loads((slurm_job / REQUEUES_FILE).read_text())
    assert history["count"] == counted and len(history["events"]) == counted, history
    if counted:
        assert history["events"][0]["restart_count"] == 0, history


def test_the_batch_steps_watcher_requeues_a_job_whose_tasks_srun_killed(slurm_job, tmp_path):
    """srun answers SIGTERM with SIGKILL to every task: the watcher in the batch step then requeues, once per
    allocation, and not when the trainer had decided in time or `llm-train cancel` stopped the job."""
    from trainer.config import load_config
    from trainer.resilience.requeue import cancel_marker, record_decision
    from trainer.resilience.stopped_job import requeue_unless_decided

    fake = tmp_path / "bin" / "scontrol"  # stands for the controller: the requeue succeeds
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/bash\nexit 0\n")
    fake.chmod(0o755)
    config = load_config("tiny", [f"run.dir={slurm_job}", "data.path=/d", "train.max_steps=20"])
    (slurm_job / "metrics.jsonl").write_text('{"step": 4, "loss": 5.0}\n{"step": 5, "lo')  # cut by the kill
    why = requeue_unless_decided(config, "SIGTERM", grace_s=0.2)
    assert why is not None and "requeued job 4242" in why, why
    history = json.loads((slurm_job / REQUEUES_FILE).read_text())
    assert history["count"] == 1 and history["events"][0]["signal"] == "SIGTERM", history
    assert history["events"][0]["step"] == 4 and "srun" in history["events"][0]["cause"], history
    assert requeue_unless_decided(config, "SIGTERM", grace_s=0.2) is None  # decided already: nothing more
    assert json.loads((slurm_job / REQUEUES_FILE).read_text())["count"] == 1

    for marker in slurm_job.glob(".requeue-*"):
        marker.unlink()
    (slurm_job / REQUEUES_FILE).unlink()
    started = time.monotonic()
    threading.Timer(
        0.3, record_decision, (slurm_job, "requeue after SIGTERM")
    ).start()  # the trainer, in time
    assert requeue_unless_decided(config, "SIGTERM", grace_s=5) is None
    assert time.monotonic() - started < 2 and not (slurm_job / REQUEUES_FILE).exists()

    for marker in slurm_job.glob(".requeue-*"):
        marker.unlink()
    cancel_marker(slurm_job, "4242").write_text("")
    why = requeue_unless_decided(config, "SIGTERM", grace_s=0.1)
    assert "not requeued" in why and not (slurm_job / REQUEUES_FILE).exists()
    (slurm_job / "metrics.jsonl").write_text('{"step": 20, "loss": 5.0}\n{"event": "done", "step": 20}\n')
    (slurm_job / ".cancel-4242").unlink()
    assert "had finished" in requeue_unless_decided(config, "SIGTERM", grace_s=0.1)
    assert not (slurm_job / REQUEUES_FILE).exists()
