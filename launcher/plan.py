"""`llm-train plan`: memory per GPU, the largest micro batch that fits, step time, wall time and GPU-hours of a
run on a given cluster shape, before an allocation is spent on it.

Model states per GPU, sharded over a group of S ranks (`parallel.shard`), P parameters:
- FSDP2 keeps fp32 parameters and fp32 gradients (bf16 compute copies are gathered one block at a time):
  4 + 4 bytes, and AdamW's two fp32 moments, 8 bytes: 16 P / S.
- DeepSpeed ZeRO-3 in bf16 keeps bf16 parameters (2), fp32 gradient accumulation (4), fp32 master weights and
  moments (12) partitioned over every rank: 18 P / world (DeepSpeed's own estimator counts the same 18); in fp32
  16 P / world; hybrid (hpZ) adds a secondary copy of the 16-bit weights over each group: 2 P / S.
Temporary buffers: the gathered weights of the largest block (twice: the next one is prefetched) in the compute
dtype and its fp32 gradients for the reduce-scatter, plus the embedding/output layer gathered on the root.
Activations per micro batch of b sequences of s tokens, per layer, in 16-bit (LAYER_BYTES: measured with
saved-tensor hooks on a real layer, tests/test_plan.py): s b (12 h + 4 k + MLP) bytes, h the width, k the key/value
width; RMSNorm, which transformers computes in fp32, adds 8.2 h; the MLP keeps 8 f for a gated one (SwiGLU), 4 f
for a fused activation, 2 f for ReLU and 10 f for GPT-2's unfused tanh GELU (f the MLP width); twice that in fp32.
With activation checkpointing only each layer's input (2 s b h) plus one layer being recomputed; the logits and
their fp32 loss: 12 s b V bytes; with checkpointing the loss's memory and a layer's recomputation come one after
the other, so the larger counts. Packed instruction examples on SDPA or eager attention add their block-causal
mask, s^2 b bytes (SDPA's bool) or 4 s^2 b (eager's additive); flash-attn takes the boundaries as lengths.
Step time is FLOPs per step / (GPUs x peak x MFU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.config import Config, batch_plan
from trainer.errors import UserError
from trainer.shard_groups import group_size

GPUS: dict[str, tuple[float, float]] = {
    "h100": (80, 989.0),
    "h100-pcie": (80, 756.0),
    "h100-nvl": (94, 835.0),
    "h200": (141, 989.0),
    "b200": (180, 2250.0),
    "a100-40gb": (40, 312.0),
    "a100-80gb": (80, 312.0),
    "l40s": (48, 362.0),
    "l4": (24, 121.0),
}
"""--gpu NAME: (memory GB, dense bf16 peak TFLOP/s)."""
DEFAULT_MFU = 0.35
"""What a well-tuned dense decoder reaches on H100-class GPUs with FSDP2 and flash attention (torchtitan reports
0.35-0.45 for Llama 8B); --mfu sets another, e.g. one measured by bench/gpu.py."""
MLP_BYTES = {"gated": 8.0, "relu": 2.0, "gelu_new": 10.0, "fused": 4.0}
"""Bytes per token per MLP width that a layer's MLP keeps for backward in 16-bit: a gated MLP its gate, the
activation, the up projection and their product; an activation that torch computes in one op its input and
output; ReLU only its output; GPT-2's tanh GELU, which transformers computes as several eager ops, each of them."""
RMS_NORM_BYTES = 8.2
"""Bytes per token per width that two RMSNorms computed in fp32 (transformers' Llama-style norms) add."""
USABLE = 0.9
"""Share of a GPU's memory a run can use: the CUDA context, the allocator's fragmentation and NCCL take the rest."""


