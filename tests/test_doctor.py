"""`llm-train doctor`: one line per check, ok/warn/fail, exit 2 on a fail.

Every test runs the real checks on this machine (no GPU, SLURM commands maybe without a controller). The
whole-CLI tests take ~10 s each: `sinfo` needs that long to give up on an absent controller.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.cli import main as cli_main
from launcher.doctor import check_data, check_flash_attn
from trainer.config import load_config

# What these tests expect of this machine when it has no GPU; a GPU machine reports them under -ra.
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a CUDA device")
LINE = re.compile(r"^(ok|warn|fail) +([\w-]+): (.*)$")


def report(text: str) -> dict[str, tuple[str, str]]:
    """name -> (status, detail) of the check lines of doctor's output."""
    return {m[2]: (m[1], m[3]) for line in text.splitlines() if (m := LINE.match(line))}


def doctor(capsys, *args: str) -> tuple[int, dict[str, tuple[str, str]]]:
    code = cli_main(["doctor", *args])
    return code, report(capsys.readouterr().out)


def config_for(data: Path, run_dir: Path, *overrides: str):
    return load_config("tiny", [f"run.dir={run_dir}", f"data.path={data}", *overrides])


@pytest.fixture(scope="module")
def bare_run() -> subprocess.CompletedProcess:
    """`llm-train doctor` without a config, as a user runs it: a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "doctor"], capture_output=True, text=True, timeout=120
    )


@no_gpu
def test_without_a_gpu_cuda_and_flash_attn_checks_do_not_pass(bare_run):
    checks = report(bare_run.stdout)
    assert checks["cuda"][0] in ("warn", "fail"), checks["cuda"]
    assert "no CUDA device visible" in checks["cuda"][1]
    assert checks["flash-attn"][0] in ("warn", "fail"), checks["flash-attn"]
    assert "llm-training[flash]" in checks["flash-attn"][1]


def test_python_and_torch_check_is_ok(bare_run):
    status, detail = report(bare_run.stdout)["python"]
    assert status == "ok"
    assert torch.__version__ in detail


def test_without_a_fail_line_the_exit_code_is_0(bare_run):
    checks = report(bare_run.stdout)
    assert set(checks) == {"python", "cuda", "nccl", "flash-attn", "deepspeed", "slurm"}, bare_run.stdout
    assert all(status != "fail" for status, _ in checks.values()), bare_run.stdout
    assert bare_run.returncode == 0, bare_run.stderr
    assert bare_run.stdout.splitlines()[-1].endswith("0 fail: nothing blocks a run")


def test_a_prepared_dataset_and_a_writable_run_dir_are_ok(capsys, tmp_path, demo_dataset):
    code, checks = doctor(capsys, "tiny", f"run.dir={tmp_path / 'run'}", f"data.path={demo_dataset.path}")
    for name in ("config", "data", "batch", "memory", "run-folder"):
        assert checks[name][0] == "ok", checks[name]
    assert str(demo_dataset.path) in checks["data"][1]
    assert str(tmp_path / "run") in checks["run-folder"][1]
    assert code == 0


@pytest.fixture
def dataset_copy(tmp_path, demo_dataset) -> Path:
    """A copy of the shared dataset that a test may damage."""
    return Path(shutil.copytree(demo_dataset.path, tmp_path / "data"))


def test_a_missing_shard_fails_the_data_check_naming_it(tmp_path, dataset_copy):
    shard = next((dataset_copy / "train").glob("*.mds"))
    shard.unlink()
    check = check_data(config_for(dataset_copy, tmp_path / "run"))
    assert check.status == "fail"
    assert str(shard) in check.detail


def test_a_truncated_shard_fails_the_data_check_naming_it(tmp_path, dataset_copy):
    shard = next((dataset_copy / "val").glob("*.mds"))
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    check = check_data(config_for(dataset_copy, tmp_path / "run"))
    assert check.status == "fail"
    assert str(shard) in check.detail
    assert "truncated" in check.detail


@pytest.fixture
def full_tmpfs(tmp_path):
    """A real 64 KiB tmpfs filled to ENOSPC (needs root, as CI has); unmounted afterwards."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (this test needs root, as in CI): {mounted.stderr.strip()}")
    try:
        fd = os.open(mount_point / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as raised:
                while True:
                    os.write(fd, b"\0" * 4096)
            assert raised.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_run_dir_without_free_space_fails_and_exits_2(capsys, full_tmpfs, demo_dataset):
    run_dir = full_tmpfs / "run"
    code, checks = doctor(capsys, "tiny", f"run.dir={run_dir}", f"data.path={demo_dataset.path}")
    status, detail = checks["run-folder"]
    assert status == "fail"
    assert str(run_dir) in detail and str(full_tmpfs) in detail
    assert "checkpoint.keep_last" in detail
    assert code == 2


@pytest.mark.parametrize(
    ("override", "key"), [("train.max_steps=abc", "train.max_steps"), ("train.nope=1", "train.nope")]
)
def test_a_config_error_is_a_fail_line_naming_the_key_and_exits_2(capsys, tmp_path, override, key):
    code = cli_main(["doctor", "tiny", f"run.dir={tmp_path}", "data.path=/nowhere", override, "--json"])
    checks = {check["name"]: check for check in json.loads(capsys.readouterr().out)}
    assert checks["config"]["status"] == "fail"
    assert key in checks["config"]["detail"]
    assert [name for name, check in checks.items() if check["status"] == "fail"] == ["config"], (
        "one cause, one fail line"
    )
    assert code == 2


def test_cluster_layout_decides_the_batch_check(capsys, tmp_path, demo_dataset):
    """A batch that divides for this machine's one rank but not for the job's two is a fail naming the numbers."""
    args = [
        "tiny",
        f"run.dir={tmp_path / 'run'}",
        f"data.path={demo_dataset.path}",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
    ]
    code, here = doctor(capsys, *args)
    assert here["batch"][0] == "ok" and "this machine" in here["batch"][1], here["batch"]
    code, job = doctor(capsys, *args, "--cluster", "local", "--nodes", "2")
    status, detail = job["batch"]
    assert status == "fail" and code == 2, job["batch"]
    assert "world size 2" in detail and "8" in detail and "micro_batch_size" in detail, detail


def test_parameter_count_is_the_real_models(tmp_path, demo_dataset):
    from transformers import GPT2Config, GPT2LMHeadModel

    from launcher.doctor.run import count_params, dataset_info
    from trainer import config as config_module

    config = config_for(demo_dataset.path, tmp_path)
    info = dataset_info(config)
    shape = config_module.model_shape(config.model)
    real = GPT2LMHeadModel(
        GPT2Config(vocab_size=info.vocab_size, n_positions=info.seq_len, n_layer=shape["n_layer"],
                   n_head=shape["n_head"], n_embd=shape["n_embd"])
    )  # fmt: skip
    assert count_params(config, info) == (sum(p.numel() for p in real.parameters()), "")
    count, note = count_params(config, None)
    assert "assumed" in note and count > real.num_parameters()


@no_gpu
def test_flash_attention_2_requested_on_this_machine_fails(tmp_path, demo_dataset):
    config = config_for(demo_dataset.path, tmp_path, "model.attn=flash_attention_2")
    check = check_flash_attn(config)
    assert check.status == "fail"
    assert "model.attn=flash_attention_2" in check.detail
