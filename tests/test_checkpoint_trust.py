"""Loading a checkpoint never runs code from it: RNG files, DCP's index and its non-tensor entries are read as
plain data; export reads only the model's entries, in memory."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from trainer_runs import BASE_OVERRIDES, BATCH, train

from launcher.cli import main as cli_main
from trainer.checkpoint.manifest import MANIFEST, describe_files
from trainer.checkpoint.rng import rng_state, set_rng_state
from trainer.checkpoint.steps import step_dir_name
from trainer.models.export import export

RUN = ["parallel.backend=fsdp", "train.max_steps=3", "checkpoint.every_steps=3", *BATCH]


class RunsCode:
    """Unpickled, it creates the folder `marker`: the side effect a checkpoint must never get to have."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def one_rank_run(demo_dataset, tmp_path_factory) -> Path:
    """FSDP, world size 1, 3 steps, one checkpoint (step 3)."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    train(run_dir, demo_dataset.path, nproc=1, overrides=RUN)
    return run_dir


def step_3(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / step_dir_name(3)


def reseal(step_dir: Path, names: list[str]) -> None:
    """Rewrite the manifest's entries for `names`, so the step verifies as complete with the new contents."""
    manifest = json.loads((step_dir / MANIFEST).read_text())
    manifest["files"].update(describe_files(step_dir, names))
    (step_dir / MANIFEST).write_text(json.dumps(manifest))


def plant_in_rng_file(step_dir: Path, marker: Path) -> list[str]:
    name = "rng/rank00000.pt"
    torch.save({"python": RunsCode(marker), "numpy": None, "torch": torch.get_rng_state()}, step_dir / name)
    return [name]


def _rewrite_index(step_dir: Path, change: Callable[[object], None]) -> None:
    index = step_dir / "model" / ".metadata"
    metadata = pickle.loads(index.read_bytes())  # the test's own file: trusted here
    change(metadata)
    index.write_bytes(pickle.dumps(metadata))


def plant_in_dcp_index(step_dir: Path, marker: Path) -> list[str]:
    _rewrite_index(step_dir, lambda metadata: metadata.planner_data.update(extra=RunsCode(marker)))
    return ["model/.metadata"]


def plant_in_optimizer_entry(step_dir: Path, marker: Path) -> list[str]:
    """A non-tensor entry (the learning rate of group 0) now points at a pickle appended to the shard."""
    payload = io.BytesIO()
    torch.save(RunsCode(marker), payload)
    shard = step_dir / "model" / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as file:
        file.write(payload.getvalue())

    def point_at_payload(metadata) -> None:
        key = next(k for k in metadata.storage_data if k.fqn == "optim.param_groups.0.lr")
        metadata.storage_data[key] = dataclasses.replace(
            metadata.storage_data[key], offset=offset, length=len(payload.getvalue())
        )

    _rewrite_index(step_dir, point_at_payload)
    return ["model/.metadata", "model/__0_0.distcp"]


@pytest.mark.parametrize(
    ("plant", "refused_by", "names"),
    [
        (plant_in_rng_file, {"train"}, "rng/rank00000.pt"),
        (plant_in_dcp_index, {"train", "export", "eval"}, ".metadata"),
        (plant_in_optimizer_entry, {"train"}, "optim.param_groups.0.lr"),
    ],
    ids=["rng-file", "dcp-index", "optimizer-entry"],
)
def test_a_planted_pickle_never_runs_on_resume_export_or_eval(
    plant, refused_by, names, one_rank_run, demo_dataset, tmp_path, capfd
):
    run_dir, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(one_rank_run, run_dir)
    reseal(step_3(run_dir), plant(step_3(run_dir), marker))
    args = [
        f"run.dir={run_dir}",
        f"data.path={demo_dataset.path}",
        *BASE_OVERRIDES,
        *RUN,
        "train.max_steps=4",
    ]
    codes = {
        "train": cli_main(["train", "tiny", *args, "--nproc", "1"]),
        "export": cli_main(["export", str(run_dir), "--out", str(tmp_path / "hf")]),
        "eval": cli_main(["eval", str(run_dir), "--batches", "2"]),
    }
    err = capfd.readouterr().err
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert codes == {what: 2 if what in refused_by else 0 for what in codes}
    assert names in err  # the error names the file or entry it refused


