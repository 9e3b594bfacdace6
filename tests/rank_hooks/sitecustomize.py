"""Test hook for local training runs, imported by Python at start-up when this folder is on PYTHONPATH.

LLM_TEST_FIRST_STEP=PREFIX makes each rank write PREFIX.rankN.json after the first training step of its
process: the step, whether the model was in train mode during it, how many times each transformer block's
forward ran, and the micro batches per step. With activation checkpointing at work every block runs twice
per micro batch (the forward, then its recomputation in backward), once without. It observes only.
"""

import os

_prefix = os.environ.get("LLM_TEST_FIRST_STEP", "")
if _prefix:
    import json
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from typing import Any

    import torch

    import trainer.loop
    from trainer.models.build import decoder_layers
    from trainer.state import LoopContext

    _train_step = trainer.loop.train_step
    _observed_steps: list[int] = []

    def _observed_train_step(
        ctx: LoopContext, batches: Iterator[dict[str, torch.Tensor]], step: int, batch_index: int
    ) -> tuple[float, float]:
        if _observed_steps:
            return _train_step(ctx, batches, step, batch_index)
        _observed_steps.append(step)
        blocks = list(decoder_layers(ctx.backend.module))
        calls = [0] * len(blocks)
        training: list[bool] = []

        def count(index: int) -> Callable[[torch.nn.Module, Any], None]:
            def hook(module: torch.nn.Module, args: Any) -> None:
                calls[index] += 1
                training.append(module.training)

            return hook

        handles = [block.register_forward_pre_hook(count(i)) for i, block in enumerate(blocks)]
        try:
            result = _train_step(ctx, batches, step, batch_index)
        finally:
            for handle in handles:
                handle.remove()
        record = {
            "step": step,
            "training": all(training) and bool(training),
            "block_calls": calls,
            "grad_accum": ctx.plan.grad_accum,
        }
        Path(f"{_prefix}.rank{ctx.rank}.json").write_text(json.dumps(record))
        return result

    trainer.loop.train_step = _observed_train_step

# LLM_TEST_CHECKSUMS=PREFIX: each rank appends to PREFIX.rankN.txt the name of every file whose checksum it
# computes to verify a checkpoint (trainer.checkpoint.manifest.file_checksum). It observes only.
_checksums = os.environ.get("LLM_TEST_CHECKSUMS", "")
if _checksums:
    import trainer.checkpoint.manifest

    _file_checksum = trainer.checkpoint.manifest.file_checksum

    def _observed_file_checksum(path, _prefix=_checksums):
        with open(f"{_prefix}.rank{os.environ.get('RANK', '0')}.txt", "a") as listing:
            listing.write(f"{path}\n")
        return _file_checksum(path)

    trainer.checkpoint.manifest.file_checksum = _observed_file_checksum
