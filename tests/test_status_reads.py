"""`llm-train status` is cheap on a login node: manifests and sizes by default, every byte only with --verify.

Bytes are counted by the kernel (/proc/self/io `rchar`: everything this process reads), not by our code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main as cli_main


def bytes_read() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def checkpoint_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())


def status(run_dir: Path, capsys, *options: str) -> tuple[dict, int]:
    before = bytes_read()
    code = cli_main(["status", str(run_dir), "--json", *options])
    read = bytes_read() - before
    assert code == 0
    return json.loads(capsys.readouterr().out), read


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_status_reads_no_checkpoint_data_unless_asked_to_verify(straight, capsys, backend):
    run_dir = straight[backend]
    status(run_dir, capsys)  # imports and caches warm up
    plain, read = status(run_dir, capsys)
    total = checkpoint_bytes(run_dir)
    assert [c["valid"] for c in plain["checkpoints"]] == [True] * len(plain["checkpoints"]) != []
    assert read < total / 100, f"status read {read} bytes; the checkpoints hold {total}"
    verified, read = status(run_dir, capsys, "--verify")
    assert verified["checkpoints"] == plain["checkpoints"]
    assert read >= total, f"--verify read {read} bytes of {total}"


def test_status_notices_a_truncated_file_without_reading_it(straight, capsys, tmp_path):
    import shutil

    run_dir = Path(shutil.copytree(straight["fsdp"], tmp_path / "run"))
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    shard = next(p for p in newest.rglob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    report, _ = status(run_dir, capsys)
    first = report["checkpoints"][0]
    assert (
        first["name"] == newest.name and not first["valid"] and "bytes, the manifest says" in first["problem"]
    )
    assert report["step"] == 12, "progress comes from the newest logged step, not from a damaged checkpoint"