def test_rng_file_of_the_old_pickled_format_is_refused_with_the_way_on(
    one_rank_run, demo_dataset, tmp_path, capfd
):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run, run_dir)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, step_3(run_dir) / "rng" / "rank00000.pt")
    reseal(step_3(run_dir), ["rng/rank00000.pt"])
    args = [
        f"run.dir={run_dir}",
        f"data.path={demo_dataset.path}",
        *BASE_OVERRIDES,
        *RUN,
        "train.max_steps=4",
    ]
    assert cli_main(["train", "tiny", *args, "--nproc", "1"]) == 2
    err = capfd.readouterr().err
    assert "predates safe loading" in err and "checkpoint.load=weights_only" in err


def test_rng_state_round_trips_through_weights_only_loading():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached gaussians are part of the state
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(),
        np.random.standard_normal(),
        torch.rand(2),
    )
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(2))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_export_reads_only_model_entries_and_writes_nothing_to_tmpdir(one_rank_run, tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    made: list[str] = []
    for name in ("mkdtemp", "_mkstemp_inner"):
        original = getattr(tempfile, name)

        def recording(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            made.append(result if isinstance(result, str) else result[1])
            return result

        monkeypatch.setattr(tempfile, name, recording)
    read: list[tuple[str, int]] = []
    original_read = FileSystemReader.read_data

    def recording_read(self, plan, planner):
        read.extend(
            (item.storage_index.fqn, self.storage_data[item.storage_index].length) for item in plan.items
        )
        return original_read(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", recording_read)

    export(one_rank_run, tmp_path / "hf")

    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert list(tmpdir.iterdir()) == [] and not [path for path in made if path.startswith(str(tmpdir))]
    assert read and all(fqn.startswith("model.") for fqn, _ in read)
    shards = sum(p.stat().st_size for p in (step_3(one_rank_run) / "model").glob("*.distcp"))
    assert sum(length for _, length in read) < shards / 2  # the AdamW moments are twice the weights


def test_a_checkpoints_own_code_runs_only_with_the_commands_flag(one_rank_run, tmp_path, capfd):
    """A step folder whose model_config.json names code (an auto_map pointing at a module that leaves a mark),
    and whose config.yaml says model.trust_remote_code=true (whoever wrote the folder chose that): export, eval,
    generate and compare without --trust-remote-code run nothing, each with one line naming the flag. So does an
    HF folder with such an auto_map."""
    run_dir, marker, code = tmp_path / "run", tmp_path / "code-ran", tmp_path / "code"
    shutil.copytree(one_rank_run, run_dir)
    code.mkdir()
    (code / "modeling_marker.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2LMHeadModel\nclass MarkerModel(GPT2LMHeadModel):\n    pass\n"
    )
    step = step_3(run_dir)
    values = json.loads((step / "model_config.json").read_text())
    values.update(_name_or_path=str(code), auto_map={"AutoModelForCausalLM": "modeling_marker.MarkerModel"})
    (step / "model_config.json").write_text(json.dumps(values))
    yaml_text = (step / "config.yaml").read_text()
    (step / "config.yaml").write_text(
        yaml_text.replace("trust_remote_code: false", "trust_remote_code: true")
    )
    assert "trust_remote_code: true" in (step / "config.yaml").read_text()
    reseal(step, ["model_config.json", "config.yaml"])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(values))
    capfd.readouterr()
    commands = {
        "export": ["export", str(run_dir), "--out", str(tmp_path / "out")],
        "eval": ["eval", str(run_dir), "--batches", "1"],
        "generate": ["generate", str(step), "--prompt", "a", "--max-new-tokens", "2"],
        "compare": ["compare", str(run_dir), str(one_rank_run), "--batches", "1"],
        "eval-hf": ["eval", str(hf), "--batches", "1"],
    }
    for name, args in commands.items():
        assert cli_main(args) == 2, name
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds a model with its own code" in err[0], (name, err)
        assert "it runs only with --trust-remote-code" in err[0], (name, err)
    assert not marker.exists(), "a command ran the folder's code without --trust-remote-code"
