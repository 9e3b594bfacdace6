"""`llm-train submit`, `status` and `cancel` against the local SLURM cluster (slurm/cluster.sh).

One module-scoped fixture submits every job at once and a watcher thread follows them (and sends the
signals the preemption, cap and cancel scenarios need at the right step), while the local reference runs
train on the login node; the tests then check what each job did. Jobs that must stay busy until a signal
arrives are slowed down by tests/slurm/hooks/sitecustomize.py (timing only, never the numbers).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mds_fixtures import write_dataset
from slurm_helpers import TERMINAL_JOB_STATES, TMP_BASE, Job, node_states, run
from trainer_runs import BASE_OVERRIDES, losses, read_metrics, train

from launcher.cli import main as cli_main
from trainer.data.read_retry import READ_ERROR_ENV
from trainer.resilience.fault_cost import fault_kind
from trainer.resilience.fault_injection import (
    ABORT_ENV,
    DISK_FULL_ENV,
    KILL_IN_SAVE_ENV,
    SCANCEL_AT_START_ENV,
    USER_ERROR_ENV,
)

pytestmark = pytest.mark.slurm

HOOKS = Path(__file__).parent / "hooks"
TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
STEPS = 60
DS_STEPS = 20
BATCH = ["train.global_batch_size=8", "train.micro_batch_size=4"]
FSDP = [*BASE_OVERRIDES, *BATCH, f"train.max_steps={STEPS}"]
DEEPSPEED = [*BASE_OVERRIDES, *BATCH, f"train.max_steps={DS_STEPS}", "parallel.backend=deepspeed"]
WATCH_S = 600  # every job of the module must end within this (the 2 nodes run one job each at a time)


def cli(*args: str) -> tuple[int, str, str]:
    """`llm-train ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def write_profile(path: Path, nodes: int, time_limit: str, setup: list[str], **keys: int) -> Path:
    """A cluster profile for the local cluster (JSON is YAML)."""
    profile = {
        "partition": "debug",
        "nodes": nodes,
        "cpus_per_task": 1,
        "mem_gb": 2,
        "time": time_limit,
        **keys,
    }
    path.write_text(json.dumps({**profile, "setup": setup}, indent=1))
    return path


def slow_steps(seconds: float, allocations: int | None = None) -> list[str]:
    """Profile setup lines that slow every step down (see hooks/sitecustomize.py)."""
    setting = f"{seconds}:{allocations}" if allocations else str(seconds)
    return [
        f"export PYTHONPATH={HOOKS}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export LLM_TEST_SLOW_STEPS={setting}",
    ]


@dataclass
class Tracked:
    """A submitted job, followed by the watcher; `driver` may act on it (send signals) at each poll."""

    name: str
    run_dir: Path
    job_id: str
    driver: Callable[[Tracked], None] | None = None
    states: list[str] = field(default_factory=list)
    final: dict[str, str] | None = None
    notes: dict[str, object] = field(default_factory=dict)
    error: BaseException | None = None
    out: Path | None = None  # the job's output; default: submitit's log of task 0

    @property
    def job(self) -> Job:
        return Job(self.job_id, self.out or self.run_dir / "submitit" / f"{self.job_id}_0_log.err")

    def records(self) -> list[dict]:
        """metrics.jsonl's complete lines: the trainer appends to it while the watcher reads, and a line is
        complete once its newline is there (a line being written may already end with a '}')."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().split("\n")[:-1]]

    def events(self, name: str) -> list[dict]:
        return [r for r in self.records() if r.get("event") == name]

    def explain(self) -> str:
        return (
            f"job {self.name} ({self.job_id}) states {self.states}, final {self.final}, notes {self.notes}, "
            f"error {self.error!r}; run dir {self.run_dir}; output:\n{self.job.output()[-3000:]}"
        )


class Watcher(threading.Thread):
    """Polls `scontrol show job` for every tracked job, runs the drivers, records the final states."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: dict[str, Tracked] = {}
        self.started = time.monotonic()
        self.deadline = self.started + WATCH_S
        self.lock = threading.Lock()

    def add(self, tracked: Tracked) -> Tracked:
        with self.lock:
            self.jobs[tracked.name] = tracked
        return tracked

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            with self.lock:
                pending = [t for t in self.jobs.values() if t.final is None]
            for tracked in pending:
                self._poll(tracked)
            time.sleep(0.3)

    def _poll(self, tracked: Tracked) -> None:
        info = tracked.job.info()
        if info is None:  # forgotten by the controller: its last state was final
            if tracked.states and tracked.states[-1] in TERMINAL_JOB_STATES:
                tracked.final = {
                    "JobState": tracked.states[-1],
                    "Restarts": tracked.notes.get("restarts", "?"),
                }
            return
        state = info["JobState"]
        if not tracked.states or tracked.states[-1] != state:
            tracked.states.append(state)
            if state == "RUNNING":
                tracked.notes.setdefault("started", []).append(time.time())
        tracked.notes["restarts"] = info.get("Restarts")
        if tracked.driver is not None and tracked.error is None:
            try:
                tracked.driver(tracked)
            except BaseException as error:  # shown by the test that owns the job
                tracked.error = error
        if state in TERMINAL_JOB_STATES:
            # A job that requeues itself passes through terminal-looking states only with Restarts changing;
            # COMPLETED/FAILED with no pending requeue is final.
            time.sleep(0.5)
            again = tracked.job.info()
            if again is None or again["JobState"] in TERMINAL_JOB_STATES:
                tracked.final = again or info
                tracked.notes["ended_s"] = round(time.monotonic() - self.started, 1)

    def wait(self, tracked: Tracked, timeout: float = WATCH_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while tracked.final is None and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.3)
        if tracked.final is None:
            tracked.job.cancel()
            raise AssertionError(f"job did not end in time: {tracked.explain()}")
        return tracked.final


def train_steps_since_last_start(tracked: Tracked) -> list[int]:
    records = tracked.records()
    start = max((i for i, r in enumerate(records) if r.get("event") == "start"), default=0)
    return [r["step"] for r in records[start:] if "loss" in r]


def preempt_driver(tracked: Tracked) -> None:
    """One `scancel --signal=USR2` once the first allocation has logged step 5."""
    if "signalled_at" not in tracked.notes and max(train_steps_since_last_start(tracked), default=0) >= 5:
        run(["scancel", "--signal=USR2", tracked.job_id])
        tracked.notes["signalled_at"] = max(train_steps_since_last_start(tracked))


def scancel_driver(tracked: Tracked) -> None:
    """A plain `scancel` (SIGTERM, how most sites preempt) once the first allocation has logged step 5."""
    if "signalled_at" not in tracked.notes and max(train_steps_since_last_start(tracked), default=0) >= 5:
        run(["scancel", tracked.job_id])
        tracked.notes["signalled_at"] = max(train_steps_since_last_start(tracked))


def cap_driver(tracked: Tracked) -> None:
    """Preempt in the first allocation, then again in the second (slurm.max_requeues=1)."""
    starts = len(tracked.events("start"))
    steps = train_steps_since_last_start(tracked)
    sent = tracked.notes.setdefault("signals", [])
    if len(sent) < starts and len(steps) >= 3:  # one signal per allocation, 3 steps into it
        run(["scancel", "--signal=USR2", tracked.job_id])
        sent.append(steps[-1])


def llm_train(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script in a fresh process (safe from the watcher thread, unlike `cli`)."""
    exe = Path(sys.executable).with_name("llm-train")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def cancel_driver(tracked: Tracked) -> None:
    """Once training runs: `status --json`, then `cancel`; afterwards the job must never be pending again."""
    if "cancelled_at" in tracked.notes:
        if tracked.states[-1] == "PENDING":
            tracked.notes["pending_after_cancel"] = True
        return
    if len(train_steps_since_last_start(tracked)) >= 3:
        status = llm_train("status", str(tracked.run_dir), "--json")
        tracked.notes["status"] = json.loads(status.stdout) if status.returncode == 0 else status.stderr
        tracked.notes["cancel"] = llm_train("cancel", str(tracked.run_dir))
        tracked.notes["cancelled_at"] = time.monotonic()


def gauntlet_driver(tracked: Tracked) -> None:
    """Node 2 is drained while the third allocation runs, so that the fourth comes back on node 1 alone; it
    is resumed once the job has ended (and by the fixture, whatever happens)."""
    running = tracked.states and tracked.states[-1] == "RUNNING"
    if tracked.notes.get("restarts") == "2" and running and "drained" not in tracked.notes:
        run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=llm-training test: 2 -> 1 node"])
        tracked.notes["drained"] = time.monotonic()
    if tracked.states and tracked.states[-1] in TERMINAL_JOB_STATES and "drained" in tracked.notes:
        resume_node2()


def submit_when_idle(watcher: Watcher, name: str, run_dir: Path, args: list[str]) -> None:
    """Once every job the watcher follows has ended, `llm-train ARGS` (a submit) and follow that job too."""

    def busy() -> bool:  # a job still followed, or a node not yet idle again (a job's epilog runs)
        return any(t.final is None for t in watcher.jobs.values()) or any(
            state != "idle" for state in node_states().values()
        )

    while time.monotonic() < watcher.deadline and busy():
        time.sleep(0.5)
    result = llm_train(*args)
    job_id = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else ""
    assert job_id.isdigit(), f"submit {name} exited {result.returncode}: {result.stderr}"
    watcher.add(Tracked(name, run_dir, job_id, gauntlet_driver))


def resume_node2() -> None:
    run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=False)


@dataclass
class Module:
    root: Path
    data: Path
    watcher: Watcher
    local_fsdp: list[dict]
    local_deepspeed: list[dict]
    second_submit: tuple[int, str, str]  # `submit` again into the preempt job's run dir while it is queued
    gauntlet_thread: threading.Thread  # submits the gauntlet job once the others have ended

    def __getitem__(self, name: str) -> Tracked:
        return self.watcher.jobs[name]


@pytest.fixture(scope="module")
def runs(slurm_cluster, request) -> Module:
    """Every job of the module, submitted at once, and the local reference runs trained meanwhile (over 60 s of
    setup: one set of jobs and runs for the module's 20 tests instead of one per test)."""
    TMP_BASE.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="test_submit-", dir=TMP_BASE))
    failed_before = request.session.testsfailed
    data = write_dataset(root / "data", train_samples=512, val_samples=32, seq_len=64, vocab_size=512)
    watcher = Watcher()

    def submit(name: str, cluster: str, overrides: list[str], *options: str, driver=None) -> None:
        run_dir = root / name
        code, out, err = cli(
            "submit",
            "tiny",
            f"run.dir={run_dir}",
            f"data.path={data}",
            *overrides,
            "--cluster",
            cluster,
            *options,
        )
        assert code == 0, f"submit {name} exited {code}: {err}"
        job_id = out.strip().splitlines()[-1]
        assert job_id.isdigit(), f"submit's last line of stdout is not a job id: {out}"
        watcher.add(Tracked(name, run_dir, job_id, driver))

    # The time-limit job first: it has the longest fixed wait. SIGUSR2 1 s before the limit. SLURM checks limits
    # every 30 s and sends the signal at the first check within lead + 30 s of the limit: 89-119 s after the start
    # for a 2-minute limit. (With a 1-minute limit the second allocation would have to start up and finish within
    # 29 s to escape its own signal; on a loaded 2-core machine that took 18-25 s: too close.) The first allocation
    # is slowed to 2 s/step, so it cannot finish before its signal; the second runs at full speed.
    # TMPDIR outside the job container: on this SLURM (22.05) the signal also ends the job's extern step, which
    # deletes the job's private /tmp, and a signal that lands during start-up would then break torch's imports.
    tmpdir = [f"export TMPDIR={root}/tmp/$SLURM_JOB_ID", 'mkdir -p "$TMPDIR"']
    time_profile = write_profile(root / "two-minutes.yaml", 1, "00:02:00", [*tmpdir, *slow_steps(2.0, 1)])
    submit("timelimit", str(time_profile), [*FSDP, "slurm.signal_lead_s=1"])
    slow_2 = write_profile(root / "slow-2-nodes.yaml", 2, "00:05:00", slow_steps(0.25, 1))
    submit("preempt", str(slow_2), FSDP, driver=preempt_driver)
    # Failures outside Python: rank 1 calls os.abort() (what NCCL's watchdog does) at step 7 of the first
    # allocation; a user error (exit 2) on rank 1 at step 3; an abort in every allocation against a cap of 1.
    abort_2 = write_profile(
        root / "abort-2-nodes.yaml", 2, "00:05:00", [*slow_steps(0.25, 1), f"export {ABORT_ENV}=1:7"]
    )
    submit("abort", str(abort_2), [*FSDP, "checkpoint.every_steps=3"])
    user_error_2 = write_profile(root / "user-error.yaml", 2, "00:05:00", [f"export {USER_ERROR_ENV}=1:3"])
    submit("usererror", str(user_error_2), FSDP)
    abort_always = write_profile(root / "abort-always.yaml", 1, "00:05:00", [f"export {ABORT_ENV}=0:3:99"])
    submit("abortcap", str(abort_always), [*FSDP, "slurm.max_requeues=1", "checkpoint.every_steps=2"])
    again = cli(
        "submit", "tiny", f"run.dir={root / 'preempt'}", f"data.path={data}", *FSDP, "--cluster", str(slow_2)
    )
    slow_1 = write_profile(root / "slow-1-node.yaml", 1, "00:05:00", slow_steps(0.3))
    slow_1_once = write_profile(root / "slow-1-node-once.yaml", 1, "00:05:00", slow_steps(0.25, 1))
    submit("scancel", str(slow_1_once), FSDP, driver=scancel_driver)
    submit("cap", str(slow_1), [*FSDP, "slurm.max_requeues=1"], driver=cap_driver)
    slower_1 = write_profile(
        root / "slower-1-node.yaml", 1, "00:05:00", slow_steps(1.0)
    )  # cancelled at ~step 3
    submit("cancel", str(slower_1), FSDP, driver=cancel_driver)
    # The plain sbatch template, by hand: one node, preempted like the submitit job.
    template_env = f"ALL,PYTHONPATH={HOOKS},LLM_TEST_SLOW_STEPS=0.25:1,LLM_TRAIN_PYTHON={sys.executable}"
    template_options = ["--partition=debug", "--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=1"]
    template_options += [
        "--cpus-per-task=1",
        "--time=5",
        f"--output={root}/template-%j.out",
        f"--export={template_env}",
    ]
    template = run(["sbatch", "--parsable", *template_options, str(TEMPLATE), "tiny", f"run.dir={root / 'template'}", f"data.path={data}", *FSDP])  # fmt: skip
    template_id = template.stdout.strip().split(";")[0]
    out = root / f"template-{template_id}.out"
    watcher.add(Tracked("template", root / "template", template_id, preempt_driver, out=out))
    submit("fsdp2", "local", FSDP, "--nodes", "2")
    submit("deepspeed2", "local", DEEPSPEED, "--nodes", "2")
    submit("fsdp1", "local", FSDP, "--nodes", "1")
    watcher.start()
    # One 2-node job dealt a fault in each allocation (trainer/resilience/fault_injection.py): a plain scancel
    # during start-up; a transient read error on rank 1, then rank 1 killed by SIGKILL while step 9's checkpoint
    # is written; a full disk at step 15's; then it comes back on 1 node (min_nodes 1, node 2 drained). It is
    # submitted once the other jobs have ended: with min_nodes an allocation takes whatever nodes are free.
    faults = [f"export {SCANCEL_AT_START_ENV}=0", f"export {READ_ERROR_ENV}=1:1:1",
              f"export {KILL_IN_SAVE_ENV}=1:9:1", f"export {DISK_FULL_ENV}=15:2"]  # fmt: skip
    gauntlet = write_profile(root / "gauntlet.yaml", 2, "00:05:00", faults, min_nodes=1)
    gauntlet_args = ["submit", "tiny", f"run.dir={root / 'gauntlet'}", f"data.path={data}", *FSDP,
                     "checkpoint.every_steps=3", "--cluster", str(gauntlet)]  # fmt: skip
    gauntlet_thread = threading.Thread(
        target=submit_when_idle, args=(watcher, "gauntlet", root / "gauntlet", gauntlet_args), daemon=True
    )
    gauntlet_thread.start()

    steps = [f"train.max_steps={STEPS}"]
    local_fsdp = train(root / "local-fsdp", data, nproc=2, overrides=[*BATCH, *steps])
    print(f"\nlocal fsdp reference done after {time.monotonic() - watcher.started:.0f} s")
    ds_overrides = [*BATCH, f"train.max_steps={DS_STEPS}", "parallel.backend=deepspeed"]
    local_ds = train(root / "local-ds", data, nproc=2, overrides=ds_overrides)
    print(f"local deepspeed reference done after {time.monotonic() - watcher.started:.0f} s")
    yield Module(root, data, watcher, local_fsdp, local_ds, again, gauntlet_thread)
    print(
        "SLURM jobs ended (s after submission):",
        {t.name: t.notes.get("ended_s") for t in watcher.jobs.values()},
    )
    for tracked in watcher.jobs.values():
        if tracked.final is None:
            tracked.job.cancel()
    resume_node2()
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nkept the SLURM test folder: {root}")


def assert_completed(runs: Module, name: str, restarts: str = "0") -> Tracked:
    tracked = runs[name]
    final = runs.watcher.wait(tracked)
    assert tracked.error is None, tracked.explain()
    assert final["JobState"] == "COMPLETED" and final.get("Restarts") == restarts, tracked.explain()
    return tracked


def trainer_errors(tracked: Tracked) -> list[str]:
    """Error lines and tracebacks of our processes in the task logs (SLURM's own notices left out)."""
    logs = "".join(path.read_text() for path in (tracked.run_dir / "submitit").glob("*_log.*"))
    marks = ("llm-train: error", "Traceback", "failed", "supervisor:")
    return [line for line in logs.splitlines() if any(mark in line for mark in marks)]


def assert_close(actual: list[float], expected: list[float], rel: float) -> None:
    assert len(actual) == len(expected), (len(actual), len(expected))
    for step, (a, b) in enumerate(zip(actual, expected, strict=True), start=1):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=0), f"step {step}: {a} vs {b} (rel {rel})"


def test_two_node_fsdp_job_matches_local_run(runs):
    """Over 60 s: the first test of the module waits for the jobs it is about (2 nodes, one job at a time per
    node: the queue drains in minutes); the module's other tests then find their jobs finished. The suite runs
    this module alongside the CPU-bound tests (tests/run_suite.sh), so the wait costs little wall time."""
    tracked = assert_completed(runs, "fsdp2")
    records = read_metrics(tracked.run_dir)
    assert records[0]["event"] == "start" and records[0]["world_size"] == 2
    assert records[-1] == {**records[-1], "event": "done", "step": STEPS}
    assert_close(losses(records), losses(runs.local_fsdp), rel=1e-6)


def test_two_node_deepspeed_job_matches_local_run(runs):
    tracked = assert_completed(runs, "deepspeed2")
    records = read_metrics(tracked.run_dir)
    assert records[0]["backend"] == "deepspeed" and records[0]["world_size"] == 2
    assert records[-1]["event"] == "done"
    assert_close(losses(records), losses(runs.local_deepspeed), rel=1e-6)


def test_one_node_and_two_nodes_give_the_same_losses(runs):
    one, two = assert_completed(runs, "fsdp1"), assert_completed(runs, "fsdp2")
    assert one.records()[0]["world_size"] == 1 and one.records()[0]["grad_accum"] == 2
    assert_close(losses(one.records()), losses(two.records()), rel=1e-5)


def test_submitted_script_is_the_dry_run_script(runs):
    tracked = assert_completed(runs, "fsdp2")
    submitted = (tracked.run_dir / "submitit" / f"{tracked.job_id}_submission.sh").read_text()
    # More steps: the run has finished, and a finished run is not submitted again.
    more = f"train.max_steps={STEPS + 20}"
    code, out, err = cli(
        "submit", "tiny", f"run.dir={tracked.run_dir}", f"data.path={runs.data}", *FSDP, more,
        "--cluster", "local", "--nodes", "2", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    assert (tracked.run_dir / "submitit" / "dry_run.sbatch").read_text() == submitted
    assert submitted in out and "--signal=USR2@180" in submitted and "--requeue" in submitted


def test_preemption_checkpoints_requeues_once_and_resumes_exactly(runs):
    tracked = assert_completed(runs, "preempt", restarts="1")
    records = tracked.records()
    events = [(r["event"], r["step"]) for r in records if "event" in r and r["event"] != "checkpoint"]
    stopped = tracked.events("preempted")[0]["step"]
    assert stopped >= tracked.notes["signalled_at"], tracked.explain()
    assert events == [
        ("start", 0), ("preempted", stopped), ("requeued", stopped), ("start", 0), ("resume", stopped), ("done", STEPS),
    ], tracked.explain()  # fmt: skip
    assert json.loads((tracked.run_dir / "requeues.json").read_text())["count"] == 1
    assert not trainer_errors(tracked), "a stop left error lines or tracebacks in the task logs"
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), "a step (and its samples) was trained twice or skipped"
    assert losses(records) == losses(runs["fsdp2"].records()), (
        "resumed losses differ from the uninterrupted run"
    )


def test_plain_scancel_is_a_preemption_not_a_failure(runs):
    tracked = assert_completed(runs, "scancel", restarts="1")
    stopped = tracked.events("preempted")[0]
    assert stopped["signal"] == "SIGTERM" and stopped["step"] >= tracked.notes["signalled_at"], (
        tracked.explain()
    )
    assert [e["step"] for e in tracked.events("requeued")] == [stopped["step"]], tracked.explain()
    history = json.loads((tracked.run_dir / "requeues.json").read_text())
    assert [event["signal"] for event in history["events"]] == ["SIGTERM"], history
    assert not trainer_errors(tracked), tracked.explain()
    assert losses(tracked.records()) == losses(runs["fsdp1"].records())


def test_rank_killed_by_sigabrt_requeues_the_job_which_resumes_exactly(runs):
    """No Python runs in the aborted rank: its task's supervisor names it and requeues the job."""
    tracked = assert_completed(runs, "abort", restarts="1")
    history = json.loads((tracked.run_dir / "requeues.json").read_text())
    assert history["count"] == 1 and history["events"][0]["signal"] == "failure", history
    cause = history["events"][0]["cause"]
    # Its last heartbeat: the phase and step it was in at most one heartbeat interval before the abort.
    found = re.match(r"rank 1 was killed by SIGABRT in '[^']+' of step (\d+) \(pid \d+ on ", cause)
    assert found and 1 <= int(found.group(1)) <= 7, history
    assert cause in (tracked.run_dir / "logs" / "rank1.log").read_text(), tracked.explain()
    records = tracked.records()
    resumed = [r["step"] for r in records if r.get("event") == "resume"]
    assert resumed == [6], records
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert list(by_step.values()) == losses(runs["fsdp2"].records()), (
        "the resumed run is not the uninterrupted one"
    )


def test_every_fault_costs_one_requeue_is_named_and_the_run_ends_as_if_uninterrupted(runs):
    """The gauntlet job: 4 allocations for 3 faults (the retried read costs none), each recorded with its cause;
    every step done, with the uninterrupted 2-node run's losses bitwise while the world size is 2 and within
    the one-node tolerance on the last allocation's single node; `status` names the time each kind cost.
    Over 60 s: the job starts once the module's other jobs have ended and goes through 4 allocations (each
    requeue waits for the test cluster's credential expiry); the module runs beside the CPU-bound tests."""
    runs.gauntlet_thread.join(timeout=WATCH_S)
    assert "gauntlet" in runs.watcher.jobs, "the gauntlet job was not submitted (see the output above)"
    tracked = assert_completed(runs, "gauntlet", restarts="3")
    history = json.loads((tracked.run_dir / "requeues.json").read_text())
    kinds = [fault_kind(event) for event in history["events"]]
    assert kinds == ["preempted (SIGTERM)", "rank killed (SIGKILL)", "disk full"], history
    killed, full = history["events"][1]["cause"], history["events"][2]["cause"]
    assert killed.startswith("rank 1 was killed by SIGKILL in 'checkpoint save' of step 9"), history
    assert "checkpoint step 15 could not be written" in full, history
    starts = tracked.events("start")
    assert [s["world_size"] for s in starts] == [2, 2, 2, 1] and starts[-1]["grad_accum"] == 2, (
        tracked.explain()
    )
    # The scancel at start-up may or may not leave a checkpoint of the first allocation (srun kills the tasks on
    # SIGTERM; the batch script requeues): the last two resumes are the kill's and the full disk's.
    assert [r["step"] for r in tracked.events("resume")][-2:] == [6, 12], tracked.explain()
    assert "test hook: injected read error" in (tracked.run_dir / "logs" / "rank1.log").read_text()

    records = tracked.records()
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    one_node = {r["step"]: r["loss"] for r in records[last_start:] if "loss" in r}
    reference = dict(enumerate(losses(runs["fsdp2"].records()), start=1))
    assert sorted(by_step) == list(range(1, STEPS + 1)) and tracked.records()[-1]["event"] == "done"
    assert {k: v for k, v in by_step.items() if k not in one_node} == {
        k: v for k, v in reference.items() if k not in one_node
    }, "the 2-node allocations' losses differ from the uninterrupted run"
    assert_close([one_node[k] for k in sorted(one_node)], [reference[k] for k in sorted(one_node)], rel=1e-5)

    code, out, err = cli("status", str(tracked.run_dir))
    goodput = next(line for line in out.splitlines() if line.startswith("goodput"))
    for kind in kinds:
        assert f"{kind} x1 " in goodput, out


def test_a_user_error_on_one_rank_is_never_requeued(runs):
    tracked = runs["usererror"]
    final = runs.watcher.wait(tracked)
    assert final["JobState"] == "FAILED" and final.get("Restarts") == "0", tracked.explain()
    history_file = tracked.run_dir / "requeues.json"
    assert not history_file.exists() or json.loads(history_file.read_text())["count"] == 0
    decisions = [path.read_text().strip() for path in tracked.run_dir.glob(".requeue-*")]
    assert decisions == ["user error: not requeued"], decisions
    assert (
        "stops with a user error at step 3"
        in tracked.job.output() + (tracked.run_dir / "logs" / "rank1.log").read_text()
    ), tracked.explain()
    code, out, err = cli("status", str(tracked.run_dir))  # the reason, not only "failed"
    state = out.splitlines()[1]
    assert code == 0 and "failed" in state, out
    assert "rank 1: test hook: rank 1 stops with a user error at step 3" in state, out


def test_failures_stop_requeueing_at_the_cap(runs):
    tracked = runs["abortcap"]
    final = runs.watcher.wait(tracked)
    assert final["JobState"] == "FAILED" and final.get("Restarts") == "1", tracked.explain()
    history = json.loads((tracked.run_dir / "requeues.json").read_text())
    assert history["count"] == 1 and "SIGABRT" in history["events"][0]["cause"], history
    log = (tracked.run_dir / "logs" / "rank0.log").read_text()
    assert "slurm.max_requeues=1 reached: not requeueing" in log, tracked.explain()
    resumed = [r["step"] for r in tracked.records() if r.get("event") == "resume"]
    assert resumed == [2], tracked.explain()


def test_submit_refuses_a_run_dir_that_has_a_live_job(runs):
    code, out, err = runs.second_submit
    job_id = runs["preempt"].job_id
    assert code == 2 and f"already has job {job_id}" in err and "llm-train cancel" in err, (code, out, err)
    jobs = json.loads((runs["preempt"].run_dir / "jobs.json").read_text())["jobs"]
    assert [job["job_id"] for job in jobs] == [job_id]


def test_sbatch_template_preempts_requeues_and_resumes_the_same_way(runs):
    tracked = assert_completed(runs, "template", restarts="1")
    events = [
        (r["event"], r["step"]) for r in tracked.records() if "event" in r and r["event"] != "checkpoint"
    ]
    stopped = tracked.events("preempted")[0]["step"]
    assert events == [
        ("start", 0), ("preempted", stopped), ("requeued", stopped), ("start", 0), ("resume", stopped), ("done", STEPS),
    ], tracked.explain()  # fmt: skip
    assert losses(tracked.records()) == losses(runs["fsdp1"].records())
    assert (
        tracked.job.output().count("trainer.main tiny run.dir=") == 2
    )  # the same arguments after the requeue


def test_time_limit_signal_saves_requeues_and_finishes_in_second_allocation(runs):
    tracked = assert_completed(runs, "timelimit", restarts="1")
    preempted = tracked.events("preempted")
    assert [p["signal"] for p in preempted] == ["SIGUSR2"], tracked.explain()
    assert len(tracked.events("requeued")) == 1 and len(tracked.events("start")) == 2, tracked.explain()
    assert tracked.events("resume")[0]["step"] == preempted[0]["step"]
    done = tracked.records()[-1]
    assert done["event"] == "done"
    assert losses(tracked.records()) == losses(runs["fsdp1"].records())
    # The margin this test lives on: the second allocation must finish before SLURM could signal it (>= 89 s).
    second_start = tracked.notes["started"][-1]
    print(f"\ntime limit: second allocation finished {done['time'] - second_start:.0f} s after it started")


def test_requeue_cap_stops_the_run_and_status_says_so(runs):
    tracked = assert_completed(runs, "cap", restarts="1")
    assert len(tracked.notes["signals"]) == 2, tracked.explain()
    assert len(tracked.events("preempted")) == 2 and len(tracked.events("requeued")) == 1, tracked.explain()
    assert not tracked.events("done")
    assert json.loads((tracked.run_dir / "requeues.json").read_text())["count"] == 1
    code, out, err = cli("status", str(tracked.run_dir))
    assert code == 0, err
    assert "requeue cap reached" in out and "1 of at most 1" in out, out
    status = json.loads(cli("status", str(tracked.run_dir), "--json")[1])
    assert status["cap_reached"] is True and status["requeues"] == 1
    last = tracked.events("preempted")[-1]["step"]
    assert status["step"] == last and status["checkpoints"][0]["name"] == f"step_{last:08d}"
    assert status["checkpoints"][0]["valid"] and status["checkpoints"][0]["latest"]


def test_status_while_running_and_cancel_for_good(runs):
    tracked = runs["cancel"]
    final = runs.watcher.wait(tracked)
    assert tracked.error is None, tracked.explain()
    status = tracked.notes["status"]
    assert isinstance(status, dict), status
    assert status["state"] == "running" and status["jobs"][-1]["state"] == "RUNNING", status
    assert status["step"] >= 3 and status["max_steps"] == STEPS and status["eta_s"] > 0, status
    cancel = tracked.notes["cancel"]
    assert cancel.returncode == 0 and f"cancelled job {tracked.job_id}" in cancel.stdout, cancel
    # scancel's SIGTERM looks like a preemption to the trainer, which saves and runs `scontrol requeue`
    # (within KillWait, 5 s here): cancel must win, so look again after that.
    time.sleep(max(0.0, tracked.notes["cancelled_at"] + 10 - time.monotonic()))
    assert final["JobState"] == "CANCELLED" and tracked.job.state() in (None, "CANCELLED"), tracked.explain()
    assert not tracked.notes.get("pending_after_cancel") and not tracked.events("requeued"), tracked.explain()
    cancelled = tracked.events("cancelled")
    assert len(cancelled) == 1 and cancelled[0]["step"] == tracked.events("preempted")[0]["step"], (
        tracked.explain()
    )
    output = tracked.job.output()
    assert "not requeued" in output and "scontrol requeue" not in output and "requeued job" not in output
    assert not trainer_errors(tracked), tracked.explain()
    assert (
        not (tracked.run_dir / "requeues.json").exists()
        or json.loads((tracked.run_dir / "requeues.json").read_text())["count"] == 0
    )
    assert "cancelled" in json.loads((tracked.run_dir / "jobs.json").read_text())["jobs"][-1]
    code, out, err = cli("status", str(tracked.run_dir))  # also once SLURM has forgotten the job
    assert code == 0 and out.splitlines()[1].split()[1:4] == ["cancelled", "at", "step"], out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("partition", "partition 'no-such-partition'"),
        ("nodes", "partition 'debug' has 2 node(s)"),
        ("batch", "world size 2"),
        ("gpus", "have at most 0 GPU(s)"),
        ("no_run_dir", "needs a run.dir of its own"),
        ("data", "does not exist"),
        ("node_local", "is under /tmp, which each node has to itself"),  # each job has a private /tmp here
    ],
)
def test_submit_time_errors_exit_2_and_queue_nothing(slurm_cluster, slurm_tmp_path, case, expected):
    data = write_dataset(slurm_tmp_path / "data", train_samples=64, val_samples=8, seq_len=64, vocab_size=512)
    run_dir = slurm_tmp_path / f"rejected-{case}"
    profile = "local"
    args = [f"run.dir={run_dir}", f"data.path={data}", *FSDP]
    if case == "partition":
        profile = str(slurm_tmp_path / "bad.yaml")
        Path(profile).write_text("partition: no-such-partition\nnodes: 1\n")
    elif case == "nodes":
        args += ["--nodes=3", "train.global_batch_size=12"]  # divides: only the partition is too small
    elif case == "batch":
        args += ["--nodes=2", "train.global_batch_size=12"]  # 12 sequences over 2 ranks x micro batch 4
    elif case == "gpus":
        args.append("--gpus-per-node=1")
    elif case == "no_run_dir":
        args.pop(0)
    elif case == "node_local":
        local = Path(tempfile.mkdtemp(prefix="node-local-data-"))  # under /tmp: the login node's own
        shutil.copytree(data, local / "data")
        args[1] = f"data.path={local / 'data'}"
    else:
        args[1] = f"data.path={slurm_tmp_path / 'missing'}"
    try:
        code, out, err = cli("submit", "tiny", *args, "--cluster", profile)
    finally:
        if case == "node_local":
            shutil.rmtree(local)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (code, out, err)
    queued = run(["squeue", "-h", "-n", run_dir.name, "-o", "%i"]).stdout.split()
    assert queued == [] and not (run_dir / "jobs.json").exists() and not (run_dir / "submitit").exists()
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        ([], "has already reached step 60 (train.max_steps=60); raise train.max_steps"),
        (["train.max_steps=80", "model.n_layer=3"], "model.n_layer=3 (checkpoints: 2) differs"),
        (
            ["train.max_steps=80", "parallel.backend=deepspeed"],
            "parallel.backend=deepspeed (checkpoints: fsdp)",
        ),
    ],
)
def test_resubmitting_what_cannot_resume_is_refused_before_anything_is_written(runs, change, expected):
    tracked = assert_completed(runs, "fsdp1")
    before = {
        path.name: path.read_bytes()
        for path in (tracked.run_dir / "config.yaml", tracked.run_dir / "jobs.json")
    }
    code, out, err = cli(
        "submit",
        "tiny",
        f"run.dir={tracked.run_dir}",
        f"data.path={runs.data}",
        *FSDP,
        *change,
        "--cluster",
        "local",
    )
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (code, out, err)
    after = {name: (tracked.run_dir / name).read_bytes() for name in before}
    assert after == before, "a refused submission changed the run folder"
