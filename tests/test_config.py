"""Config loading, presets, overrides, the batch plan and the errors that name the key."""

from __future__ import annotations

import pytest

from launcher.cli import main as cli_main
from trainer.config import CONFIGS_DIR, FAMILIES, batch_plan, load_config, model_shape, to_yaml
from trainer.errors import UserError
from trainer.models.build import build_model

PRESETS = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
GPT2_PARAMS = {"gpt2-124m": 124.4e6, "gpt2-350m": 354.8e6, "gpt2-774m": 774.0e6, "gpt2-1.5b": 1557.6e6}


def test_every_model_size_has_a_preset():
    sizes = {size for family in FAMILIES.values() for size in family.presets}
    assert sizes and sizes <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_loads(preset):
    config = load_config(preset)
    assert config.model.size in FAMILIES[config.model.arch].presets
    assert config.run.dir and config.data.path


@pytest.mark.parametrize("size", sorted(GPT2_PARAMS))
def test_gpt2_presets_have_the_real_gpt2_parameter_counts(size):
    import torch

    with torch.device("meta"):
        model = build_model(load_config(size).model, 50257, 1024, "eager", seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - GPT2_PARAMS[size]) / GPT2_PARAMS[size] < 0.002, n_params


def test_overrides_apply_with_types(tmp_path):
    config = load_config(
        "tiny", ["train.lr=0.01", "model.n_layer=3", "checkpoint.async=true", f"run.dir={tmp_path}"]
    )
    assert config.train.lr == 0.01 and config.model.n_layer == 3 and config.checkpoint.async_save is True
    assert model_shape(config.model)["n_layer"] == 3
    assert config.run.dir == str(tmp_path)


def test_yaml_file_with_async_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {dir: r}\ndata: {path: d}\ncheckpoint: {async: true}\nlog: {wandb: off}\n")
    config = load_config(path)
    assert config.checkpoint.async_save is True and config.log.wandb == "off"
    assert "async: true" in to_yaml(config)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.learning_rate=1"], "unknown config key 'train.learning_rate'"),
        (["train.lr=fast"], "train.lr"),
        (["train.max_steps=1.5"], "train.max_steps"),
        (["model.size=gpt5"], "model.size='gpt5'"),
        (["train.precision=fp16"], "train.precision=fp16"),
        (["train.lr"], "train.lr"),
    ],
)
def test_bad_config_is_a_user_error_naming_the_key(overrides, needle):
    with pytest.raises(UserError) as error:
        load_config("tiny", overrides)
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(UserError) as error:
        load_config("tiny", ["train.max_steps=0", "parallel.backend=x", "eval.batches=0"])
    message = str(error.value)
    assert (
        "train.max_steps=0" in message and "parallel.backend='x'" in message and "eval.batches=0" in message
    )


def test_missing_required_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: d}\n")
    with pytest.raises(UserError, match="config key 'run.dir' is required"):
        load_config(path)


def test_missing_config_file_names_the_path():
    with pytest.raises(UserError, match="no/such.yaml"):
        load_config("no/such.yaml")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["train", "no/such.yaml"], "no/such.yaml"), (["train", "tiny", "train.oops=1"], "train.oops")],
)
def test_cli_config_errors_exit_2_with_one_line(capsys, argv, needle):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_batch_plan_derives_accumulation():
    config = load_config("tiny", ["train.global_batch_size=32", "train.micro_batch_size=4"])
    assert batch_plan(config.train, 1).grad_accum == 8
    assert batch_plan(config.train, 4, seq_len=128).grad_accum == 2
    assert batch_plan(config.train, 4, seq_len=128).tokens_per_step == 32 * 128


def test_batch_plan_remainder_names_the_three_numbers():
    config = load_config("tiny", ["train.global_batch_size=24", "train.micro_batch_size=4"])
    with pytest.raises(UserError) as error:
        batch_plan(config.train, 5)
    assert "train.global_batch_size=24" in str(error.value)
    assert "train.micro_batch_size=4" in str(error.value) and "world size 5" in str(error.value)
