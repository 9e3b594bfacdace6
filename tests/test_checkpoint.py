"""Checkpoints end to end on CPU with gloo: exact resume, kill -9, damage, world-size change, export."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from gguf_checks import assert_gguf_follows_the_export
from trainer_runs import (
    BACKENDS,
    BASE_OVERRIDES,
    BATCH,
    by_step,
    kill_group,
    overrides,
    read_metrics,
    resume_step,
    start_training,
    train,
    wait_for,
)

from launcher.cli import main as cli_main
from trainer.checkpoint import newest_valid_step
from trainer.checkpoint.steps import LATEST, step_dir_name
from trainer.models.load import full_state_dict
from trainer.resilience.fault_injection import SLEEP_IN_SAVE_ENV


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_dir_name(step)


@pytest.fixture(scope="module")
def stopped_at_6(demo_dataset, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Per backend and world size: a run that stopped after step 6 (with its checkpoint)."""
    runs = {}
    for backend in BACKENDS:
        for nproc in (1, 2):
            run_dir = tmp_path_factory.mktemp(f"stop6-{backend}-{nproc}")
            train(
                run_dir, demo_dataset.path, nproc=nproc, overrides=overrides(backend, "train.stop_at_step=6")
            )
            runs[backend, nproc] = run_dir
    return runs


