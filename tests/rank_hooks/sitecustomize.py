"""Test hook for local training runs, imported by Python at start-up when this folder is on PYTHONPATH.

LLM_TEST_FIRST_STEP=PREFIX makes each rank write PREFIX.rankN.json after the first training step of its
process: the step, whether the model was in train mode during it, how many times each transformer block's
forward ran, the micro batches per step, and after each micro batch but the last the gradient elements the
rank holds as a fraction of the model's parameters (FSDP: its shards, and any unsharded accumulated gradient
FSDP2 keeps between micro batches). With activation checkpointing at work every block runs twice per micro
batch (the forward, then its recomputation in backward), once without. It observes only.
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

    def _gradient_fraction(module: torch.nn.Module) -> float:
        """Gradient elements held on this rank over the model's parameter count (a DTensor counts globally)."""
        from torch.distributed.tensor import DTensor

        full = sum(p.numel() for p in module.parameters())
        held = sum(
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).numel()
            for p in module.parameters()
            if p.grad is not None
        )
        for sub in module.modules():
            state = sub._get_fsdp_state() if hasattr(sub, "_get_fsdp_state") else None
            group = state._fsdp_param_group if state is not None else None
            for fsdp_param in group.fsdp_params if group is not None else []:
                accumulated = getattr(fsdp_param, "unsharded_accumulated_grad", None)
                held += accumulated.numel() if accumulated is not None else 0
        return held / full

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
        forward_backward, held = ctx.backend.forward_backward, []

        def observed_forward_backward(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = forward_backward(*args, **kwargs)
            if not kwargs["last_micro_batch"]:
                held.append(_gradient_fraction(ctx.backend.module))
            return loss

        ctx.backend.forward_backward = observed_forward_backward
        try:
            result = _train_step(ctx, batches, step, batch_index)
        finally:
            del ctx.backend.forward_backward
            for handle in handles:
                handle.remove()
        record = {
            "step": step,
            "training": all(training) and bool(training),
            "block_calls": calls,
            "grad_accum": ctx.plan.grad_accum,
            "gradient_held": held,
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

# LLM_TEST_SLOW_CHECKSUMS=SECONDS: every checksum computed to verify a checkpoint takes SECONDS longer (a
# checkpoint on a slow shared filesystem, at a scale where reading all of it takes minutes).
_slow_checksums = float(os.environ.get("LLM_TEST_SLOW_CHECKSUMS", "0") or 0)
if _slow_checksums:
    import time

    import trainer.checkpoint.manifest

    _unslowed_checksum = trainer.checkpoint.manifest.file_checksum

    def _slow_file_checksum(path, _seconds=_slow_checksums):
        time.sleep(_seconds)
        return _unslowed_checksum(path)

    trainer.checkpoint.manifest.file_checksum = _slow_file_checksum

# LLM_TEST_HOST_SYNCS=PREFIX:FIRST:LAST: each rank writes PREFIX.rankN.json listing every conversion of a
# tensor to a host value (item, float, int, bool, cpu, tolist, numpy) made by the training thread from the
# start of step FIRST to the start of step LAST + 1, with where it was made. The one read that is meant to
# happen, StepReport.read of its host buffer (trainer/step_report.py), is left out. It observes only.
_syncs = os.environ.get("LLM_TEST_HOST_SYNCS", "")
if _syncs:
    import json
    import sys
    import threading
    import traceback
    from pathlib import Path

    import torch

    import trainer.loop
    from trainer.step_report import StepReport

    _prefix_syncs, _first, _last = _syncs.rsplit(":", 2)
    _window = {"open": False, "seen": [], "opened": []}
    _main_thread = threading.main_thread()

    def _audit(event: str, args: tuple) -> None:  # files the training thread opens in the window
        if event == "open" and _window["open"] and threading.current_thread() is _main_thread:
            _window["opened"].append(str(args[0]))

    sys.addaudithook(_audit)

    def _where() -> str:
        frames = [f for f in traceback.extract_stack()[:-2] if "sitecustomize" not in f.filename]
        return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))

    def _counted(name: str, original):
        def conversion(self, *args, **kwargs):
            if _window["open"] and threading.current_thread() is _main_thread:
                caller = sys._getframe(1).f_code
                if not (name == "numpy" and caller is StepReport.read.__code__):
                    _window["seen"].append(f"Tensor.{name}: {_where()}")
            return original(self, *args, **kwargs)

        return conversion

    for _name in ("item", "__float__", "__int__", "__bool__", "cpu", "tolist", "numpy"):
        setattr(torch.Tensor, _name, _counted(_name, getattr(torch.Tensor, _name)))

    _step_before_syncs = trainer.loop.train_step

    def _windowed_train_step(ctx, batches, step, batch_index):
        if step == int(_first):
            _window["open"] = True
        elif step == int(_last) + 1 and _window["open"]:
            _window["open"] = False
            record = {"first": int(_first), "last": int(_last), "conversions": _window["seen"],
                      "opened": _window["opened"]}  # fmt: skip
            Path(f"{_prefix_syncs}.rank{ctx.rank}.json").write_text(json.dumps(record, indent=1))
        return _step_before_syncs(ctx, batches, step, batch_index)

    trainer.loop.train_step = _windowed_train_step
