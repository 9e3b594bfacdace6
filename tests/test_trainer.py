"""The trainer end to end on CPU with gloo: both backends, accumulation, attention, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_runs import losses, read_metrics, train

from launcher.cli import main as cli_main
from trainer.config import ModelConfig
from trainer.errors import UserError
from trainer.models.attention import choose_attention
from trainer.models.build import build_model
from trainer.optim import lr_at


@pytest.fixture(scope="module")
def backend_runs(demo_dataset, tmp_path_factory):
    """30 steps of each backend, world size 2, same seed and data."""
    runs = {}
    for backend in ("fsdp", "deepspeed"):
        run_dir = tmp_path_factory.mktemp(backend)
        overrides = [
            f"parallel.backend={backend}",
            "train.max_steps=30",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
        ]
        runs[backend] = train(run_dir, demo_dataset.path, nproc=2, overrides=overrides)
    return runs


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_first_loss_is_ln_vocab(backend_runs, demo_dataset, backend):
    first = losses(backend_runs[backend])[0]
    expected = math.log(demo_dataset.vocab_size)
    assert abs(first - expected) / expected < 0.05, (first, expected)


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_loss_falls_over_30_steps(backend_runs, backend):
    values = losses(backend_runs[backend])
    assert len(values) == 30
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < first - 0.4, f"mean loss of the first 5 steps {first:.3f}, of the last 5 {last:.3f}"


def test_backends_agree_for_first_5_steps(backend_runs):
    fsdp, ds = losses(backend_runs["fsdp"])[:5], losses(backend_runs["deepspeed"])[:5]
    for step, (a, b) in enumerate(zip(fsdp, ds, strict=True), start=1):
        assert abs(a - b) / abs(a) < 1e-3, f"step {step}: fsdp {a} vs deepspeed {b}"


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_bf16_on_cpu_follows_fp32_closely(backend_runs, demo_dataset, tmp_path, backend):
    """The bf16 path (FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16 section) runs on CPU too, so CI covers it.

    Same seed, data and batch as the fp32 runs; steps 1-3 use the same learning rates (warm-up).
    """
    batch = ["train.global_batch_size=8", "train.micro_batch_size=2"]
    records = train(tmp_path, demo_dataset.path, nproc=2,
                    overrides=[f"parallel.backend={backend}", "train.precision=bf16", "train.max_steps=3", *batch])  # fmt: skip
    bf16, fp32 = losses(records), losses(backend_runs[backend])[:3]
    assert bf16 != fp32, "the bf16 run computed exactly what fp32 did: bf16 was not applied"
    for step, (low, full) in enumerate(zip(bf16, fp32, strict=True), start=1):
        assert abs(low - full) / full < 1e-3, f"step {step}: bf16 {low} vs fp32 {full}"


def test_metrics_lines_have_spec_fields(backend_runs, demo_dataset):
    records = backend_runs["fsdp"]
    train_lines = [r for r in records if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "step_time_s", "mem_gb"):
        assert key in train_lines[0], key
    assert [r["step"] for r in train_lines] == list(range(1, 31))
    assert train_lines[-1]["tokens"] == 30 * 8 * demo_dataset.seq_len
    events = [r["event"] for r in records if "event" in r]
    assert events[0] == "start" and events[-1] == "done"


def test_gradient_accumulation_matches_across_world_sizes(demo_dataset, tmp_path):
    """Global batch 8 as (micro 4, 1 rank, accum 2) and (micro 2, 2 ranks, accum 2): the 1-to-N promise."""
    common = ["train.max_steps=5", "train.global_batch_size=8"]
    one = losses(
        train(tmp_path / "one", demo_dataset.path, nproc=1, overrides=[*common, "train.micro_batch_size=4"])
    )
    two = losses(
        train(tmp_path / "two", demo_dataset.path, nproc=2, overrides=[*common, "train.micro_batch_size=2"])
    )
    for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        assert abs(a - b) / abs(a) < 1e-5, f"step {step}: 1 rank {a} vs 2 ranks {b}"


def _losses_of_plain_steps(model: torch.nn.Module, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


def test_sdpa_and_eager_attention_give_the_same_loss():
    cfg = ModelConfig(size="tiny")
    sdpa = _losses_of_plain_steps(build_model(cfg, 256, 32, "sdpa", seed=1))
    eager = _losses_of_plain_steps(build_model(cfg, 256, 32, "eager", seed=1))
    assert sdpa == pytest.approx(eager, rel=1e-5)


def test_activation_checkpointing_gives_the_same_loss():
    plain = _losses_of_plain_steps(build_model(ModelConfig(size="tiny"), 256, 32, "sdpa", seed=1).train())
    ckpt_cfg = ModelConfig(size="tiny", activation_checkpointing=True)
    checkpointed_model = build_model(ckpt_cfg, 256, 32, "sdpa", seed=1).train()
    assert checkpointed_model.is_gradient_checkpointing
    assert _losses_of_plain_steps(checkpointed_model) == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize(
    ("capability", "flash_installed", "precision", "expected"),
    [
        ((9, 0), True, "bf16", "flash_attention_2"),
        ((8, 0), True, "bf16", "flash_attention_2"),
        ((8, 0), True, "fp16", "flash_attention_2"),
        ((9, 0), True, "fp32", "sdpa"),  # flash-attn takes only half precision
        ((8, 0), True, "fp32", "sdpa"),
        ((7, 5), True, "bf16", "sdpa"),
        ((9, 0), False, "bf16", "sdpa"),
        ((9, 0), False, "fp32", "sdpa"),
    ],
)
def test_auto_attention_choice(monkeypatch, capability, flash_installed, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("trainer.models.attention.flash_attn_importable", lambda: flash_installed)
    assert choose_attention("auto", torch.device("cuda", 0), precision) == expected


def test_flash_attention_forced_in_fp32_is_a_user_error_naming_both_keys(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("trainer.models.attention.flash_attn_importable", lambda: True)
    assert choose_attention("flash_attention_2", torch.device("cuda", 0), "bf16") == "flash_attention_2"
    with pytest.raises(UserError, match=r"model\.attn=flash_attention_2 .*train\.precision=fp32") as raised:
        choose_attention("flash_attention_2", torch.device("cuda", 0), "fp32")
    assert "\n" not in str(raised.value)


def test_auto_attention_on_cpu_is_sdpa():
    assert choose_attention("auto", torch.device("cpu"), "bf16") == "sdpa"


def test_auto_attention_falls_back_to_eager_without_sdpa(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "scaled_dot_product_attention")
    assert choose_attention("auto", torch.device("cpu"), "fp32") == "eager"


def test_tied_embeddings_stay_tied():
    model = build_model(ModelConfig(size="tiny"), 256, 32, "sdpa", seed=1)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_learning_rate_schedule_warms_up_then_decays_to_min_lr():
    from trainer.config import TrainConfig

    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20)
    rates = [lr_at(step, cfg) for step in range(20)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(rates[3:], rates[4:], strict=False))
    assert lr_at(20, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10"),
        (["parallel.backend=megatron"], "parallel.backend='megatron'"),
        (["--nproc", "0"], "--nproc 0"),
    ],
)
def test_bad_train_input_exits_2_naming_the_value(demo_dataset, tmp_path, capsys, args, needle):
    code = cli_main(["train", "tiny", f"run.dir={tmp_path}/run", f"data.path={demo_dataset.path}", *args])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_data_path_that_is_not_a_prepared_dataset_exits_2(tmp_path, capsys):
    (tmp_path / "notdata").mkdir()
    code = cli_main(["train", "tiny", f"run.dir={tmp_path}/run", f"data.path={tmp_path}/notdata"])
    assert code == 2
    assert str(tmp_path / "notdata") in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_bf16_steps_on_gpu(demo_dataset, tmp_path, backend):
    records = train(
        tmp_path,
        demo_dataset.path,
        nproc=1,
        overrides=[f"parallel.backend={backend}", "train.precision=bf16", "train.max_steps=5"],
    )
    values = losses(records)
    assert len(values) == 5 and all(math.isfinite(v) for v in values)
    assert read_metrics(tmp_path)[1]["mem_gb"] is not None
