"""Fine-tuning: model.init_from (export, run, checkpoint), checkpoint.load=weights_only, the finetune presets."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import read_metrics, since_last_start, train

from launcher.cli import main as cli_main
from trainer.checkpoint import newest_valid_step
from trainer.config import load_config
from trainer.data.prepare import PrepareOptions, run_prepare
from trainer.evaluation import validation_loss
from trainer.models.build import build_model
from trainer.models.load import full_state_dict, load_any

# Other standard-library files than the demo corpus's: a second domain with the same tokenizer.
SECOND_CORPUS = ("argparse.py", "difflib.py", "pprint.py", "tokenize.py")


@pytest.fixture(scope="module")
def exported(straight, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert cli_main(["export", str(straight["fsdp"]), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


@pytest.fixture(scope="module")
def second_corpus(demo_dataset, tmp_path_factory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("second-corpus") / "data"
    options = PrepareOptions(
        inputs=[str(stdlib / name) for name in SECOND_CORPUS],
        out=out,
        tokenizer=str(demo_dataset.path / "tokenizer"),
        seq_len=demo_dataset.seq_len,
        workers=1,
    )
    run_prepare(options)
    return out


def _tiny(init_from: str):
    return load_config("tiny", ["run.dir=unused", "data.path=unused", f"model.init_from={init_from}"]).model


def test_init_from_an_export_gives_exactly_the_exported_weights(exported, demo_dataset):
    model = build_model(_tiny(str(exported)), demo_dataset.vocab_size, demo_dataset.seq_len, "sdpa", seed=99)
    saved = load_file(exported / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() <= state.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_init_from_a_run_folder_gives_its_newest_checkpoints_weights(backend, straight, demo_dataset):
    model = build_model(
        _tiny(str(straight[backend])), demo_dataset.vocab_size, demo_dataset.seq_len, "sdpa", seed=99
    )
    expected = full_state_dict(newest_valid_step(straight[backend] / "checkpoints").step_dir)
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("backend", ["deepspeed"])  # from an FSDP checkpoint; FSDP runs fine-tune below
def test_weights_only_starts_at_step_0_with_a_fresh_schedule(backend, straight, demo_dataset, tmp_path):
    source = newest_valid_step(straight["fsdp"] / "checkpoints")
    extra = [
        f"parallel.backend={backend}", "train.max_steps=4", "checkpoint.every_steps=2",
        f"checkpoint.resume={straight['fsdp']}", "checkpoint.load=weights_only",
    ]  # fmt: skip
    records = train(tmp_path, demo_dataset.path, nproc=2, overrides=[*extra, "train.stop_at_step=2"])
    start = next(r for r in records if r.get("event") == "start")
    assert start["init_from"] == str(source.step_dir)
    assert not any(r.get("event") == "resume" for r in records)
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2]
    fresh = [r for r in read_metrics(straight["fsdp"]) if "loss" in r]
    assert train_lines[0]["lr"] == fresh[0]["lr"]  # warmup from step 0 again, not the source's step-12 rate
    assert train_lines[0]["loss"] < fresh[0]["loss"] - 0.2  # trained weights, not a fresh initialisation
    # Requeued (run again): this run's own checkpoint resumes in full; the source's weights are not reloaded.
    again = since_last_start(train(tmp_path, demo_dataset.path, nproc=2, overrides=extra))
    assert next(r for r in again if r.get("event") == "resume")["step"] == 2
    assert [r["step"] for r in again if "loss" in r] == [3, 4]


def test_finetuning_on_a_second_corpus_lowers_its_val_loss(exported, second_corpus, tmp_path):
    before = validation_loss(load_any(exported).model, str(second_corpus), batches=4)["val_loss"]
    args = [f"run.dir={tmp_path}", f"data.path={second_corpus}", f"model.init_from={exported}",
            "train.max_steps=30", "log.wandb=off", "eval.every_steps=0", "checkpoint.every_steps=30"]  # fmt: skip
    assert cli_main(["train", "finetune-tiny", *args, "--nproc", "2"]) == 0
    after = validation_loss(load_any(tmp_path).model, str(second_corpus), batches=4)["val_loss"]
    assert after < before - 0.02, (before, after)


def test_submit_gives_the_job_absolute_fine_tuning_paths(
    exported, straight, demo_dataset, tmp_path, monkeypatch
):
    from launcher.profiles import load_profile
    from launcher.slurm_job import prepare

    monkeypatch.chdir(exported.parent)
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.path={demo_dataset.path}", f"model.init_from={exported.name}",
                 f"checkpoint.resume={straight['fsdp']}", "checkpoint.load=weights_only"]  # fmt: skip
    submission = prepare("finetune-tiny", overrides, load_profile("local"))
    assert submission.config.model.init_from == str(exported)
    assert submission.config.checkpoint.resume == str(straight["fsdp"])
    assert submission.config.checkpoint.load == "weights_only"


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_a_resumed_init_from_run_trains_with_activation_checkpointing(
    backend, exported, demo_dataset, tmp_path, monkeypatch
):
    """init_from an HF folder (from_pretrained hands back a model in eval mode), resumed from the run's own
    checkpoint, so no step-0 evaluation puts it in train mode: the first step trains in train mode, and
    activation checkpointing recomputes every block in backward (transformers does only in train mode). Between
    micro batches an FSDP rank holds only its gradient shard, never a full-size accumulated gradient.

    tests/rank_hooks/sitecustomize.py counts each block's forward calls and the gradient elements held during
    the ranks' first step.
    """
    import json

    extra = [f"parallel.backend={backend}", f"model.init_from={exported}", "model.activation_checkpointing=true",
             "train.max_steps=2", "checkpoint.every_steps=1", "train.global_batch_size=8", "train.micro_batch_size=2"]  # fmt: skip
    train(tmp_path, demo_dataset.path, nproc=2, overrides=[*extra, "train.stop_at_step=1"])
    monkeypatch.setenv("LLM_TRAIN_TEST_FIRST_STEP", str(tmp_path / "first-step"))
    again = since_last_start(train(tmp_path, demo_dataset.path, nproc=2, overrides=extra))
    assert next(r for r in again if r.get("event") == "resume")["step"] == 1
    for rank in (0, 1):
        record = json.loads((tmp_path / f"first-step.rank{rank}.json").read_text())
        assert record["step"] == 2 and record["training"], record
        # Per micro batch, each block's forward runs twice: in the forward pass and recomputed in backward.
        assert record["grad_accum"] == 2
        assert record["block_calls"] == [2 * record["grad_accum"]] * len(record["block_calls"]), record
        if backend == "fsdp":  # 2 ranks: half the gradient each (1.0 when FSDP2 accumulates unsharded)
            assert len(record["gradient_held"]) == 1 and 0.4 < record["gradient_held"][0] <= 0.51, record
