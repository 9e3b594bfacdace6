"""Step time of `llm-train train` (1 process, fp32, CPU) against a bare PyTorch loop.

Same model, batch, optimizer and data. Both log every `--log-every` steps (the bare loop reads its loss
then, as any loop that logs must), and the step time is the wall time between two log lines over the
steps between them, median over the run after `--warmup` steps: everything the trainer does per step
counts (data, the step report, heartbeat, goodput, fault hooks) and so do its logging steps. Both run in
fresh processes, alternately, `--repeats` times, so that a busy machine slows both alike; the ratio of
each pair's step times is printed, then the median of the ratios (target <= 1.03).
Usage: .venv/bin/python bench/overhead.py [--repeats 3] [--steps 60] [--layers 4] [--width 256] [--seq-len 256]
The tiny preset's shape: --layers 2 --width 64 --seq-len 128.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mds_fixtures import write_dataset  # noqa: E402
from trainer.config import ModelConfig, TrainConfig  # noqa: E402
from trainer.models.build import build_model  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402


def bare_loop(args: argparse.Namespace, data_dir: Path) -> list[tuple[int, float]]:
    """The same work with nothing around it: model, AdamW + schedule, clipping, the same batches.
    Returns (step, time) at every logging step."""
    from streaming import StreamingDataset

    model_cfg = ModelConfig(
        size="tiny", n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64)
    )
    model = build_model(model_cfg, args.vocab, args.seq_len, "sdpa", seed=1234)
    train_cfg = TrainConfig(
        global_batch_size=args.batch, micro_batch_size=args.batch, max_steps=args.steps, precision="fp32"
    )
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    dataset = StreamingDataset(local=str(data_dir / "train"), batch_size=args.batch, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch)
    batches = iter(loader)
    stamps = []
    for step in range(1, args.steps + 1):
        input_ids = next(batches)["tokens"].long()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % args.log_every == 0:
            loss.item()
            stamps.append((step, time.time()))
    return stamps


def trainer_run(args: argparse.Namespace, data_dir: Path, run_dir: Path) -> list[tuple[int, float]]:
    overrides = [
        f"run.dir={run_dir}", f"data.path={data_dir}", "model.size=tiny", f"model.n_layer={args.layers}",
        f"model.n_embd={args.width}", f"model.n_head={max(1, args.width // 64)}", "train.precision=fp32",
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"log.every_steps={args.log_every}", "log.wandb=off", "eval.every_steps=0", "parallel.backend=fsdp",
    ]  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "launcher.cli", "train", "tiny", *overrides, "--nproc", "1"], check=True
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["time"]) for r in records if "loss" in r]


def step_time(stamps: list[tuple[int, float]], warmup: int) -> float:
    """The median over the logging windows after `warmup` steps of each window's time per step."""
    stamps = [(step, at) for step, at in stamps if step >= warmup]
    return statistics.median(
        (later - earlier) / (step2 - step1)
        for (step1, earlier), (step2, later) in zip(stamps, stamps[1:], strict=False)
    )


def bare_run(args: argparse.Namespace, data_dir: Path) -> list[tuple[int, float]]:
    """`bare_loop` in a fresh process, as the trainer runs in one."""
    command = [sys.executable, __file__, "--bare-only", str(data_dir), *sys.argv[1:]]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS for both (1 keeps a busy machine's noise down)"
    )
    parser.add_argument("--bare-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.bare_only:
        print(json.dumps(bare_loop(args, args.bare_only)))
        return
    print(f"model: {args.layers} layers x {args.width} wide, batch {args.batch} x {args.seq_len}, fp32, CPU, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_dataset(Path(tmp) / "data", train_samples=args.batch * (args.steps + 1), val_samples=8,
                                 seq_len=args.seq_len, vocab_size=args.vocab)  # fmt: skip
        for repeat in range(args.repeats):
            trainer = step_time(trainer_run(args, data_dir, Path(tmp) / f"run{repeat}"), args.warmup)
            bare = step_time(bare_run(args, data_dir), args.warmup)
            ratios.append(trainer / bare)
            print(f"repeat {repeat + 1}: median step llm-train {trainer * 1000:.1f} ms, "
                  f"bare PyTorch loop {bare * 1000:.1f} ms, ratio {trainer / bare:.3f}", flush=True)  # fmt: skip
    print(f"ratio, median of {args.repeats} pairs: {statistics.median(ratios):.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
