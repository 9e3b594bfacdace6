"""`llm-train eval` over several datasets, `llm-train compare` and `llm-train plot`, on real tiny runs (CPU)."""

from __future__ import annotations

import json
import shutil
import struct
import sysconfig
from pathlib import Path

import pytest
import yaml
from trainer_runs import read_metrics

from launcher.cli import main as cli_main
from launcher.plot import read_curves
from trainer.names import unique_names

BATCHES = ["--batches", "2"]


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def run_a(straight, tmp_path_factory) -> Path:
    """A copy of the 12-step FSDP run: eval appends to its metrics.jsonl, the shared fixture stays as it is."""
    copy = tmp_path_factory.mktemp("eval") / "run-a"
    shutil.copytree(straight["fsdp"], copy)
    return copy


@pytest.fixture(scope="module")
def other_data(demo_dataset, tmp_path_factory) -> Path:
    """A second dataset, other source files tokenized with the demo dataset's tokenizer."""
    from trainer.data.prepare import PrepareOptions, run_prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("other-data") / "other"
    run_prepare(
        PrepareOptions(
            inputs=[str(stdlib / "argparse.py"), str(stdlib / "dataclasses.py")],
            out=out,
            tokenizer=str(demo_dataset.path / "tokenizer"),
            seq_len=demo_dataset.seq_len,
            val_fraction=0.2,
            workers=1,
        )
    )
    return out


def run_cli(capsys, *args: str) -> str:
    assert cli_main([str(arg) for arg in args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def eval_json(capsys, *args: str) -> dict:
    return json.loads(run_cli(capsys, "eval", *args).strip().splitlines()[-1])


def table_rows(table: str) -> dict[str, list[str]]:
    """Table rows by model name (the lines after the `model step val_loss ...` header)."""
    lines = table.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "step"])
    rows = {}
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()[1:]
    return rows


def test_compare_prints_both_rows_and_the_loss_difference_to_the_first(run_a, capsys):
    b = step_dir(run_a, 6)
    rows = table_rows(run_cli(capsys, "compare", run_a, b, *BATCHES))
    assert set(rows) == {"run-a", "step_00000006"}
    assert rows["run-a"][0] == "12" and rows["step_00000006"][0] == "6"
    assert rows["run-a"][3:5] == ["-", "-"]  # the baseline has no difference to itself
    loss_a = eval_json(capsys, run_a, *BATCHES)["val_loss"]
    loss_b = eval_json(capsys, b, *BATCHES)["val_loss"]
    step, val_loss, _ppl, d_loss, _d_ppl = rows["step_00000006"]
    assert float(val_loss) == pytest.approx(loss_b, abs=1e-6)
    assert float(d_loss) == pytest.approx(loss_b - loss_a, abs=1e-6)


def test_compare_records_its_numbers_in_the_runs_metrics(run_a, capsys):
    result = json.loads(run_cli(capsys, "compare", run_a, step_dir(run_a, 6), *BATCHES, "--json"))
    recorded = [r for r in read_metrics(run_a) if r.get("dataset") == "data"][-2:]
    measured = [(m["step"], m["datasets"]["data"]["val_loss"]) for m in result["models"]]
    assert [(r["step"], r["val_loss"]) for r in recorded] == measured


def test_compare_json_gives_the_same_numbers_as_the_table(run_a, capsys):
    args = ["compare", run_a, step_dir(run_a, 6), *BATCHES]
    rows = table_rows(run_cli(capsys, *args))
    result = json.loads(run_cli(capsys, *args, "--json"))
    assert result["baseline"] == "run-a" and list(result["datasets"]) == ["data"]
    a, b = result["models"]
    assert (a["name"], a["step"], b["name"], b["step"]) == ("run-a", 12, "step_00000006", 6)
    numbers = b["datasets"]["data"]
    assert numbers["d_loss"] == pytest.approx(
        numbers["val_loss"] - a["datasets"]["data"]["val_loss"], abs=1e-12
    )
    assert numbers["d_ppl_pct"] == pytest.approx(
        100 * (numbers["val_ppl"] / a["datasets"]["data"]["val_ppl"] - 1), rel=1e-9
    )
    _step, val_loss, val_ppl, d_loss, d_ppl = rows["step_00000006"]
    assert float(val_loss) == pytest.approx(numbers["val_loss"], abs=1e-6)
    assert float(val_ppl) == pytest.approx(numbers["val_ppl"], abs=1e-3)
    assert float(d_loss) == pytest.approx(numbers["d_loss"], abs=1e-6)
    assert float(d_ppl.rstrip("%")) == pytest.approx(numbers["d_ppl_pct"], abs=0.01)


def test_compare_samples_are_printed_per_model_and_deterministic(run_a, capsys):
    args = ["compare", run_a, step_dir(run_a, 6), *BATCHES, "--prompt", "import os\n", "--prompt", "def "]
    args += ["--max-new-tokens", "12", "--seed", "3"]
    first, second = run_cli(capsys, *args), run_cli(capsys, *args)
    assert first == second
    samples = first[first.index("prompt 'import os\\n'") :]
    assert samples.count("[run-a]") == 2 and samples.count("[step_00000006]") == 2
    result = json.loads(run_cli(capsys, *args, "--json"))
    assert [item["prompt"] for item in result["samples"]] == ["import os\n", "def "]
    for item in result["samples"]:
        assert set(item["outputs"]) == {"run-a", "step_00000006"}
        assert all(text.startswith(item["prompt"]) for text in item["outputs"].values())