def resume_copy(source: Path, target: Path, data: Path, backend: str, nproc: int) -> list[dict]:
    shutil.copytree(source, target)
    return train(target, data, nproc=nproc, overrides=overrides(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(
    backend, straight, stopped_at_6, demo_dataset, tmp_path
):
    records = resume_copy(stopped_at_6[backend, 2], tmp_path / "run", demo_dataset.path, backend, nproc=2)
    assert resume_step(records) == 6
    expected, got = by_step(read_metrics(straight[backend])), by_step(records)
    assert [got[s] for s in range(7, 13)] == [expected[s] for s in range(7, 13)]
    final_resumed = full_state_dict(ckpt(tmp_path / "run", 12))
    final_straight = full_state_dict(ckpt(straight[backend], 12))
    assert final_resumed.keys() == final_straight.keys()
    for name, tensor in final_straight.items():
        assert torch.equal(final_resumed[name], tensor), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size(
    backend, saved_on, resumed_on, straight, stopped_at_6, demo_dataset, tmp_path
):
    """Global batch unchanged; the loss continues the straight run's (the same samples in the same steps)."""
    records = resume_copy(
        stopped_at_6[backend, saved_on], tmp_path / "run", demo_dataset.path, backend, resumed_on
    )
    assert resume_step(records) == 6
    resumed = next(r for r in records if r.get("event") == "resume")
    assert resumed["from_world_size"] == saved_on
    assert [r for r in records if r.get("event") == "start"][-1]["world_size"] == resumed_on
    expected, got = by_step(read_metrics(straight[backend])), by_step(records)
    for step in range(7, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_async_save_gives_the_same_checkpoints_and_losses(straight, demo_dataset, tmp_path):
    records = train(
        tmp_path, demo_dataset.path, nproc=2, overrides=overrides("fsdp", "checkpoint.async=true")
    )
    assert by_step(records) == by_step(read_metrics(straight["fsdp"]))
    for step in (3, 6, 9, 12):
        assert (ckpt(tmp_path, step) / "manifest.json").is_file()
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == step_dir_name(12)


@pytest.mark.parametrize(
    ("backend", "extra"),
    [("fsdp", ["checkpoint.async=true"]), ("deepspeed", [])],
    ids=["fsdp-async", "deepspeed"],
)
def test_kill_9_in_the_middle_of_a_save(backend, extra, straight, demo_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, demo_dataset.path, overrides(backend, *extra), {SLEEP_IN_SAVE_ENV: "6:60"})
    try:
        # Step 6's shards are on disk, its manifest is not: the save is under way.
        wait_for(lambda: (ckpt(run_dir, 6) / "rng" / "rank00001.pt").is_file() or proc.poll() is not None)
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        kill_group(proc)
    assert not (ckpt(run_dir, 6) / "manifest.json").exists()
    assert newest_valid_step(run_dir / "checkpoints").step == 3
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=overrides(backend, *extra))
    assert resume_step(records) == 3
    expected = by_step(read_metrics(straight[backend]))
    after = [
        r
        for r in records[records.index(next(r for r in records if r.get("event") == "resume")) :]
        if "loss" in r
    ]
    assert [(r["step"], r["loss"]) for r in after] == [(s, expected[s]) for s in range(4, 13)]


def test_kill_9_at_a_random_moment(straight, demo_dataset, tmp_path):
    """Saving every step (which changes no loss) keeps the 12 steps long enough to be hit while running."""
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, demo_dataset.path, overrides("fsdp", "checkpoint.every_steps=1"), {})
    try:
        wait_for(lambda: '"loss"' in _text(run_dir / "metrics.jsonl") or proc.poll() is not None)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
        assert proc.poll() is None, "the run ended before the kill"
    finally:
        kill_group(proc)
    newest = newest_valid_step(run_dir / "checkpoints")
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=overrides("fsdp"))
    start = resume_step(records) if newest else 0
    assert start == (newest.step if newest else 0)
    expected = by_step(read_metrics(straight["fsdp"]))
    got = by_step(records[max(i for i, r in enumerate(records) if r.get("event") == "start") :])
    assert got == {s: expected[s] for s in range(start + 1, 13)}


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _truncate(step_dir: Path) -> str:
    shard = max((p for p in step_dir.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return "bytes"


def _flip_byte(step_dir: Path) -> str:
    shard = max((p for p in step_dir.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return "checksum"


def _drop_manifest(step_dir: Path) -> str:
    (step_dir / "manifest.json").unlink()
    return "no manifest.json"


@pytest.mark.parametrize(
    "damage", [_truncate, _flip_byte, _drop_manifest], ids=["truncated", "flipped-byte", "no-manifest"]
)
def test_damaged_newest_step_falls_back_to_the_previous_one(damage, straight, demo_dataset, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(straight["fsdp"], run_dir)
    reason = damage(ckpt(run_dir, 12))
    with caplog.at_level(logging.WARNING):
        assert newest_valid_step(run_dir / "checkpoints").step == 9
    assert any(step_dir_name(12) in r.message and reason in r.message for r in caplog.records), caplog.text
    # Training resumes from step 9, never from the damaged 12, and recomputes 10-12 exactly.
    records = train(run_dir, demo_dataset.path, nproc=2, overrides=overrides("fsdp"))
    resumed = records[max(i for i, r in enumerate(records) if r.get("event") == "start") :]
    assert resume_step(resumed) == 9
    expected = by_step(read_metrics(straight["fsdp"]))
    assert by_step(resumed) == {s: expected[s] for s in (10, 11, 12)}


@pytest.mark.parametrize("latest_text", ["", "step_00000099\n"], ids=["empty", "dangling"])
def test_bad_latest_file_is_ignored_with_a_warning(latest_text, straight, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(straight["fsdp"], run_dir)
    (run_dir / "checkpoints" / LATEST).write_text(latest_text)
    with caplog.at_level(logging.WARNING):
        assert newest_valid_step(run_dir / "checkpoints").step == 12
    assert "latest" in caplog.text


def test_retention_keeps_exactly_keep_last_complete_steps(demo_dataset, tmp_path):
    (tmp_path / "checkpoints" / step_dir_name(1)).mkdir(parents=True)  # an old incomplete attempt
    train(tmp_path, demo_dataset.path, nproc=1, overrides=["train.max_steps=8", "checkpoint.every_steps=2",
                                                          "checkpoint.keep_last=2", *BATCH])  # fmt: skip
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert remaining == [step_dir_name(6), step_dir_name(8)]
    assert all((tmp_path / "checkpoints" / name / "manifest.json").is_file() for name in remaining)


def test_resume_with_another_backend_is_refused(straight, demo_dataset, tmp_path, capsys):
    shutil.copytree(straight["fsdp"], tmp_path / "run")
    args = [
        f"run.dir={tmp_path / 'run'}",
        f"data.path={demo_dataset.path}",
        *BASE_OVERRIDES,
        *overrides("deepspeed"),
    ]
    assert cli_main(["train", "tiny", *args, "--nproc", "2"]) == 2


def tensor_bytes(path: Path, count: bool = False) -> Any:
    """The bytes of the tensors a safetensors file holds (its header aside); with `count`, their names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if count:
            return list(handle.keys())
        return sum(handle.get_tensor(name).nbytes for name in handle.keys())  # noqa: SIM118


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_round_trip_through_transformers(backend, straight, tmp_path, capsys):
    """fp32, streamed from either backend's shards into safetensors files of at most 0.2 MB (several, with their
    index): the trainer's logits exactly (1e-5). The default bf16 folder, as a serving user
    takes it (from FSDP's checkpoint: what follows the loading is the same for both): bf16
    weights within 2e-2 of the trainer's logits; the tokenizer's own end, start and pad ids in config.json and
    generation_config.json (not GPT-2's 50256), the KV cache on, no token type ids, the model's context as
    model_max_length, plain `generate(**tokenizer(text))` working and stopping at the end token; an absolute
    data path, files readable by other accounts, and a checksum of every file."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from trainer.config import load_config
    from trainer.models.build import build_model

    out, serving = tmp_path / "hf", tmp_path / "serving"
    export = [
        "export",
        str(straight[backend]),
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--max-shard-size",
        "0.2MB",
    ]
    assert cli_main(export) == 0
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert all(tensor_bytes(shard) <= 0.2e6 or len(tensor_bytes(shard, count=True)) == 1 for shard in shards)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The trainer's own model, built as training builds it, holding the checkpoint's tensors.
    state = full_state_dict(ckpt(straight[backend], 12))
    config = load_config(ckpt(straight[backend], 12) / "config.yaml")
    vocab, seq_len = state["transformer.wpe.weight"].shape[0], state["transformer.wpe.weight"].shape[0]
    trainer_model = build_model(
        config.model, state["transformer.wte.weight"].shape[0], seq_len, "sdpa", seed=0
    )
    trainer_model.load_state_dict(state, strict=False)
    trainer_model.eval()
    inputs = tokenizer("def parse(text):\n    return text", return_tensors="pt")
    with torch.no_grad():
        expected, got = trainer_model(inputs["input_ids"]).logits, hf_model(inputs["input_ids"]).logits
    assert vocab == seq_len and torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    if backend == "deepspeed":
        return  # from here on the folder is written from the loaded model, the same for both backends
    assert cli_main(["eval", str(straight[backend]), "--batches", "2"]) == 0  # the card's final perplexity
    assert cli_main(["export", str(straight[backend]), "--out", str(serving)]) == 0
    model = AutoModelForCausalLM.from_pretrained(serving, dtype="auto").eval()  # the weights as stored
    tokenizer = AutoTokenizer.from_pretrained(serving)
    end = tokenizer.eos_token_id
    assert (
        model.dtype == torch.bfloat16
        and json.loads((serving / "config.json").read_text())["dtype"] == "bfloat16"
    )
    with torch.no_grad():
        assert (model(inputs["input_ids"]).logits.float() - expected).abs().max() <= 2e-2
    generation = GenerationConfig.from_pretrained(serving)
    assert end == 0 and (model.config.eos_token_id, generation.eos_token_id) == (end, end)
    assert (
        tokenizer.pad_token_id == generation.pad_token_id == end
        and model.config.use_cache
        and generation.use_cache
    )
    assert tokenizer.model_max_length == seq_len
    encoded = tokenizer("def parse(text):", return_tensors="pt")
    assert set(encoded) == {"input_ids", "attention_mask"}
    model.generation_config.forced_eos_token_id = None
    with torch.no_grad():
        bias = torch.zeros(model.config.vocab_size)
        bias[end] = 1e4  # a model that ends at once: generation must stop there, not run on to max_new_tokens
        model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
        produced = model.generate(**encoded, max_new_tokens=20, do_sample=False)
    assert produced[0, encoded["input_ids"].shape[1] :].tolist() == [end]
    info = json.loads((serving / "llm_training.json").read_text())
    assert Path(info["data_path"]).is_absolute() and info["step"] == 12
    assert (serving.stat().st_mode & 0o055) == 0o055 and all(
        p.stat().st_mode & 0o044 == 0o044 for p in serving.iterdir()
    )
    card = (serving / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"license", "language", "tags", "datasets", "metrics"} <= set(front) and "gpt2" in front["tags"]
    assert f"parameters: {sum(p.numel() for p in model.parameters()):,}" in card
    assert "steps: 12, tokens seen:" in card and "documents: 7 read" in card and "tokenizer: bpe:512" in card
    assert "validation perplexity" in card and "2 ranks on 1 node(s), cpu, " + backend in card
    sums = dict(
        reversed(line.split("  ", 1)) for line in (serving / "checksums.sha256").read_text().splitlines()
    )
    assert set(sums) == {p.name for p in serving.iterdir()} - {"checksums.sha256"}
    assert all(
        hashlib.sha256((serving / name).read_bytes()).hexdigest() == digest for name, digest in sums.items()
    )


def test_export_writes_gguf_files_that_transformers_runs_as_the_export(straight, tmp_path):
    """--gguf f16 and q8_0 (GPT-2): see tests/gguf_checks.py for what is compared."""
    out = tmp_path / "gguf"
    export = [
        "export",
        str(straight["fsdp"]),
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--gguf",
        "f16",
        "--gguf",
        "q8_0",
    ]
    assert cli_main(export) == 0
    sums = (out / "checksums.sha256").read_text()
    assert "model-f16.gguf" in sums and "model-q8_0.gguf" in sums
    assert_gguf_follows_the_export(out, Path(__file__).read_text()[:4000])


def test_export_refuses_bad_input_in_one_line_and_leaves_nothing_half_written(straight, tmp_path, capsys):
    """A non-empty --out (kept as it was), weights that fp16 cannot hold (a value of 1e6: refused, naming the
    tensor, before anything appears at --out), a GGUF of a family llama.cpp files are not written for, a shard
    size that is not one: exit 2 and one line each."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert cli_main(["export", str(straight["fsdp"]), "--out", str(taken)]) == 2
    assert (taken / "mine.txt").read_text() == "keep" and len(list(taken.iterdir())) == 1
    large = tmp_path / "large"
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e6
    model.save_pretrained(large)
    out = tmp_path / "fp16"
    assert cli_main(["export", str(large), "--out", str(out), "--dtype", "fp16"]) == 2
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".fp16")] == []
    qwen = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=32)).save_pretrained(qwen)  # fmt: skip
    assert cli_main(["export", str(qwen), "--out", str(out), "--gguf", "q8_0"]) == 2
    assert not out.exists()
    assert cli_main(["export", str(straight["fsdp"]), "--out", str(out), "--max-shard-size", "lots"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 4, errors
    assert f"--out '{taken}' already exists" in errors[0]
    assert "--dtype fp16: transformer.h.0.mlp.c_fc.weight holds values beyond fp16's range" in errors[1]
    assert (
        "--gguf: llama.cpp files are written for gpt2 and llama models; this is a 'qwen2' model" in errors[2]
    )
    assert "'lots' is not a size" in errors[3]


def test_eval_prints_step_loss_and_perplexity_as_json(straight, capsys):
    assert cli_main(["eval", str(straight["fsdp"]), "--batches", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 12
    assert result["val_ppl"] == pytest.approx(2.718281828459045 ** result["val_loss"], rel=1e-9)


def test_generate_is_deterministic_with_a_seed(straight, tmp_path, capsys):
    args = ["generate", str(straight["fsdp"]), "--prompt", "import os\n", "--max-new-tokens", "16"]
    texts = []
    for seed in ("1", "1", "2"):
        assert cli_main([*args, "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("import os")
    assert texts[0] != texts[2]


def test_eval_of_a_folder_without_checkpoints_exits_2(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert cli_main(["eval", str(tmp_path / "run")]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
