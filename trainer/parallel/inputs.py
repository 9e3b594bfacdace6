"""What a batch from the loader becomes as the model's keyword arguments, the same for every backend."""

from __future__ import annotations

import torch


def model_inputs(
    batch: dict[str, torch.Tensor], num_items: torch.Tensor | None = None, attention: str = "sdpa"
) -> dict[str, torch.Tensor | int]:
    """Text batches train on every next token (labels = input_ids: transformers shifts them); instruction
    batches bring their own labels (responses only) and per-example positions, and their examples'
    boundaries go to the attention explicitly (`packed_example_inputs`).

    `num_items` makes the loss a sum divided by it (transformers' `num_items_in_batch`) instead of a mean
    over this micro batch's targets: the loop passes the step's target count over all micro batches and
    ranks, scaled so that the averaged gradients are those of one mean over the whole global batch.
    `attention` is the model's attention implementation (`model.config._attn_implementation`).
    """
    inputs: dict[str, torch.Tensor | int] = {
        "input_ids": batch["input_ids"],
        "labels": batch.get("labels", batch["input_ids"]),
    }
    if "position_ids" in batch:
        inputs = packed_example_inputs(
            inputs["input_ids"], inputs["labels"], batch["position_ids"], attention
        )
    if num_items is not None:
        inputs["num_items_in_batch"] = num_items
    return inputs


def packed_example_inputs(
    input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, attention: str
) -> dict[str, torch.Tensor | int]:
    """Rows of packed examples (positions restart at 0 at each example) with each example's attention
    confined to itself on every attention implementation, never left to a library's guess.

    transformers infers packing from `position_ids` only in some paths (its flash path only for a batch
    of one row), so the boundaries are passed explicitly. flash-attn: the rows are flattened into one
    and the examples' cumulative lengths given as `cu_seq_lens_*`/`max_length_*` (its varlen kernel; no
    mask, no cost). SDPA and eager: a 4-D block-causal mask per row (bool for SDPA, additive for eager),
    B x T x T bytes per micro batch, which `plan` counts. Flattening leaves the loss as it was: every
    example's first label is ignored, so no row's last token is trained to predict the next row.
    """
    starts = position_ids == 0
    starts[:, 0] = True  # a row always begins an example
    if "flash" in attention:
        flat_starts = starts.reshape(-1).nonzero().flatten()
        total = torch.tensor([starts.numel()], device=flat_starts.device)
        cu_seq_lens = torch.cat([flat_starts, total]).to(torch.int32)
        max_length = int(cu_seq_lens.diff().max())
        return {
            "input_ids": input_ids.reshape(1, -1),
            "labels": labels.reshape(1, -1),
            "position_ids": position_ids.reshape(1, -1),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length,
            "max_length_k": max_length,
        }
    example = starts.cumsum(-1)
    length = example.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=example.device).tril()
    allowed = ((example[:, :, None] == example[:, None, :]) & causal)[:, None]
    if attention == "sdpa":
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def prepare_attention(model: torch.nn.Module) -> str:
    """The attention implementation transformers resolved for `model` (sdpa when it names none); for
    flash-attn, the example boundaries are also made to reach every attention layer.

    Some models drop keyword arguments on the way down (GPT-2's LM head does not pass them to its trunk),
    so a pre-hook on the model keeps this call's `cu_seq_lens_*`/`max_length_*`, and one on each attention
    module adds them to its call. They stay until the next call replaces them, so that activation
    checkpointing's recomputation in the backward pass sees the same boundaries.
    """
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if "flash" not in attention or getattr(model, "_carries_boundaries", False):
        return attention
    boundaries: dict[str, object] = {}

    def keep(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        boundaries.clear()
        boundaries.update({key: kwargs[key] for key in BOUNDARY_KEYS if key in kwargs})

    def add(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**boundaries, **kwargs}

    model.register_forward_pre_hook(keep, with_kwargs=True)
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module.register_forward_pre_hook(add, with_kwargs=True)
    model._carries_boundaries = True
    return attention
