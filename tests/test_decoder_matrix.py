"""Any decoder `transformers` ships, under both backends: tiny configs of the families users bring (padding rows,
tied and untied heads, QK-norm, sliding windows, parallel attention, MoE layers) each start, train 2 steps and
save on 2 ranks of FSDP2 and of DeepSpeed ZeRO-3, every family in turn in one set of ranks per backend, started by
torchrun. Under zero.Init most ranks hold empty partitions: a family's weight init (OLMo-2, Phi-3 and Gemma zero
their padding embedding row) must not run on them (it raised IndexError at start-up); a MoE's experts shard too."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import read_metrics

from trainer.checkpoint import newest_valid_step

COMMON = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
DECODERS: dict[str, tuple[str, dict]] = {
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 16}),  # QK-norm
    "mistral": ("mistral", {"sliding_window": 32}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 32, "pad_token_id": 0}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 32, "pad_token_id": 0}),
    "phi3": ("phi3", {"pad_token_id": 1}),
    "olmo2": ("olmo2", {"pad_token_id": 1}),
    "gpt_neox": ("gpt_neox", {"use_parallel_residual": True}),
    "falcon": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
        },
    ),  # fmt: skip
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
"""name -> (model_type, what its config sets beyond COMMON)."""
BACKENDS = ("fsdp", "deepspeed")


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("decoders")
    for name, (model_type, extra) in DECODERS.items():
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, **{**COMMON, **extra})
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
    return root


def test_every_decoder_family_starts_trains_and_saves_under_both_backends(
    model_folders, demo_dataset, tmp_path
):
    """Over 60 s: one launch of 2 ranks trains all 11 models in turn under FSDP2, then under ZeRO-3 (one launch
    per model and backend would cost a process start-up each)."""
    script = Path(__file__).with_name("decoder_matrix.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(model_folders), str(demo_dataset.path), str(tmp_path), ",".join(BACKENDS)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    trained = sorted(str(p.parent.relative_to(tmp_path)) for p in tmp_path.glob("*/*/metrics.jsonl"))
    assert result.returncode == 0, (trained, result.stderr[-3000:])
    for backend in BACKENDS:
        for name in DECODERS:
            records = read_metrics(tmp_path / backend / name)
            losses = [r["loss"] for r in records if "loss" in r]
            assert records[0]["world_size"] == 2 and records[0]["backend"] == backend, (backend, name)
            assert records[-1]["event"] == "done", (backend, name)
            assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), (backend, name, losses)
            assert newest_valid_step(tmp_path / backend / name / "checkpoints").step == 2, (backend, name)