@dataclass
class Plan:
    model: str
    params: int
    nodes: int
    gpus_per_node: int
    gpu: str
    shard_group: int
    micro_batch_size: int
    grad_accum: int
    bytes_per_gpu: dict[str, int]
    """parameters, gradients, optimizer, buffers, activations (at the micro batch, as configured)."""
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    largest_micro_batch: int | None
    flops_per_step: float
    mfu: float
    step_time_s: float
    tokens_per_s: float
    wall_time_s: float
    gpu_hours: float
    vocab_size: int = 0
    seq_len: int = 0
    """The vocabulary and sequence length the figures use (the config's, its dataset's or assumed)."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(config: Config, vocab_size: int, seq_len: int, nodes: int, gpus_per_node: int, gpu: str,
              mfu: float | None = None, packed_examples: bool = False) -> Plan:  # fmt: skip
    """The plan of `config` on `nodes` x `gpus_per_node` GPUs of kind `gpu` (a key of GPUS); `packed_examples`:
    the data is instruction examples packed into rows (their attention mask is counted)."""
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes {nodes} and --gpus-per-node {gpus_per_node} must be at least 1")
    mfu = DEFAULT_MFU if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} must be in (0, 1]")
    memory_gb, peak_tflops = GPUS[gpu]
    world = nodes * gpus_per_node
    batch = batch_plan(config.train, world, seq_len)
    shape = model_shape_facts(config, vocab_size, seq_len)
    shard = group_size(
        config.parallel.shard, world, gpus_per_node, 16 * shape["params"], memory_gb * 1e9 * gpus_per_node
    )
    states = model_state_bytes(config, shape, shard, world)
    compute_bytes = 4 if config.train.precision == "fp32" else 2
    states["buffers"] = shape["largest_block"] * (2 * compute_bytes + 4) + shape["embedding"] * compute_bytes
    mask_bytes = packed_mask_bytes(config.model.attn) if packed_examples else 0
    without, with_ = (
        activation_bytes(shape, seq_len, batch.micro_batch_size, compute_bytes, ac, mask_bytes)
        for ac in (False, True)
    )
    activations = with_ if config.model.activation_checkpointing else without
    usable = USABLE * memory_gb * 1e9
    fixed = sum(states.values())
    largest = _largest_micro_batch(shape, seq_len, compute_bytes, config.model.activation_checkpointing,
                                   usable - fixed, config.train.global_batch_size // world, mask_bytes)  # fmt: skip
    flops_per_step = shape["flops_per_token"] * batch.global_batch_size * seq_len
    step_time = flops_per_step / (world * peak_tflops * 1e12 * mfu)
    plan = Plan(
        model=config.model.family_name, params=shape["params"], nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu,
        shard_group=shard, micro_batch_size=batch.micro_batch_size, grad_accum=batch.grad_accum,
        bytes_per_gpu={**states, "activations": activations}, activations_without_checkpointing=without,
        activations_with_checkpointing=with_, largest_micro_batch=largest, flops_per_step=flops_per_step, mfu=mfu,
        step_time_s=step_time, tokens_per_s=batch.global_batch_size * seq_len / step_time,
        wall_time_s=step_time * config.train.max_steps, gpu_hours=step_time * config.train.max_steps * world / 3600,
        vocab_size=vocab_size, seq_len=seq_len,
    )  # fmt: skip
    plan.warnings = _warnings(config, plan, usable, fixed, nodes, gpus_per_node)
    return plan


def model_shape_facts(config: Config, vocab_size: int, seq_len: int) -> dict[str, Any]:
    """Counted on the real model built on the meta device (no memory): parameters, the largest block's, the
    embedding's, width, MLP width, layers, FLOPs per token."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.models.build import decoder_layers, model_config, model_facts

    with torch.device("meta"):
        hf_config = model_config(config.model, vocab_size, seq_len)
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.model.trust_remote_code)
    facts = model_facts(model, seq_len, config.model.arch)
    blocks = decoder_layers(model)
    width = hf_config.hidden_size
    mlp = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * width
    return {
        "params": facts.n_params,
        "largest_block": max(sum(p.numel() for p in block.parameters()) for block in blocks),
        "embedding": model.get_input_embeddings().weight.numel(),
        "width": width,
        "mlp": mlp,
        "layers": len(blocks),
        "vocab": hf_config.vocab_size,
        "flops_per_token": facts.flops_per_token(),
        "kv_width": _kv_width(hf_config, width),
        "rms_norm": any("RMSNorm" in type(module).__name__ for module in blocks[0].modules()),
        "mlp_kind": _mlp_kind(blocks[0], hf_config),
    }


