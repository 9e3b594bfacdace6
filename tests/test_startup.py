"""Start-up of a local run (bench/startup.py times it): the launcher's early rank server, W&B started in a thread."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from trainer_runs import read_metrics, train

import launcher.local
from launcher.commands import train as train_command
from launcher.rank_server import SERVER_ENV
from trainer import metrics as metrics_module
from trainer.config import load_config
from trainer.metrics import MetricsLogger


class FakeRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int | None]] = []
        self.finished = False

    def log(self, numbers: dict, step: int | None = None) -> None:
        self.logged.append((numbers, step))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def slow_wandb(monkeypatch):
    """W&B's start, held until the test releases it: (release, the run it will return, the settings asked for)."""
    release = threading.Event()
    run = FakeRun()
    asked: list[dict] = []

    def start(started: Future, settings: dict) -> None:
        asked.append(settings)
        release.wait(30)
        started.set_result(run)

    monkeypatch.setattr(metrics_module, "_start_wandb", start)
    return release, run, asked


def offline_logger(tmp_path: Path) -> MetricsLogger:
    config = load_config("tiny", [f"run.dir={tmp_path}", "log.wandb=offline"])
    return MetricsLogger(config, tmp_path, enabled=True)


def test_lines_written_while_wandb_starts_reach_it_in_order(tmp_path, slow_wandb):
    release, run, asked = slow_wandb
    logger = offline_logger(tmp_path)
    logger.event("start", 0, params=10)
    logger.write({"step": 1, "loss": 2.5})
    assert run.logged == []  # W&B is still starting: the lines wait, metrics.jsonl has them already
    assert [line["step"] for line in read_metrics(tmp_path)] == [0, 1]
    release.set()
    logger._wandb.result(timeout=30)
    logger.write({"step": 2, "loss": 2.0})
    assert run.logged == [
        ({"params": 10, "event/start": 1}, 0),
        ({"loss": 2.5}, 1),
        ({"loss": 2.0}, 2),
    ]
    logger.close()
    assert run.finished
    assert (
        asked[0]["mode"] == "offline" and asked[0]["dir"] == str(tmp_path) and asked[0]["resume"] == "allow"
    )


def test_close_waits_for_wandb_and_sends_what_is_left(tmp_path, slow_wandb):
    release, run, _ = slow_wandb
    logger = offline_logger(tmp_path)
    logger.write({"step": 1, "loss": 2.5})
    threading.Timer(0.2, release.set).start()
    logger.close()
    assert run.logged == [({"loss": 2.5}, 1)] and run.finished


def test_wandb_that_fails_to_start_is_one_warning_and_every_line_stays_in_metrics(
    tmp_path, monkeypatch, caplog
):
    def start(started: Future, settings: dict) -> None:
        started.set_exception(RuntimeError("no W&B service\nmore"))

    monkeypatch.setattr(metrics_module, "_start_wandb", start)
    logger = offline_logger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        logger.write({"step": 1, "loss": 2.5})
        logger.write({"step": 2, "loss": 2.4})
        logger.close()
    assert caplog.text.count("W&B failed (no W&B service)") == 1, caplog.text
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.5, 2.4]


def test_train_forks_the_ranks_from_the_server_it_started_before_its_checks(
    demo_dataset, tmp_path, monkeypatch
):
    """Without a shared server, `llm-train train` starts one at once and launch_local forks the ranks from it
    (never a server of its own), which is stopped afterwards."""
    monkeypatch.delenv(SERVER_ENV, raising=False)
    spawned = []
    spawn = train_command.RankServer.spawn

    def recording_spawn(*args, **kwargs):
        spawned.append(spawn(*args, **kwargs))
        return spawned[-1]

    def no_private_server(*args, **kwargs):
        raise AssertionError("launch_local started a server of its own")

    monkeypatch.setattr(train_command.RankServer, "spawn", recording_spawn)
    monkeypatch.setattr(launcher.local.RankServer, "start", no_private_server)
    records = train(tmp_path / "run", demo_dataset.path, nproc=2, overrides=["train.max_steps=1"])
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert len(spawned) == 1
    assert spawned[0].process.poll() is not None and not Path(spawned[0].socket_path).exists()
    assert SERVER_ENV not in os.environ


def imported_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running `code`."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_a_rank_imports_no_backend_or_tool_it_may_not_use():
    """DeepSpeed, W&B, datasets and lm-eval are imported by the code that uses them, not by `trainer.main`."""
    assert not {"deepspeed", "wandb", "datasets", "lm_eval"} & imported_after("import trainer.main")


def test_dataset_info_and_mixture_checks_import_neither_torch_nor_streaming(demo_dataset):
    code = (
        "from trainer.config import load_config\n"
        "from trainer.data.dataset_info import read_dataset_info\n"
        "from trainer.data.mixture import check_mixture\n"
        f"config = load_config('tiny', ['data.path={demo_dataset.path}'])\n"
        "check_mixture(config.data, read_dataset_info(config.data.path))"
    )
    assert not {"torch", "streaming", "transformers"} & imported_after(code)
