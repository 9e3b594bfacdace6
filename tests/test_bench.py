"""bench/gpu.py is run only on a lent GPU machine, with minutes to spare: its code paths are checked here."""

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gpu_bench_smoke_runs_every_row(tmp_path):
    out = tmp_path / "gpu_bench.md"
    env = {**os.environ, "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| gpt2")]
    labels = [cells[0].strip() for cells in rows]
    assert labels == [
        "gpt2-124m fastest", "gpt2-350m fastest", "gpt2-774m fastest", "gpt2-1.5b fastest",
        "gpt2-350m deepspeed", "gpt2-350m eager attention", "gpt2-350m activation ckpt", "gpt2-350m no compile",
    ]  # fmt: skip
    for cells in rows:
        assert float(cells[3].strip().replace(",", "")) > 0, cells  # a rate, not "skipped" or "out of memory"
    assert (
        float(rows[0][6]) > 0
    )  # plan --measure's estimate beside the measured peak (one row in a smoke run)
    attention = {cells[0].strip(): cells[1].strip() for cells in rows}
    assert attention["gpt2-350m eager attention"] == "eager"
    assert attention["gpt2-350m fastest"] == "sdpa"  # no flash-attn here: auto falls back to SDPA


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("error", "cell", "failure"),
    [
        (
            RuntimeError("inductor: no C compiler\nmore lines"),
            "failed: RuntimeError: inductor: no C compiler",
            "error",
        ),
        (torch.OutOfMemoryError("CUDA out of memory"), "out of memory", "oom"),
    ],
)
def test_gpu_bench_records_a_failing_row_instead_of_stopping(monkeypatch, error, cell, failure):
    bench = load_gpu_bench()

    def run_row(*_args):
        raise error

    monkeypatch.setattr(bench, "run_row", run_row)
    env = SimpleNamespace(device=torch.device("cpu"))
    line, kind = bench.row_line(
        env, "gpt2-350m fastest", "gpt2-350m", 16, [], argparse.Namespace(smoke=False)
    )
    assert kind == failure
    assert line == f"| gpt2-350m fastest | - | 16 | {cell} | | | |"