def _kv_width(hf_config: Any, width: int) -> int:
    heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_head", 1)
    head_dim = getattr(hf_config, "head_dim", None) or width // heads
    return (getattr(hf_config, "num_key_value_heads", None) or heads) * head_dim


def _mlp_kind(block: Any, hf_config: Any) -> str:
    """A key of MLP_BYTES for the block's MLP."""
    names = {name.rsplit(".", 1)[-1] for name, _ in block.named_modules()}
    if names & {"gate_proj", "gate_up_proj", "w3"}:
        return "gated"
    activation = getattr(hf_config, "activation_function", None) or getattr(hf_config, "hidden_act", "") or ""
    return activation if activation in MLP_BYTES else "fused"


def layer_bytes_per_token(shape: dict[str, Any]) -> float:
    """What one decoder layer keeps for backward per token in 16-bit (see the module docstring)."""
    norms = RMS_NORM_BYTES * shape["width"] if shape["rms_norm"] else 0.0
    return 12 * shape["width"] + 4 * shape["kv_width"] + norms + MLP_BYTES[shape["mlp_kind"]] * shape["mlp"]


def model_state_bytes(config: Config, shape: dict[str, Any], shard: int, world: int) -> dict[str, int]:
    """Parameters, gradients and optimizer state per GPU (see the module docstring).

    FSDP2 shards all of it over the group of `shard` ranks. DeepSpeed keeps ZeRO-3's partitions over every
    rank and, when hybrid (hpZ), adds a secondary copy of the 16-bit weights sharded within each group.
    """
    params = shape["params"]
    if config.parallel.backend != "deepspeed":
        sizes = {"parameters": 4, "gradients": 4, "optimizer": 8}
        return {name: math.ceil(size * params / shard) for name, size in sizes.items()}
    half = config.train.precision != "fp32"
    sizes = {"parameters": 2 if half else 4, "gradients": 4, "optimizer": 12 if half else 8}
    states = {name: math.ceil(size * params / world) for name, size in sizes.items()}
    if shard < world:
        states["parameters"] += math.ceil(sizes["parameters"] * params / shard)
    return states


def activation_bytes(
    shape: dict[str, Any],
    seq_len: int,
    micro: int,
    compute_bytes: int,
    checkpointing: bool,
    mask_bytes: int = 0,
) -> int:
    """`mask_bytes`: per token pair of a packed-example attention mask (0 when there is none)."""
    tokens = seq_len * micro
    per_layer = tokens * layer_bytes_per_token(shape) * compute_bytes / 2
    logits = 12 * tokens * shape["vocab"]
    mask = mask_bytes * seq_len * tokens
    if checkpointing:  # the layers' inputs, then the loss's or one layer's recomputation, not both at once
        return int(shape["layers"] * tokens * shape["width"] * compute_bytes + max(per_layer, logits) + mask)
    return int(shape["layers"] * per_layer + logits + mask)


def packed_mask_bytes(attn: str) -> int:
    """Bytes per token pair of the mask that keeps packed examples apart: none for flash-attn (lengths), a bool for
    SDPA, fp32 for eager. `auto` counts SDPA's: whether flash-attn imports on the compute nodes is not known here."""
    return {"flash_attention_2": 0, "eager": 4}.get(attn, 1)


def _largest_micro_batch(shape: dict[str, Any], seq_len: int, compute_bytes: int, checkpointing: bool,
                         room: float, most: int, mask_bytes: int) -> int | None:  # fmt: skip
    """The largest micro batch (up to the global batch per GPU) whose activations fit `room`; None if none."""
    best = None
    for micro in range(1, max(most, 1) + 1):
        if activation_bytes(shape, seq_len, micro, compute_bytes, checkpointing, mask_bytes) > room:
            break
        best = micro
    return best


