"""Step time of `llm-train train` (1 process, FSDP2, fp32, CPU) against a bare PyTorch loop.

Same model, batch, optimizer and data in the same run; prints the ratio of median step times
(target <= 1.03). Usage: .venv/bin/python bench/overhead.py [--steps 40] [--layers 4] [--width 256]
"""

from __future__ import annotations

import argparse
import json
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
from trainer.model import build_model  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402


def bare_loop(args: argparse.Namespace, data_dir: Path) -> list[float]:
    """The same work with nothing around it: model, AdamW + schedule, clipping, the same batches."""
    from streaming import StreamingDataset

    model_cfg = ModelConfig(size="tiny", n_layer=args.layers, n_embd=args.width, n_head=args.width // 64)
    model = build_model(model_cfg, args.vocab, args.seq_len, "sdpa", seed=1234)
    train_cfg = TrainConfig(
        global_batch_size=args.batch, micro_batch_size=args.batch, max_steps=args.steps, precision="fp32"
    )
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    dataset = StreamingDataset(local=str(data_dir / "train"), batch_size=args.batch, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch)
    batches = iter(loader)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        input_ids = next(batches)["tokens"].long()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


def trainer_run(args: argparse.Namespace, data_dir: Path, run_dir: Path) -> list[float]:
    overrides = [
        f"run.dir={run_dir}", f"data.path={data_dir}", "model.size=tiny", f"model.n_layer={args.layers}",
        f"model.n_embd={args.width}", f"model.n_head={args.width // 64}", "train.precision=fp32",
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}",
        "log.every_steps=1", "log.wandb=off", "eval.every_steps=0", "parallel.backend=fsdp",
    ]  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "launcher.cli", "train", "tiny", *overrides, "--nproc", "1"], check=True
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_dataset(Path(tmp) / "data", train_samples=args.batch * (args.steps + 1), val_samples=8,
                                 seq_len=args.seq_len, vocab_size=args.vocab)  # fmt: skip
        trainer = statistics.median(trainer_run(args, data_dir, Path(tmp) / "run")[args.warmup :])
        bare = statistics.median(bare_loop(args, data_dir)[args.warmup :])
    print(f"model: {args.layers} layers x {args.width} wide, batch {args.batch} x {args.seq_len}, fp32, CPU")
    print(f"median step time: llm-train {trainer * 1000:.1f} ms, bare PyTorch loop {bare * 1000:.1f} ms")
    print(f"ratio {trainer / bare:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
