"""Checkpoint save/load throughput of a gpt2-124m-sized state, against plain torch.save/torch.load.

One process (FSDP2 over a world of 1, gloo, CPU). The state is the model and its AdamW moments
(about 1.5 GB in fp32). Prints GB/s for our save (DCP shards + RNG + each rank checksumming and fsyncing
the files it wrote + the manifest) and load (manifest verification + the plain-data check of DCP's index
and non-tensor entries + DCP load), the same for torch.save/torch.load of the same tensors to the same
disk, their ratios (target >= 0.7), and for checkpoint.async=true the training stall as a fraction of the
synchronous save time (target <= 0.1).

The stall is what training waits for while a background save goes on: the time `save` blocks, plus the
time `before_update` blocks after one real forward and backward of the model (one sequence of
--train-tokens), which is the work that overlaps the staging copy in a run. It is measured for both
writers DCP offers (a thread, a process); the forward/backward itself is not stall. The worst case, a
`before_update` right after `save` with no computation to overlap, is printed too (thread writer).

Then `llm-train export` of the last checkpoint (fp32, --export-shard-size shards), in a process of its own: its
rate (bytes written per second) against a plain copy of the checkpoint's model folder on the same disk (target
>= 0.5), and its peak memory growth against the model's size and against one output shard plus the largest
tensor (what a streamed export may hold).

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
from trainer.parallel.fsdp import AsyncCheckpointerType, FSDPBackend  # noqa: E402

CONTEXT = 1024  # the model's context length (gpt2's)
WRITERS = {"thread": AsyncCheckpointerType.THREAD, "process": AsyncCheckpointerType.PROCESS}


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


def async_stall(
    manager: CheckpointManager, backend: FSDPBackend, step: int, data: _DataPosition, batch: dict | None
) -> tuple[float, float]:
    """(stall, forward/backward time) of one background save followed by one training step (`batch`), or
    by the update alone (None: nothing overlaps the staging copy)."""
    stall = timed(lambda: manager.save(step, {"step": step, "tokens": 0}, backend, data))
    compute = 0.0
    if batch is not None:
        compute = timed(lambda: backend.forward_backward(batch, last_micro_batch=True))
    stall += timed(manager.before_update)
    if batch is not None:
        backend.step()
    manager.wait()
    finish_retention()
    return stall, compute


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
    parser.add_argument("--train-tokens", type=int, default=256, help="the training step's sequence length")
    parser.add_argument("--export-shard-size", type=int, default=10**8, help="export's shard limit in bytes")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581")
    env = init_distributed(600)
    overrides = [f"run.dir={root / 'run'}", "data.path=unused", f"model.size={args.size}", "train.precision=fp32",
                 "train.global_batch_size=1", "train.micro_batch_size=1", "checkpoint.keep_last=1"]  # fmt: skip
    config = load_config("tiny", overrides)
    source = model_source(ModelRecipe(config.model, 50257, CONTEXT, "sdpa", seed=0), env)
    backend = FSDPBackend(config, source, batch_plan(config.train, 1), env)
    batch = {"input_ids": torch.randint(0, 50257, (1, 64))}
    train_batch = {"input_ids": torch.randint(0, 50257, (1, args.train_tokens))}
    backend.forward_backward(batch, last_micro_batch=True)
    backend.step()  # materialises the AdamW moments
    size_gb = state_bytes(backend) / 1e9
    manager, data = CheckpointManager(config, env), _DataPosition()
    manager.model_config = source.hf_config.to_json_string()  # as a run saves it: what `export` reads
    plain_file = root / "plain.pt"

    def plain_state() -> dict:
        return {"model": backend.module.state_dict(), "optim": backend.optimizer.state_dict()}

    results: dict[str, list[float]] = {
        k: []
        for k in (
            "save",
            "plain_save",
            "load",
            "plain_load",
            "compute",
            "stall_alone",
            *(f"stall_{w}" for w in WRITERS),
        )
    }
    for repeat in range(args.repeats):
        step = 10 * repeat + 1  # the synchronous save; then one async save per writer, and the worst case
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
        for index, (name, writer) in enumerate(WRITERS.items()):
            backend.async_writer = writer
            stall, compute = async_stall(manager, backend, step + index + 1, data, train_batch)
            results[f"stall_{name}"].append(stall)
            results["compute"].append(compute)
        backend.async_writer = WRITERS["thread"]
        results["stall_alone"].append(async_stall(manager, backend, step + len(WRITERS) + 1, data, None)[0])
        manager.config.checkpoint.async_save = False
    median = {key: statistics.median(values) for key, values in results.items()}
    print(
        f"state: {args.size} model + AdamW moments, {size_gb:.2f} GB fp32; {args.repeats} repeats, medians; disk {root}"
    )
    print(f"save  llm-train {size_gb / median['save']:.2f} GB/s   torch.save {size_gb / median['plain_save']:.2f} GB/s"
          f"   ratio {median['plain_save'] / median['save']:.2f} (target >= 0.7)")  # fmt: skip
    print(f"load  llm-train {size_gb / median['load']:.2f} GB/s   torch.load {size_gb / median['plain_load']:.2f} GB/s"
          f"   ratio {median['plain_load'] / median['load']:.2f} (target >= 0.7)")  # fmt: skip
    print(f"one training forward/backward (1 x {args.train_tokens} tokens) {median['compute']:.2f} s")
    for name in WRITERS:
        stall = median[f"stall_{name}"]
        print(f"async save, {name} writer: stall {stall:.3f} s = {stall / median['save']:.3f} of a synchronous save"
              " (target <= 0.1)")  # fmt: skip
    alone = median["stall_alone"]
    print(f"async save, thread writer, nothing to overlap: stall {alone:.3f} s = {alone / median['save']:.3f}"
          " of a synchronous save")  # fmt: skip
    backend.close()
    export_figures(newest_valid_step(manager.root).step_dir, root, args.export_shard_size, backend)
    teardown()
    shutil.rmtree(root, ignore_errors=True)


EXPORT_SCRIPT = """
import ctypes, json, sys, time
from pathlib import Path
from trainer.models.export import export
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) * 1024
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # freed memory goes back: the peak is what is held
Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
before = kib("VmRSS")
start = time.perf_counter()
export(sys.argv[1], Path(sys.argv[2]), dtype="fp32", max_shard_bytes=int(sys.argv[3]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_growth": kib("VmHWM") - before}))
"""


def export_figures(step_dir: Path, root: Path, shard_bytes: int, backend: FSDPBackend) -> None:
    """Time `export` (its own process: its peak memory is its own) against a plain copy of the same checkpoint's
    model folder, and report its peak memory growth beside the model's size."""
    import json
    import subprocess

    params = {id(p): p for p in backend.module.parameters()}.values()
    model_bytes = sum(p.numel() * 4 for p in params)
    largest = max(p.numel() * 4 for p in params)
    copy = root / "plain-copy"
    drop_page_cache()
    copy_s = timed(lambda: (shutil.copytree(step_dir / "model", copy), os.sync()))
    copied = sum(f.stat().st_size for f in copy.rglob("*") if f.is_file())
    drop_page_cache()
    out = root / "export"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(step_dir), str(out), str(shard_bytes)],
                            capture_output=True, text=True, env=env, check=True)  # fmt: skip
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    export_rate, copy_rate = written / figures["seconds"], copied / copy_s
    print(f"export  {written / 1e9:.2f} GB of fp32 safetensors in {len(list(out.glob('*.safetensors')))} shards: "
          f"{export_rate / 1e9:.2f} GB/s   plain copy of the checkpoint's model folder {copy_rate / 1e9:.2f} GB/s"
          f"   ratio {export_rate / copy_rate:.2f} (target >= 0.5)")  # fmt: skip
    print(f"export  peak memory growth {figures['peak_growth'] / 1e6:.0f} MB; model {model_bytes / 1e6:.0f} MB fp32;"
          f" one shard + the largest tensor {(shard_bytes + largest) / 1e6:.0f} MB (the streamed bound)")  # fmt: skip


if __name__ == "__main__":
    main()