def _warnings(config: Config, plan: Plan, usable: float, fixed: int, nodes: int, per_node: int) -> list[str]:
    total = fixed + plan.bytes_per_gpu["activations"]
    if total <= usable:
        return []
    if fixed > usable:
        needed = math.ceil(nodes * fixed / usable)
        return [f"does not fit: the model state alone takes {fixed / 1e9:.1f} GB per GPU; use at least {needed} nodes "
                f"(with parallel.shard=full) or a larger GPU"]  # fmt: skip
    if not config.model.activation_checkpointing and fixed + plan.activations_with_checkpointing <= usable:
        return ["does not fit: enable activation checkpointing (model.activation_checkpointing=true)"]
    if plan.largest_micro_batch:
        return [f"does not fit: lower train.micro_batch_size to {plan.largest_micro_batch}"]
    return ["does not fit even with one sequence per micro batch: use more nodes or a shorter model.seq_len"]


def format_plan(plan: Plan) -> str:
    gb = {name: f"{size / 1e9:.2f} GB" for name, size in plan.bytes_per_gpu.items()}
    total = sum(plan.bytes_per_gpu.values()) / 1e9
    lines = [
        f"model        {plan.model}, {plan.params / 1e6:.1f}M parameters",
        f"layout       {plan.nodes} node(s) x {plan.gpus_per_node} {plan.gpu}; state sharded over groups of "
        f"{plan.shard_group}; micro batch {plan.micro_batch_size} x accumulation {plan.grad_accum}",
        "memory/GPU   "
        + ", ".join(f"{name} {size}" for name, size in gb.items())
        + f"; total {total:.2f} GB",
        f"activations  {plan.activations_without_checkpointing / 1e9:.2f} GB without activation checkpointing, "
        f"{plan.activations_with_checkpointing / 1e9:.2f} GB with; largest micro batch that fits: "
        f"{plan.largest_micro_batch or 'none'}",
        f"time         {plan.flops_per_step / 1e15:.2f} PFLOP per step; {plan.step_time_s:.2f} s/step and "
        f"{plan.tokens_per_s:,.0f} tokens/s at MFU {plan.mfu:.2f}; {plan.wall_time_s / 3600:.1f} h for the run, "
        f"{plan.gpu_hours:,.0f} GPU-hours",
    ]
    return "\n".join(lines + [f"warning      {warning}" for warning in plan.warnings])


def plan_inputs(config: Config) -> tuple[int, int, str]:
    """(vocabulary, sequence length, note): from the config or its dataset, else assumed (the note says which)."""
    from launcher.doctor.run import DEFAULT_SEQ_LEN, assumed_vocab, dataset_info

    info = dataset_info(config)
    vocab = config.model.vocab_size or (info.vocab_size if info else None)
    seq_len = config.model.seq_len or (info.seq_len if info else None)
    assumed = []
    if not vocab:
        vocab = assumed_vocab(config)
        whose = (
            "the model's config"
            if config.model.arch == "hf"
            else f"the {config.model.arch} family's published tokenizer"
        )
        assumed.append(f"vocab {vocab} ({whose})")
    if not seq_len:
        seq_len = DEFAULT_SEQ_LEN
        assumed.append(f"seq_len {seq_len}")
    note = f"\nnote         {' and '.join(assumed)} assumed: the data did not load here" if assumed else ""
    return vocab, seq_len, note


def plan_for_config(
    config: Config, nodes: int, gpus_per_node: int, gpu: str, mfu: float | None = None
) -> tuple[Plan, str]:
    """The plan with the vocabulary and context length from the config or its dataset (a note when they had to
    be assumed because the data could not be read here)."""
    vocab, seq_len, note = plan_inputs(config)
    packed = _prepared_format(config) not in (None, "text")
    return make_plan(config, vocab, seq_len, nodes, gpus_per_node, gpu, mfu, packed), note


def usable_bytes(gpu: str) -> float:
    """What a run may use of one GPU of kind `gpu` (USABLE of its memory)."""
    return USABLE * GPUS[gpu][0] * 1e9


def _prepared_format(config: Config) -> str | None:
    """The dataset's `--format` from its prepare.json (None when it cannot be read here)."""
    import json
    from pathlib import Path

    try:
        return json.loads((Path(config.data.path) / "prepare.json").read_text()).get("format", "text")
    except (OSError, ValueError):
        return None