def test_compare_takes_an_export_of_the_run_and_rejects_another_tokenizer(run_a, tmp_path, capsys):
    export = tmp_path / "hf"
    run_cli(capsys, "export", run_a, "--out", export, "--dtype", "fp32")  # the same values: d_loss 0
    result = json.loads(run_cli(capsys, "compare", run_a, export, *BATCHES, "--json"))
    assert result["models"][1]["datasets"]["data"]["d_loss"] == pytest.approx(0.0, abs=1e-5)
    # The same model with two token ids swapped in its tokenizer: the same text gives other ids.
    odd = tmp_path / "odd-tokenizer"
    shutil.copytree(export, odd)
    spec = json.loads((odd / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    assert cli_main(["compare", str(run_a), str(export), str(odd), *BATCHES]) == 2
    error = capsys.readouterr().err
    assert "odd-tokenizer" in error and "tokenizer differs" in error and "'hf'" not in error
    assert len(error.strip().splitlines()) == 1


def test_eval_with_two_datasets_gives_both(run_a, demo_dataset, other_data, capsys):
    result = eval_json(
        capsys, step_dir(run_a, 9), "--data", demo_dataset.path, "--data", other_data, *BATCHES
    )
    assert result["step"] == 9 and set(result["datasets"]) == {"data", "other"}
    for name, path in (("data", demo_dataset.path), ("other", other_data)):
        alone = eval_json(capsys, step_dir(run_a, 9), "--data", path, *BATCHES)
        assert set(alone) == {"step", "val_loss", "val_ppl"}  # one dataset: the same line as before
        assert result["datasets"][name]["val_loss"] == pytest.approx(alone["val_loss"], abs=1e-9)
    assert result["datasets"]["data"]["val_loss"] != result["datasets"]["other"]["val_loss"]


def test_eval_of_a_run_appends_eval_lines_with_the_dataset_name(run_a, demo_dataset, other_data, capsys):
    before = len(read_metrics(run_a))
    result = eval_json(capsys, run_a, "--data", demo_dataset.path, "--data", other_data, *BATCHES)
    eval_json(capsys, step_dir(run_a, 3), *BATCHES)  # a step folder's run gets its line too
    added = read_metrics(run_a)[before:]
    assert [(line["step"], line["dataset"]) for line in added] == [(12, "data"), (12, "other"), (3, "data")]
    for line in added[:2]:
        assert line["source"] == "llm-train eval" and isinstance(line["time"], float)
        assert line["val_loss"] == result["datasets"][line["dataset"]]["val_loss"]


def test_eval_mirrors_its_lines_to_wandb_offline_when_the_run_uses_wandb(run_a, tmp_path, capsys):
    run = tmp_path / "wandb-run"
    shutil.copytree(run_a, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["log"]["wandb"] = "offline"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    eval_json(capsys, run, *BATCHES)
    history = b"".join(path.read_bytes() for path in run.glob("wandb/offline-run-*/run-*.wandb"))
    assert b"eval/data/val_loss" in history and b"eval/data/val_ppl" in history


def test_the_same_dataset_twice_gets_two_names():
    assert unique_names(["/x/a/data", "/x/b/data", "/x/a/data", "/y/other"]) == [
        "a/data",
        "b/data",
        "a/data#2",
        "other",
    ]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def test_plot_writes_a_png_of_exactly_the_requested_size(straight, tmp_path, capsys):
    out = tmp_path / "x.png"
    output = run_cli(
        capsys,
        "plot",
        straight["fsdp"],
        straight["deepspeed"],
        "--out",
        out,
        "--width",
        "640",
        "--height",
        "480",
    )
    assert png_size(out) == (640, 480)
    assert out.stat().st_size > 10_000  # axes, two curves, a legend: not a blank image
    assert f"wrote {out}" in output and not list(tmp_path.glob(".x.png.tmp*"))
    run_cli(capsys, "plot", straight["fsdp"], "--out", tmp_path / "default.png")
    assert png_size(tmp_path / "default.png") == (1200, 800)


def write_requeued_run(run_dir: Path) -> None:
    """metrics.jsonl of a run preempted after step 5, requeued, resumed from its step-4 checkpoint."""
    lines = [{"event": "start", "step": 0}]
    lines += [{"step": s, "loss": 5.0 - 0.1 * s, "tokens": 512 * s} for s in range(1, 6)]
    lines += [{"step": 4, "val_loss": 4.7, "val_ppl": 110.0}, {"event": "checkpoint", "step": 4}]
    lines += [{"event": "preempted", "step": 5, "signal": "SIGUSR2"}, {"event": "requeued", "step": 5}]
    lines += [{"event": "start", "step": 0}, {"event": "resume", "step": 4}]
    lines += [{"step": s, "loss": 4.0 - 0.1 * s, "tokens": 512 * s} for s in range(5, 9)]
    lines += [{"step": 8, "val_loss": 3.3, "val_ppl": 27.1}, {"event": "done", "step": 8}]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_plot_marks_preemption_and_resume_and_keeps_the_last_value_per_step(straight, tmp_path, capsys):
    run = tmp_path / "requeued"
    write_requeued_run(run)
    curves = read_curves(run)
    assert curves.events == [("preempted", 5, 2560), ("requeued", 5, 2560), ("resume", 4, 2048)]
    assert [tokens for tokens, _loss in curves.train] == [512 * s for s in range(1, 9)]
    assert curves.train[4] == (2560, pytest.approx(3.5))  # step 5 again after the resume: its last value
    assert curves.val == {"val": [(2048, 4.7), (4096, 3.3)]}
    output = run_cli(capsys, "plot", run, straight["fsdp"], "--out", tmp_path / "c.png")
    assert "preempted@5, requeued@5, resume@4" in output
    assert png_size(tmp_path / "c.png") == (1200, 800)


def test_plot_of_a_folder_that_is_not_a_run_exits_2_naming_it(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path) in error and "not a run folder" in error and len(error.strip().splitlines()) == 1
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no train lines" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
