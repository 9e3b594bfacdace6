"""`llm-train plan`: model-state bytes against real checkpoints and DeepSpeed's estimator, warnings, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_runs import train

from launcher.cli import main as cli_main
from launcher.local import launch_local
from launcher.plan import make_plan, model_shape_facts
from trainer.checkpoint import newest_valid_step
from trainer.config import load_config


def _checkpoint_state_bytes(run_dir: Path) -> int:
    """The bytes of the tensors in the newest checkpoint's DCP files (fp32 weights and AdamW moments), from
    its index: the files' own framing (a few hundred bytes a tensor) is left out, which on the tiny shape's
    2 MB would be 4%."""
    from trainer.checkpoint.dcp_read import read_metadata

    metadata = read_metadata(newest_valid_step(run_dir / "checkpoints").step_dir / "model")
    return sum(
        entry.size.numel() * entry.properties.dtype.itemsize
        for entry in metadata.state_dict_metadata.values()
        if hasattr(entry, "chunks")
    )


def _planned_state_bytes(config, vocab: int, seq_len: int, gpus: int) -> int:
    """What the plan says a checkpoint holds: weights and optimizer state of every GPU (gradients are not saved)."""
    plan = make_plan(config, vocab, seq_len, nodes=1, gpus_per_node=gpus, gpu="h100")
    return gpus * (plan.bytes_per_gpu["parameters"] + plan.bytes_per_gpu["optimizer"])


@pytest.mark.parametrize("size", ["tiny", "gpt2-124m"])
def test_planned_weights_and_optimizer_bytes_match_a_real_checkpoint(size, demo_dataset, tmp_path):
    """Tied embeddings (the presets' default): the checkpoint holds the shared tensor and its moments once."""
    overrides = [f"model.size={size}", "train.max_steps=1", "train.global_batch_size=2",
                 "train.micro_batch_size=1", "checkpoint.every_steps=1"]  # fmt: skip
    train(tmp_path / "run", demo_dataset.path, nproc=2, overrides=overrides)
    config = load_config(tmp_path / "run" / "config.yaml")
    planned = _planned_state_bytes(config, demo_dataset.vocab_size, demo_dataset.seq_len, gpus=2)
    saved = _checkpoint_state_bytes(tmp_path / "run")
    assert abs(planned - saved) / saved < 0.02, (planned, saved)


@pytest.mark.parametrize("size", ["gpt2-124m", "gpt2-350m", "gpt2-1.5b", "llama-1b", "llama-3b"])
def test_deepspeed_model_states_match_deepspeeds_own_estimator(size):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch = "llama" if size.startswith("llama") else "gpt2"
    config = load_config(size, ["run.dir=x", "data.path=x", f"model.arch={arch}", "parallel.backend=deepspeed",
                                "train.precision=bf16", "parallel.shard=full"])  # fmt: skip
    plan = make_plan(config, 50257, 1024, nodes=2, gpus_per_node=8, gpu="h100")
    states = sum(plan.bytes_per_gpu[name] for name in ("parameters", "gradients", "optimizer"))
    shape = model_shape_facts(config, 50257, 1024)
    _, gpu_mem, largest_layer = estimate_zero3_model_states_mem_needs(
        shape["params"], shape["largest_block"], num_gpus_per_node=8, num_nodes=2, cpu_offload=False
    )
    assert abs(states - (gpu_mem - largest_layer)) / (gpu_mem - largest_layer) < 0.02
    assert plan.params == shape["params"] and plan.shard_group == 16


def test_plan_warns_what_to_change_when_a_run_does_not_fit(capsys):
    args = ["plan", "gpt2-1.5b", "run.dir=x", "model.activation_checkpointing=false", "train.micro_batch_size=16",
            "--nodes", "1", "--gpus-per-node", "8", "--gpu", "l4"]  # fmt: skip
    assert cli_main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["warnings"] == [
        "does not fit: enable activation checkpointing (model.activation_checkpointing=true)"
    ]
    assert plan["activations_with_checkpointing"] < plan["activations_without_checkpointing"]
    assert plan["gpu_hours"] == pytest.approx(plan["wall_time_s"] * 8 / 3600)


def test_a_presets_plan_without_data_uses_its_own_vocabulary_and_context(capsys):
    """No dataset readable: a Llama 3.2 preset is planned with Llama 3's 128,256-token vocabulary (the published
    1B model has 1,235,814,400 parameters) and the config's own seq_len, and the note names only what it assumed."""
    args = ["plan", "llama-1b", "run.dir=x", "data.path=/nonexistent", "--nodes", "2", "--gpus-per-node", "8"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "1235.8M parameters" in text and "vocab 128256" in text and "seq_len" not in text.split("note")[-1]
    assert cli_main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["flops_per_step"] > 0 and plan["tokens_per_s"] * plan["step_time_s"] == pytest.approx(
        512 * 2048
    )


def test_plan_of_an_invalid_config_exits_2_naming_the_key(capsys):
    args = ["plan", "tiny", "run.dir=x", "train.micro_batch_size=1", "parallel.shard=3", "--nodes", "2",
            "--gpus-per-node", "2"]  # fmt: skip
    assert cli_main(args) == 2
    assert "parallel.shard=3" in capsys.readouterr().err


@pytest.mark.parametrize(("arch", "checkpointing"), [("gpt2", "noac"), ("llama", "ac")])
def test_activation_estimate_is_near_the_measured_cpu_peak(arch, checkpointing, tmp_path):
    """fp32 on the CPU, a 4 x 256 model, 8 x 256 tokens: within 20% of the peak memory a step adds (measured
    ratios: GPT-2 0.96 without and 0.96 with activation checkpointing, Llama 0.98 and 0.94; the CPU's SDPA keeps
    the s x s probabilities that flash-attn does not, the estimate's bytes per layer are checked alone in
    test_a_layers_activation_bytes_match_what_the_layer_saves). One family each way, to keep the suite short."""
    out = tmp_path / "measured.json"
    assert launch_local(1, [arch, checkpointing, str(out)], module="tests.activation_probe") == 0
    numbers = json.loads(out.read_text())
    assert 0.8 <= numbers["estimate"] / numbers["measured"] <= 1.2, numbers


class _FlashAttentionSaves(torch.autograd.Function):
    """What flash-attn keeps for backward (the attention `plan` assumes on a GPU): q, k, v, the output and the
    fp32 log-sum-exp; computed with SDPA, which on the CPU would keep the s x s probabilities instead."""

    @staticmethod
    def forward(ctx, query, key, value):  # noqa: ANN001, ANN205
        with torch.no_grad():
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, enable_gqa=True
            )
        ctx.save_for_backward(query, key, value, out, torch.empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        raise NotImplementedError("only the forward's saved tensors are measured")


def _layer_saved_bytes(model: torch.nn.Module, micro: int, seq_len: int) -> int:
    """The bytes one bf16 decoder layer keeps for backward (saved-tensor hooks; weights and shared storage
    counted once, weights not at all)."""
    from trainer.models.build import decoder_layers

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    layer = decoder_layers(model)[0]
    hidden = torch.randn(micro, seq_len, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq_len)[None]
    extra = {}
    if hasattr(model, "model") and hasattr(model.model, "rotary_emb"):
        extra = {"position_embeddings": model.model.rotary_emb(hidden, positions), "position_ids": positions}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(hidden, attention_mask=None, **extra)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ("gpt2", ["model.size=tiny", "model.n_embd=256", "model.n_head=4"]),
        ("gpt2", ["model.size=tiny", "model.n_embd=128", "model.n_head=2"]),
        ("llama", ["model.size=llama-tiny", "model.n_embd=256", "model.n_head=4", "model.n_kv_head=4", "model.intermediate_size=704"]),
        ("llama", ["model.size=llama-tiny", "model.n_embd=256", "model.n_head=8", "model.n_kv_head=2"]),
        ("llama", ["model.size=llama-tiny", "model.n_embd=128", "model.n_head=4", "model.n_kv_head=1", "model.intermediate_size=512"]),
    ],
)  # fmt: skip
def test_a_layers_activation_bytes_match_what_the_layer_saves(arch, shape):
    """`plan`'s bytes per token of one decoder layer (LAYER_BYTES: GPT-2's LayerNorm and tanh GELU, Llama's
    fp32 RMSNorm, SwiGLU and grouped key/values) within 10% of what the real bf16 layer keeps for backward,
    counted with saved-tensor hooks, at three Llama and two GPT-2 shapes."""
    from transformers import AttentionInterface

    from launcher.plan import layer_bytes_per_token
    from trainer.models.build import build_model

    AttentionInterface.register(
        "flash_saves",
        lambda module, q, k, v, mask, **kw: (_FlashAttentionSaves.apply(q, k, v).transpose(1, 2), None),
    )
    micro, seq_len = 2, 128
    config = load_config("tiny", ["run.dir=x", "data.path=x", f"model.arch={arch}", *shape])
    model = build_model(config.model, 512, seq_len, "sdpa", seed=0).to(torch.bfloat16)
    model.config._attn_implementation = "flash_saves"
    measured = _layer_saved_bytes(model, micro, seq_len) / (micro * seq_len)
    estimate = layer_bytes_per_token(model_shape_facts(config, 512, seq_len))
    assert 0.9 <= estimate / measured <= 1.1, (estimate, measured)
