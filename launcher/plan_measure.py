"""`llm-train plan --measure`: rank 0's memory in one real training step at the real world size, on fake tensors.

One process stands for rank 0 of N: a fake process group (its collectives return at once, N up to thousands),
`FakeTensorMode` (tensors have shapes, dtypes and devices, but neither memory nor values), and the trainer's own
code: the run's model, `FSDPBackend` (FSDP2 wrapping with the run's mixed precision, shard groups, activation
checkpointing and reduce-scatter after every micro batch) and its fused AdamW. A first step, untracked, creates
the optimizer's state; FSDP2's memory tracker (`torch.distributed._tools.fsdp2_mem_tracker`) then follows a
second one: forward and backward of its micro batches, and the optimizer update. Its peak, by category, is what
rank 0 holds at the worst moment of a step. Nothing of the model is ever allocated. Two micro batches stand
for any accumulation: gradients are reduce-scattered after every micro batch, so between micro batches a rank
holds its gradient shards whatever their number; the first micro batch runs without them, the second with
them (and the last one's all-reduce across hybrid replicas). The real step with 4 is held to this one in the
tests.

What it cannot see: NCCL's buffers, the CUDA context and the caching allocator's fragmentation (docs/plan.md says
what margin covers them), and kernels' internal workspace. The attention is SDPA's, which on the CPU keeps what
flash attention keeps (the output and its log-sum-exp). DeepSpeed's engine does not run on fake tensors: a
ZeRO-3 run is planned by the formula alone (`launcher/plan.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from trainer.config import Config

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
_CATEGORY_OF = {
    "Sharded Param": "parameters",
    "Unsharded Param": "parameters",
    "Buffer": "parameters",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "OptState": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "All Gather": "temporaries",
    "Reduce Scatter": "temporaries",
    "Inputs": "temporaries",
    "Parameter": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Other": "temporaries",
}
"""The memory trackers' reference types (FSDP2's, and the plain one's for a single unsharded rank) -> the plan's
categories (gathered weights count as parameters, the
collectives' buffers and the activations' gradients as temporaries)."""


@dataclass(frozen=True)
class MeasuredStep:
    """Rank 0's peak memory in a training step, in bytes: at the peak of the micro batches' forward and backward,
    by category (CATEGORIES), and over the whole step with the optimizer update (`peak`)."""

    by_category: dict[str, int]
    forward_backward_peak: int
    peak: int
    micro_batch_size: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "forward_backward_peak": self.forward_backward_peak,
                "by_category": self.by_category, "micro_batch_size": self.micro_batch_size,
                "seconds": round(self.seconds, 2)}  # fmt: skip


def track_step(backend: Any, batch: dict[str, torch.Tensor], grad_accum: int) -> MeasuredStep:
    """One step of `backend` (an `FSDPBackend`) on `batch` for each of `grad_accum` micro batches, after one
    untracked step that creates the optimizer's state: rank 0's peaks. Real or fake tensors alike (the tests
    hold the two against each other)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    started = time.perf_counter()
    backend.forward_backward(batch, last_micro_batch=True)
    backend.step()
    if isinstance(backend.module, FSDPModule):
        tracker = FSDPMemTracker(backend.module, backend.optimizer)
        tracker.track_inputs((batch,))
    else:  # one rank: the model is not sharded
        tracker = MemTracker()
        tracker.track_external(backend.module, backend.optimizer)
    with tracker:
        for micro in range(grad_accum):
            tracker.reset_mod_stats()  # the tracker follows one forward/backward per module at a time
            backend.forward_backward(batch, last_micro_batch=micro == grad_accum - 1)
        at_peak = dict(next(iter(tracker.get_tracker_snapshot("peak").values())))
        backend.step()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    by_category = dict.fromkeys(CATEGORIES, 0)
    for kind, size in at_peak.items():
        if kind != "Total":
            by_category[_CATEGORY_OF[str(getattr(kind, "value", kind))]] += int(size)
    micro = int(batch["input_ids"].shape[0])
    return MeasuredStep(by_category, int(at_peak["Total"]), int(peak), micro, time.perf_counter() - started)


MICRO_BATCHES_MEASURED = 2
"""Micro batches of the tracked step that stand for the run's accumulation (see the module docstring)."""


def text_batch(micro_batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab_size, (micro_batch_size, seq_len))}


class NotMeasurable(Exception):
    """The model's step cannot run on fake tensors (an op whose output shape depends on the data, such as a
    mixture of experts' routing): the formula's figures stand."""


