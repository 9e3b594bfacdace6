"""`llm-train plan --measure`: the training step on fake tensors against the same step on real tensors, and the
command as a user runs it."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main as cli_main
from launcher.local import launch_local
from launcher.plan_measure import CATEGORIES, measure_step
from trainer.config import load_config

VOCAB, SEQ_LEN = 512, 128
SHAPES = {
    "gpt2": [["model.size=tiny"], ["model.size=tiny", "model.n_layer=3", "model.n_embd=128"],
             ["model.size=tiny", "model.n_embd=192", "model.n_head=6"]],
    "llama": [["model.size=llama-tiny"], ["model.size=llama-tiny", "model.n_layer=3", "model.n_embd=128"],
              ["model.size=llama-tiny", "model.n_embd=192", "model.n_head=6", "model.n_kv_head=2"]],
}  # fmt: skip
"""Three shapes a family, in fp32: with bf16 compute FSDP2 reduce-scatters fp32 gradients, which gloo (no native
reduce-scatter of its own for them) stages in more temporary memory than NCCL and the fake process group do; the
bf16 comparison belongs on a GPU (bench/gpu.py)."""


COMBINATIONS = (("true", 1), ("false", 4))
"""(activation checkpointing, micro batch): each value of both, in two runs."""


def _cells(world_size: int, shapes_per_family: int, combinations: int) -> list[dict]:
    """Every family's first `shapes_per_family` shapes, with the first `combinations` of COMBINATIONS, of a
    global batch of 4 per rank (accumulation 4 at micro batch 1, 1 at 4)."""
    cells = []
    for arch, shapes in SHAPES.items():
        for shape in shapes[:shapes_per_family]:
            for checkpointing, micro in COMBINATIONS[:combinations]:
                overrides = ["run.dir=x", "data.path=x", f"model.arch={arch}", *shape, f"model.seq_len={SEQ_LEN}",
                             "train.precision=fp32", f"model.activation_checkpointing={checkpointing}",
                             f"train.micro_batch_size={micro}", f"train.global_batch_size={4 * world_size}",
                             "train.compile=false"]  # fmt: skip
                cells.append({"overrides": overrides, "vocab": VOCAB, "seq_len": SEQ_LEN})
    return cells


@pytest.mark.parametrize(("world_size", "shapes_per_family", "combinations"), [(2, 3, 2), (4, 1, 1)])
def test_the_fake_step_measures_what_the_real_step_holds(
    world_size, shapes_per_family, combinations, tmp_path
):
    """GPT-2 and Llama at three shapes on 2 ranks, activation checkpointing on and off, micro batches 1 and 4
    (accumulation 4 and 1); on 4 ranks one shape each, with checkpointing at micro batch 1: rank 0's peak in forward/backward and each category there on fake tensors within 5% of the same
    step's on real tensors, on `world_size` gloo ranks (one launch runs every cell in turn). The whole step's
    peak too, where forward/backward holds it: the CPU's fused AdamW allocates temporaries that CUDA's single
    kernel (and its fake-tensor rule) does not, so the update's own peak is compared on a GPU (bench/gpu.py)."""
    cells = _cells(world_size, shapes_per_family, combinations)
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    # Forked from the suite's rank server (torch already imported), as `llm-train train --nproc` starts ranks.
    code = launch_local(world_size, [str(tmp_path / "cells.json"), str(tmp_path / "real.json")],
                        module="tests.measure_probe")  # fmt: skip
    assert code == 0, f"the real-tensor probe exited {code}"
    real = json.loads((tmp_path / "real.json").read_text())
    for cell, measured in zip(cells, real, strict=True):
        config = load_config("tiny", cell["overrides"])
        fake = measure_step(config, VOCAB, SEQ_LEN, world_size, world_size, world_size).to_dict()
        where = " ".join(cell["overrides"][2:])
        assert abs(fake["peak"] - measured["peak"]) <= 0.05 * measured["peak"], (where, fake, measured)
        for category in CATEGORIES:
            got, expected = fake["by_category"][category], measured["by_category"][category]
            assert abs(got - expected) <= 0.05 * max(expected, 0.02 * measured["peak"]), (
                where,
                category,
                fake,
                measured,
            )


def test_plan_measure_reports_the_peak_by_category_beside_the_formula_and_the_largest_micro_batch(capsys):
    """A small GPT-2 on 2 nodes x 8 GPUs, as a user runs it on a login node: the measured categories beside the
    formula's, marked where they differ by over 10%; --max-micro-batch by bisection on the measured peak (here
    every micro batch up to the global batch per GPU fits, and the peaks it measured grow with the micro batch);
    DeepSpeed falls back to the formula."""
    args = ["plan", "tiny", "run.dir=x", "data.path=/nonexistent", "model.n_embd=256", "model.vocab_size=8192",
            "model.seq_len=256", "train.global_batch_size=256", "train.micro_batch_size=4", "--nodes", "2",
            "--gpus-per-node", "8", "--gpu", "l4"]  # fmt: skip
    assert cli_main([*args, "--measure", "--max-micro-batch", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    measured = plan["measured"]
    assert set(measured["by_category"]) == set(CATEGORIES) and measured["micro_batch_size"] == 4
    assert measured["peak"] >= max(measured["by_category"].values()) > 0
    assert plan["max_micro_batch"] == 16 and plan["max_micro_batch_peaks"] == sorted(
        plan["max_micro_batch_peaks"]
    )
    assert cli_main([*args, "--measure"]) == 0
    text = capsys.readouterr().out
    assert "measured     rank 0's peak in one step on fake tensors" in text
    assert all(f" {category} " in text for category in CATEGORIES)
    assert cli_main([*args, "parallel.backend=deepspeed", "--measure"]) == 0
    assert "DeepSpeed's engine does not run on fake tensors" in capsys.readouterr().out


def test_a_model_whose_step_depends_on_the_data_falls_back_to_the_formula(tmp_path, capsys):
    """A mixture of experts routes tokens by value (`nonzero`), which fake tensors cannot follow: one line says
    so and the formula's plan stands (exit 0), instead of a traceback."""
    from transformers import AutoConfig

    AutoConfig.for_model(
        "qwen2_moe", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64,
    ).save_pretrained(tmp_path / "moe")  # fmt: skip
    args = ["plan", "tiny", "run.dir=x", "data.path=/nonexistent", "model.arch=hf", "model.size=null",
            f"model.hf_config={tmp_path / 'moe'}", "model.seq_len=128", "--nodes", "1", "--gpus-per-node", "2"]  # fmt: skip
    assert cli_main([*args, "--measure"]) == 0
    out = capsys.readouterr().out
    assert "memory/GPU" in out and "measured     none: this model's step does not run on fake tensors" in out
