"""Checkpoint save/load throughput of a gpt2-124m-sized state, against plain torch.save/torch.load.

One process (FSDP2 over a world of 1, gloo, CPU). The state is the model and its AdamW moments
(about 1.5 GB in fp32). Prints GB/s for our save (DCP shards + RNG + each rank checksumming and fsyncing
the files it wrote + the manifest) and load (manifest verification + the plain-data check of DCP's index
and non-tensor entries + DCP load), the same for torch.save/torch.load of the same tensors to the same
disk, their ratios (target >= 0.7), and for checkpoint.async=true the training stall as a fraction of the
synchronous save time (target <= 0.1).

Usage: .venv/bin/python bench/checkpoint.py [--dir /work/bench-ckpt] [--size gpt2-124m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.checkpoint import CheckpointManager, newest_valid_step  # noqa: E402
from trainer.config import batch_plan, load_config  # noqa: E402
from trainer.distributed import init_distributed, teardown  # noqa: E402
from trainer.models.build import ModelRecipe  # noqa: E402
from trainer.parallel import model_source  # noqa: E402
from trainer.parallel.fsdp import FSDPBackend  # noqa: E402


class _DataPosition:
    """The loader's part of a checkpoint is a few integers; the bench needs no dataset for it."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "sample_in_epoch": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def state_bytes(backend: FSDPBackend) -> int:
    tensors = list(backend.module.parameters()) + [
        value
        for state in backend.optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def finish_retention() -> None:
    for thread in threading.enumerate():
        if thread.name == "ckpt-retention":
            thread.join()


def drop_page_cache() -> None:
    """Make loads read the disk, not memory, where the machine allows it (root on Linux)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="/var/tmp/llm-training-bench-ckpt")
    parser.add_argument("--size", default="gpt2-124m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581")
    env = init_distributed(600)
    overrides = [f"run.dir={root / 'run'}", "data.path=unused", f"model.size={args.size}", "train.precision=fp32",
                 "train.global_batch_size=1", "train.micro_batch_size=1", "checkpoint.keep_last=1"]  # fmt: skip
    config = load_config("tiny", overrides)
    source = model_source(ModelRecipe(config.model, 50257, 1024, "sdpa", seed=0), env)
    backend = FSDPBackend(config, source, batch_plan(config.train, 1), env)
    batch = {"input_ids": torch.randint(0, 50257, (1, 64))}
    backend.forward_backward(batch, last_micro_batch=True)
    backend.step()  # materialises the AdamW moments
    size_gb = state_bytes(backend) / 1e9
    manager, data = CheckpointManager(config, env), _DataPosition()
    plain_file = root / "plain.pt"

    def plain_state() -> dict:
        return {"model": backend.module.state_dict(), "optim": backend.optimizer.state_dict()}

    results: dict[str, list[float]] = {
        k: [] for k in ("save", "plain_save", "load", "plain_load", "async_stall")
    }
    for repeat in range(args.repeats):
        step = repeat + 1
        results["save"].append(
            timed(lambda step=step: manager.save(step, {"step": step, "tokens": 0}, backend, data))
        )
        finish_retention()  # old steps are deleted in the background: not while the baseline is timed
        results["plain_save"].append(timed(lambda: (torch.save(plain_state(), plain_file), os.sync())))
        drop_page_cache()
        point = newest_valid_step(manager.root)
        results["load"].append(timed(lambda point=point: manager.load(point, backend, data)))
        drop_page_cache()
        results["plain_load"].append(timed(lambda: torch.load(plain_file, weights_only=False)))
        manager.config.checkpoint.async_save = True
        results["async_stall"].append(
            timed(lambda step=step: manager.save(100 + step, {"step": step, "tokens": 0}, backend, data))
        )
        manager.wait()
        finish_retention()
        manager.config.checkpoint.async_save = False
    median = {key: statistics.median(values) for key, values in results.items()}
    print(
        f"state: {args.size} model + AdamW moments, {size_gb:.2f} GB fp32; {args.repeats} repeats, medians; disk {root}"
    )
    print(f"save  llm-train {size_gb / median['save']:.2f} GB/s   torch.save {size_gb / median['plain_save']:.2f} GB/s"
          f"   ratio {median['plain_save'] / median['save']:.2f} (target >= 0.7)")  # fmt: skip
    print(f"load  llm-train {size_gb / median['load']:.2f} GB/s   torch.load {size_gb / median['plain_load']:.2f} GB/s"
          f"   ratio {median['plain_load'] / median['load']:.2f} (target >= 0.7)")  # fmt: skip
    print(f"async save stall {median['async_stall']:.2f} s = {median['async_stall'] / median['save']:.2f} of a synchronous save"
          " (target <= 0.1)")  # fmt: skip
    teardown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