def measure_step(
    config: Config, vocab_size: int, seq_len: int, world_size: int, gpus_per_node: int, shard_group: int,
    micro_batch_size: int | None = None, grad_accum: int | None = None,
) -> MeasuredStep:  # fmt: skip
    """Rank 0's peak in one training step of `config` at `world_size` ranks, on fake tensors in this process,
    its state sharded over groups of `shard_group` ranks (the plan's choice: `auto` would decide here, by this
    machine's devices). `micro_batch_size`/`grad_accum` replace the run's (the search for the largest micro
    batch uses 1 micro batch a step: FSDP2 holds only gradient shards between micro batches)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensorMode,
        UnsupportedOperatorException,
    )
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from trainer.config import batch_plan
    from trainer.distributed import DistEnv
    from trainer.models.build import ModelRecipe, model_config
    from trainer.parallel.fsdp import FSDPBackend
    from trainer.parallel.model_source import ModelSource

    plan = batch_plan(config.train, world_size, seq_len)
    micro = micro_batch_size or plan.micro_batch_size
    accum = min(grad_accum or plan.grad_accum, MICRO_BATCHES_MEASURED)
    plan = replace(plan, micro_batch_size=micro, grad_accum=accum)
    attention = "eager" if config.model.attn == "eager" else "sdpa"
    recipe = ModelRecipe(config.model, vocab_size, seq_len, attention, config.run.seed)
    env = DistEnv(0, world_size, 0, min(gpus_per_node, world_size), "127.0.0.1", 0)
    train = replace(config.train, compile=False)  # the compiled graph keeps what the eager one keeps
    measured_config = replace(config, train=train, parallel=replace(config.parallel, shard=str(shard_group)))
    source = ModelSource(recipe, model_config(config.model, vocab_size, seq_len), None)  # user errors here
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            backend = FSDPBackend(measured_config, source, plan, env, weights=False)
            return track_step(backend, text_batch(micro, seq_len, vocab_size), accum)
    except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as error:
        raise NotMeasurable(f"{type(error).__name__}: {error}") from error
    finally:
        dist.destroy_process_group()


FORMULA_OF = {"parameters": ("parameters",), "gradients": ("gradients",), "optimizer": ("optimizer",),
              "activations": ("activations",), "temporaries": ("buffers",)}  # fmt: skip
"""Each measured category -> the formula's figures it stands beside (`Plan.bytes_per_gpu`)."""
DIFFERENCE_MARK = 0.10
"""A category whose measured and formula figures differ by more than this share is marked."""


def compare_lines(measured: MeasuredStep, formula_bytes: dict[str, int]) -> list[str]:
    """The measured peak by category beside the formula's figures; '!' marks a difference over 10%."""
    lines = [f"measured     rank 0's peak in one step on fake tensors (micro batch {measured.micro_batch_size}, "
             f"{measured.seconds:.0f} s): {measured.peak / 1e9:.2f} GB; at the peak of forward/backward "
             f"{measured.forward_backward_peak / 1e9:.2f} GB, of which"]  # fmt: skip
    total = sum(formula_bytes.values())
    lines[0] = lines[0].replace(" GB;", f" GB (the formula: {total / 1e9:.2f} GB);", 1)
    for category in CATEGORIES:
        got = measured.by_category[category]
        expected = sum(formula_bytes.get(name, 0) for name in FORMULA_OF[category])
        differs = abs(got - expected) > DIFFERENCE_MARK * max(got, expected, 1)
        mark = "!" if differs and max(got, expected) > 1e6 else " "
        lines.append(
            f"  {mark} {category:<12} {got / 1e9:8.2f} GB measured, {expected / 1e9:8.2f} GB by the formula"
        )
    return lines


def largest_micro_batch(
    config: Config, vocab_size: int, seq_len: int, world_size: int, gpus_per_node: int, shard_group: int,
    room: float, most: int,
) -> tuple[int | None, list[MeasuredStep]]:  # fmt: skip
    """The largest micro batch (up to `most`) whose measured peak fits `room` bytes, by bisection on the peak
    (it grows with the micro batch); None when even 1 does not fit. Every measurement made is returned."""
    steps: list[MeasuredStep] = []

    def fits(micro: int) -> bool:
        steps.append(
            measure_step(config, vocab_size, seq_len, world_size, gpus_per_node, shard_group, micro, 1)
        )
        return steps[-1].peak <= room

    if not fits(1):
        return None, steps
    low, high = 1, max(most, 1)  # low fits; find the largest that fits in (low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low, steps
