"""The SLURM launcher without a cluster: cluster profiles, `submit --dry-run`, `status` and `cancel` on run
folders, and the in-job signal hand-over. The real jobs are in tests/slurm/test_submit.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from mds_fixtures import write_dataset

from launcher import run_status
from launcher.cli import build_parser
from launcher.cli import main as cli_main
from launcher.profiles import format_time, load_profile, parse_time, with_overrides
from launcher.slurm_query import JobInfo
from trainer.checkpoint.manifest import MANIFEST, describe_files
from trainer.config import load_config, to_yaml
from trainer.errors import UserError

EXPECTED_SCRIPT = Path(__file__).parent / "data" / "gpu_cluster_4x8.sbatch"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(
        tmp_path_factory.mktemp("data") / "data", train_samples=64, val_samples=8, seq_len=64
    )


# ---- profiles ------------------------------------------------------------------------------------------


def test_shipped_profiles_load():
    local, gpu = load_profile("local"), load_profile("gpu-cluster")
    assert (local.partition, local.world_size, local.tasks_per_node, local.name) == ("debug", 2, 1, "local")
    assert local.cpus_per_task <= 2 and local.mem_gb <= 11
    assert (gpu.nodes, gpu.gpus_per_node, gpu.world_size, gpu.time_s) == (4, 8, 32, 24 * 3600)


@pytest.mark.parametrize(
    "text, message",
    [
        ("partition: p\nnodes: two\n", "key 'nodes' must be a whole number"),
        ("partition: p\nnode: 2\n", "unknown key 'node'"),
        ("nodes: 2\n", "key 'partition' is required"),
        ("partition: p\nsetup: echo hi\n", "key 'setup' must be a list of shell lines"),
        ("partition: p\ngpus_per_node: true\n", "key 'gpus_per_node' must be a whole number"),
        ("partition: p\ntime: soon\n", "time 'soon' is not a SLURM time limit"),
        ("partition: p\nnodes: 0\n", "nodes=0 must be >= 1"),
        (
            "partition: p\nsbatch_extra: {ntasks_per_node: 4}\n",
            "sbatch_extra 'ntasks_per_node' is set by submit",
        ),
        ("partition: p\nsbatch_extra: {mail-type: [END]}\n", "sbatch_extra 'mail-type' must be a string"),
        ("- partition\n", "must hold a mapping"),
        ("partition: [\n", "is not valid YAML"),
    ],
)
def test_profile_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="cluster profile .*profile.yaml") as error:
        load_profile(str(path))
    assert message in str(error.value)


def test_profile_values_stay_as_written(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(
        "partition: gpu\ntime: 12:00:00\nmem_gb: 1.5\n"
        "setup:\n  - export PATH=${HOME}/bin:$PATH\n  - export X=${Y:-1}\n"
        "sbatch_extra: {exclusive: true, mail-type: END}\n"
    )
    profile = load_profile(str(path))
    assert profile.time == "12:00:00" and profile.time_s == 12 * 3600  # not YAML 1.1's base-60 integer 43200
    assert profile.setup == ["export PATH=${HOME}/bin:$PATH", "export X=${Y:-1}"]
    assert profile.name == str(path.resolve()) and profile.mem_gb == 1.5
    with pytest.raises(UserError, match="does not exist; pass a YAML path or a profile name"):
        load_profile("no-such-cluster")


def test_command_line_overrides_are_validated():
    profile = with_overrides(load_profile("gpu-cluster"), nodes=2, gpus_per_node=4, time="00:30:00")
    assert (profile.world_size, profile.time_s) == (8, 1800)
    with pytest.raises(UserError, match="command line: nodes=0 must be >= 1"):
        with_overrides(profile, nodes=0, gpus_per_node=None, time=None)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),
        ("1:30", 90),
        ("04:00:00", 14400),
        ("2-00", 172800),
        ("1-02:03", 93780),
        ("1-00:00:01", 86401),
    ],
)
def test_slurm_time_formats(text, seconds):
    assert parse_time(text) == seconds


def test_time_is_written_back_as_hh_mm_ss():
    assert [format_time(s) for s in (60, 3661, 86400 + 5)] == ["00:01:00", "01:01:01", "1-00:00:05"]
    for bad in ("0", "1:2:3:4", "-1", "tomorrow"):
        with pytest.raises(UserError):
            parse_time(bad)


# ---- submit --dry-run ----------------------------------------------------------------------------------


def test_dry_run_script_for_4_nodes_of_8_gpus_matches_the_stored_one(capsys, tmp_path, dataset):
    run_dir = tmp_path / "run-4x8"
    code, out, err = cli(
        capsys, "submit", "tiny", f"run.dir={run_dir}", f"data.path={dataset}",
        "train.global_batch_size=256", "train.micro_batch_size=4", "--cluster", "gpu-cluster", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    written = (run_dir / "submitit" / "dry_run.sbatch").read_text()
    normalised = written.replace(str(run_dir.resolve()), "<RUN_DIR>").replace(sys.executable, "<PYTHON>")
    assert normalised == EXPECTED_SCRIPT.read_text()
    assert written in out
    assert "global batch 256 = micro 4 x world size 32 x accumulation 2, tokens/step 16384" in out
    assert out.strip().splitlines()[-1].endswith("nothing submitted")
    assert "measured peak" not in err  # one step on fake tensors: the tiny model fits an H100 easily
    # Nothing a real submission leaves behind: no config for a job, no job record.
    assert sorted(p.name for p in run_dir.iterdir()) == ["submitit"]


def test_dry_run_warns_when_the_measured_step_would_not_fit_the_gpu(capsys, tmp_path, dataset):
    """A micro batch of 8192 sequences on 2 layers of gpt2-1.5b's width: one step measured on fake tensors
    (plan --measure) holds far more than an H100 of the profile offers; one line says so and what to do."""
    code, out, err = cli(
        capsys, "submit", "tiny", f"run.dir={tmp_path / 'run'}", f"data.path={dataset}", "model.size=gpt2-1.5b",
        "model.n_layer=2", "model.activation_checkpointing=false", "train.micro_batch_size=8192",
        "train.global_batch_size=262144", "--cluster", "gpu-cluster", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    [warning] = [line for line in err.splitlines() if "measured peak" in line]
    assert "train.micro_batch_size=8192" in warning and "h100" in warning and "--max-micro-batch" in warning


@pytest.mark.parametrize(
    "options, message",
    [
        (["--nodes", "3"], "world size 24 = 3 nodes x 8 tasks per node"),
        (["--time", "00:02:00"], "slurm.signal_lead_s=180 is not shorter than the time limit 00:02:00"),
        (["--gpus-per-node", "-1"], "gpus_per_node=-1 must be >= 0"),
        (["--min-nodes", "3"], "world size 24 = 3 nodes x 8 tasks per node; change --nodes, --min-nodes"),
        (["--min-nodes", "5"], "min_nodes=5 must not exceed nodes=4"),
    ],
)
def test_dry_run_refuses_what_the_job_could_not_run(capsys, tmp_path, dataset, options, message):
    run_dir = tmp_path / "run"
    code, out, err = cli(
        capsys, "submit", "tiny", f"run.dir={run_dir}", f"data.path={dataset}",
        "train.global_batch_size=256", "train.micro_batch_size=4", "--cluster", "gpu-cluster", "--dry-run", *options,
    )  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()


def test_min_nodes_asks_for_a_node_range(capsys, tmp_path, dataset):
    """--min-nodes 2 of 4: an allocation may be 2, 3 or 4 nodes (as many as are free); each of those world sizes
    divides the batch."""
    code, out, err = cli(
        capsys, "submit", "tiny", f"run.dir={tmp_path / 'run'}", f"data.path={dataset}", "train.global_batch_size=384",
        "train.micro_batch_size=4", "--cluster", "gpu-cluster", "--min-nodes", "2", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    assert "#SBATCH --nodes=2-4\n" in out and "layout: 2-4 node(s) x 8 task(s)" in out
    # One task per node in the allocation (else SLURM would allocate 2 nodes however many are free), holding
    # the node's CPUs; srun starts the 8 tasks of each node.
    assert "#SBATCH --ntasks-per-node" not in out and "#SBATCH --cpus-per-task=96\n" in out
    assert "srun --unbuffered" in out and "--ntasks-per-node 8 --cpus-per-task 12 " in out
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-12}" in out


def test_submit_needs_a_cluster_and_a_valid_config(capsys, tmp_path, dataset):
    code, _, err = cli(capsys, "submit", "tiny", f"run.dir={tmp_path}/r", f"data.path={dataset}")
    assert code == 2 and "--cluster" in err
    code, _, err = cli(
        capsys, "submit", "tiny", f"run.dir={tmp_path}/r", "train.nope=1", "--cluster", "local"
    )
    assert code == 2 and "unknown config key 'train.nope'" in err


def test_help_lists_the_slurm_commands():
    text = build_parser().format_help()
    assert all(name in text for name in ("submit", "status", "cancel"))


# ---- status and cancel ---------------------------------------------------------------------------------


def _fake_run(
    run_dir: Path, *, steps: int, events_after: list[dict], requeues: int, max_requeues: int = 2
) -> Path:
    """A run folder as the trainer and submit leave it: 100-step config, metrics, checkpoints, jobs.json."""
    config = load_config("tiny", [f"run.dir={run_dir}", "data.path=/d", "train.max_steps=100"])
    config.slurm.max_requeues = max_requeues
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    now = time.time()
    lines = [{"event": "start", "step": 0, "time": now - 100}]
    lines += [
        {"step": s, "loss": 6.0 - s / 100, "tokens_per_s": 1000.0, "time": now - 50 + s * 0.5}
        for s in range(1, steps + 1)
    ]
    lines += events_after
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"partial')
    (run_dir / "requeues.json").write_text(json.dumps({"count": requeues, "events": []}))
    good = run_dir / "checkpoints" / "step_00000010"
    good.mkdir(parents=True)
    (good / "train_state.json").write_text("{}")
    (good / MANIFEST).write_text(
        json.dumps({"step": 10, "files": describe_files(good, ["train_state.json"])})
    )
    (run_dir / "checkpoints" / "step_00000020").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step_00000010")
    (run_dir / "jobs.json").write_text(json.dumps({"jobs": [{"job_id": "4242"}]}))
    return run_dir


def _slurm_says(monkeypatch, **fields) -> None:
    info = JobInfo("4242", **{"source": "scontrol", **fields})
    monkeypatch.setattr(run_status, "query_job", lambda job_id: info)


def test_status_of_a_running_run(capsys, tmp_path, monkeypatch):
    run_dir = _fake_run(tmp_path / "run", steps=20, events_after=[], requeues=1)
    _slurm_says(monkeypatch, state="RUNNING", restarts=1, run_time="00:01:40", nodes="node[1-2]")
    code, out, err = cli(capsys, "status", str(run_dir))
    assert code == 0, err
    assert "state        running" in out and "4242 RUNNING for 00:01:40 on node[1-2] restarts 1" in out
    assert "1 of at most 2 (cap not reached)" in out and "step 20/100, loss 5.8000, 1,000 tokens/s" in out
    assert "0m40s of training left (0.500 s/step)" in out
    assert "step_00000020 INVALID (no manifest.json" in out and "step_00000010 ok (latest)" in out
    status = json.loads(cli(capsys, "status", str(run_dir), "--json")[1])
    assert status["eta_s"] == 40.0 and status["cap_reached"] is False and status["step"] == 20
    assert [c["valid"] for c in status["checkpoints"]] == [False, True]


def test_status_when_the_requeue_cap_stopped_the_run(capsys, tmp_path, monkeypatch):
    events = [{"event": "checkpoint", "step": 20}, {"event": "preempted", "step": 20, "signal": "SIGUSR2"}]
    run_dir = _fake_run(tmp_path / "run", steps=20, events_after=events, requeues=2)
    _slurm_says(monkeypatch, state="COMPLETED", restarts=2)
    status = run_status.read_status(run_dir)
    assert (
        status.cap_reached
        and "stopped at step 20: requeue cap reached (slurm.max_requeues=2)" in status.state
    )
    assert "2 of at most 2 (no requeues left)" in run_status.format_status(status)


@pytest.mark.parametrize(
    "slurm, events, expected",
    [
        ({"state": None, "source": "none"}, [{"event": "done", "step": 100}], "finished at step 100"),
        ({"state": None, "source": "none"}, [], "finished (no longer known to SLURM); last event 'start'"),
        ({"state": None, "source": "unavailable"}, [], "unknown (SLURM commands not found"),
        ({"state": "PENDING", "restarts": 1}, [], "requeued, waiting to resume (restart 1)"),
        ({"state": "CANCELLED"}, [{"event": "preempted", "step": 20, "signal": "SIGTERM"}], "cancelled at step 20"),
        ({"state": "COMPLETED"}, [{"event": "preempted", "step": 20, "signal": "SIGTERM"}], "stopped at step 20 by SIGTERM, not requeued"),
    ],
)  # fmt: skip
def test_status_says_how_a_run_ended(tmp_path, monkeypatch, slurm, events, expected):
    run_dir = _fake_run(tmp_path / "run", steps=20, events_after=events, requeues=0)
    _slurm_says(monkeypatch, **slurm)
    status = run_status.read_status(run_dir)
    assert status.state.startswith(expected), status.state
    assert status.eta_s is None  # an ETA only while the job runs (not while it waits in the queue)


def test_status_remembers_a_cancel_after_slurm_forgot_the_job(tmp_path, monkeypatch):
    events = [{"event": "preempted", "step": 20, "signal": "SIGTERM"}]
    run_dir = _fake_run(tmp_path / "run", steps=20, events_after=events, requeues=0)
    jobs = {"jobs": [{"job_id": "4242", "cancelled": "2030-01-01T00:00:00+00:00"}]}
    (run_dir / "jobs.json").write_text(json.dumps(jobs))
    _slurm_says(monkeypatch, state=None, source="none")
    assert run_status.read_status(run_dir).state.startswith("cancelled at step 20 (llm-train cancel")


def test_status_without_slurm_or_jobs(capsys, tmp_path):
    run_dir = tmp_path / "local-run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    code, out, _ = cli(capsys, "status", str(run_dir))
    assert code == 0 and "state        not submitted to SLURM; last event 'start' at step 0" in out
    assert "checkpoints  none" in out


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_status_and_cancel_reject_a_folder_that_is_not_a_run(capsys, tmp_path, command):
    for path, says in ((tmp_path, "is not a run folder"), (tmp_path / "missing", "does not exist")):
        code, out, err = cli(capsys, command, str(path))
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_cancel_needs_a_submitted_run(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("run: {}\n")
    code, _, err = cli(capsys, "cancel", str(tmp_path))
    assert code == 2 and "has no SLURM job" in err
